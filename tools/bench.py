"""Throughput on an online stream: adaptlab vs a plain PyTorch loop (and Lightning, Avalanche).

Every variant trains the same MLP (same seeded initialisation) with SGD on the same stream
(Split-Digits in stream order, batch B), one update per mini-batch, in the same process and
run; the table gives samples/s and the ratio to the plain loop. Model build and stream build
are outside the timed region; the adaptlab rows include everything a run does per step
(Trainer loop, test-then-train bookkeeping, evaluator), except boundary evaluations are
switched off so the rows compare training work only.

    python tools/bench.py --repeats 20 --batch-size 10 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
import torch.nn.functional as F

from adaptlab.data import StreamDataModule
from adaptlab.models import build_model
from adaptlab.strategies import Finetune
from adaptlab.streams import split


def _model(st, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003)
        return build_model("mlp", st.input_shape, st.n_classes, hidden=(256,))


def plain_loop(st, lr: float, seed: int) -> float:
    model = _model(st, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, b = st.x, st.y, st.batch_size
    t = time.perf_counter()
    for s in range(0, len(y), b):
        logits = model(x[s : s + b])
        loss = F.cross_entropy(logits, y[s : s + b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def lightning_plain(st, lr: float, seed: int) -> float:
    """Lightning's ordinary path: automatic optimisation, a TensorDataset DataLoader."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(st, seed)

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    loader = DataLoader(TensorDataset(st.x, st.y), batch_size=st.batch_size, shuffle=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accelerator="cpu")
    module = Plain()
    t = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - t


def adaptlab_finetune(st, lr: float, seed: int, batches_per_step: int, log_dir: str) -> float:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from adaptlab.evaluation import StreamEvaluator

    learner = Finetune(input_shape=st.input_shape, n_classes=st.n_classes,
                       batch_size=st.batch_size, lr=lr, seed=seed)
    evaluator = StreamEvaluator(init_eval=False, figures=False, print_table=False)
    nobounds = type(st)(**{**{f: getattr(st, f) for f in st.__dataclass_fields__
                              if f != "fingerprint"}, "eval_positions": (len(st),),
                           "row_segments": (st.row_segments[-1],)})
    trainer = pl.Trainer(max_epochs=1, logger=TensorBoardLogger(log_dir, name="bench"),
                         enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[evaluator],
                         num_sanity_val_steps=0)
    dm = StreamDataModule(nobounds, batches_per_step=batches_per_step)
    t = time.perf_counter()
    trainer.fit(learner, datamodule=dm)
    return time.perf_counter() - t


def avalanche_naive(st, lr: float, seed: int) -> float | None:
    try:
        from avalanche.benchmarks.utils import as_classification_dataset
        from avalanche.training.supervised import Naive
    except ImportError:
        return None
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.training.plugins import EvaluationPlugin
    from torch.utils.data import TensorDataset

    ds = TensorDataset(st.x, st.y)
    ds.targets = st.y.tolist()
    bench = benchmark_from_datasets(train=[as_classification_dataset(ds)])
    model = _model(st, seed)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                     train_mb_size=st.batch_size, train_epochs=1, device="cpu",
                     evaluator=EvaluationPlugin(loggers=[]))
    exp = bench.train_stream[0]
    t = time.perf_counter()
    strategy.train(exp, shuffle=False, num_workers=0)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="passes per segment")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    ap.add_argument("--log-dir", default="/tmp/adaptlab_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    st = split(repeats=args.repeats, batch_size=args.batch_size)
    n = len(st)
    variants = {
        "plain PyTorch loop": lambda: plain_loop(st, args.lr, 0),
        "Lightning Trainer, automatic optimisation": lambda: lightning_plain(st, args.lr, 0),
        **{
            f"adaptlab Finetune (Trainer), batches_per_step={k}":
                (lambda k=k: adaptlab_finetune(st, args.lr, 0, k, args.log_dir))
            for k in (1, 10, 50)
        },
        "Avalanche Naive": lambda: avalanche_naive(st, args.lr, 0),
    }
    plain_loop(st, args.lr, 0)  # warm-up (allocator, kernels)
    best: dict[str, float | None] = {}
    # Interleaved rounds, best time per variant: a shared machine's noise hits all alike.
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = fn()
            best[name] = None if t is None else min(t, best.get(name) or float("inf"))
    rows = list(best.items())
    base = n / rows[0][1]
    print(f"\nSplit-Digits, {n} samples, batch {args.batch_size}, MLP 64-256-10, SGD; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or 'cpu'}")
    print("\n| variant | samples/s | × plain loop |\n|---|---:|---:|")
    for name, secs in rows:
        if secs is None:
            print(f"| {name} | not installed | — |")
        else:
            print(f"| {name} | {n / secs:,.0f} | {n / secs / base:.2f} |")


if __name__ == "__main__":
    main()
