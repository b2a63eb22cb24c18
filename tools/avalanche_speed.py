"""Native Lightning vs inside Avalanche: the same learner on the same stream, in one run.

    python tools/avalanche_speed.py [--learners Finetune Replay TAME] [--rounds 3]

For each learner it runs the native Trainer + StreamEvaluator and `StreamLearnerStrategy`
on `stream_to_avalanche(stream)` (one experience per segment, eval after each), alternating
rounds and keeping each variant's best wall time. It prints the time per observed batch and
the largest accuracy-matrix difference (0 on CPU: the arithmetic is identical).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptlab.avalanche import StreamLearnerStrategy, segment_matrix_metrics, stream_to_avalanche  # noqa: E402
from adaptlab.data import StreamDataModule  # noqa: E402
from adaptlab.evaluation import StreamEvaluator  # noqa: E402
from adaptlab.streams import split  # noqa: E402


def make(name: str, stream) -> pl.LightningModule:
    from adaptlab import strategies

    kw = {"input_shape": stream.input_shape, "n_classes": stream.n_classes,
          "batch_size": stream.batch_size}
    return getattr(strategies, name)(**kw)


def native(name: str, stream, tmp: str) -> tuple[float, np.ndarray]:
    pl.seed_everything(0, verbose=False)
    learner = make(name, stream)
    ev = StreamEvaluator(print_table=False, figures=False, init_eval=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[ev], accelerator="cpu",
                         default_root_dir=tmp)
    t = time.perf_counter()
    trainer.fit(learner, datamodule=StreamDataModule(stream, eval_batch_size=1024))
    return time.perf_counter() - t, ev.matrix()


def bridge(name: str, stream, bm, tmp: str) -> tuple[float, np.ndarray]:
    from avalanche.training.plugins import EvaluationPlugin

    pl.seed_everything(0, verbose=False)
    seg = segment_matrix_metrics(stream=stream)
    strat = StreamLearnerStrategy(learner=make(name, stream), train_mb_size=stream.batch_size,
                                  eval_mb_size=1024, evaluator=EvaluationPlugin(seg),
                                  log_dir=tmp)
    t = time.perf_counter()
    for exp in bm.train_stream:
        strat.train(exp)
        strat.eval(bm.test_stream)
    strat.close()
    return time.perf_counter() - t, seg.matrix()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", nargs="+", default=["Finetune", "Replay"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    stream = split(batch_size=10)
    bm = stream_to_avalanche(stream)
    steps = -(-len(stream) // stream.batch_size)
    print(f"stream {stream.name}: {len(stream)} samples, {steps} batches of "
          f"{stream.batch_size}, {len(stream.segments)} segments; torch threads 1, CPU")
    print(f"{'learner':<10}{'native s':>10}{'bridge s':>10}{'bridge/native':>15}"
          f"{'us/batch nat':>14}{'us/batch av':>13}{'max|dR|':>10}")
    for name in args.learners:
        best = {"native": float("inf"), "bridge": float("inf")}
        R = {}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                t, R["native"] = native(name, stream, tmp)
                best["native"] = min(best["native"], t)
                t, R["bridge"] = bridge(name, stream, bm, tmp)
                best["bridge"] = min(best["bridge"], t)
        diff = float(np.nanmax(np.abs(R["native"] - R["bridge"])))
        print(f"{name:<10}{best['native']:>10.3f}{best['bridge']:>10.3f}"
              f"{best['bridge'] / best['native']:>15.2f}"
              f"{1e6 * best['native'] / steps:>14.0f}{1e6 * best['bridge'] / steps:>13.0f}"
              f"{diff:>10.2g}")


if __name__ == "__main__":
    main()
