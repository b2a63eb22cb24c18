"""Throughput on an online stream: adaptlab vs a plain PyTorch loop, Lightning and Avalanche.

Every variant trains the same backbone (same seeded initialisation) with SGD on the same
stream (Split-Digits in stream order, batch B), one update per mini-batch, in the same
process; the table gives samples/s and the ratio to the plain loop of the same row group.
Variants run in interleaved rounds and keep their best time, so a shared machine's noise
hits all of them alike. Model and stream building are outside the timed region. adaptlab
rows are timed from the start of training to the end of the last training step, with the
StreamEvaluator recording online accuracy on every chunk (boundary evaluations off).

    python tools/bench.py                      # MLP and LeNet, batch 10 and 128, CPU
    python tools/bench.py --device cuda        # the same on the GPU (tools/gpu_check.sh)
    python tools/bench.py --quick              # MLP, batch 10 only
    python tools/bench.py --whole-runs         # also every committed digits config end to end

The whole-run table runs each `configs/*/*digits*.yaml` as `adaptlab fit` in a fresh process
(interpreter start and imports included, as a user sees it; logs in a temporary folder) and
reports its wall time with its `acc_final` and `acc_online` from `metrics.json`; configs run in
interleaved rounds and keep their best time.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from adaptlab.data import StreamDataModule
from adaptlab.models import build_model
from adaptlab.seeding import seeded
from adaptlab.streams import Stream, split

BACKBONES = {"mlp": {"hidden": (256,)}, "lenet": {}}


def _model(st: Stream, backbone: str, seed: int = 0) -> torch.nn.Module:
    with seeded(seed * 1_000_003):
        return build_model(backbone, st.input_shape, st.n_classes, **BACKBONES[backbone])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(st: Stream, backbone: str, lr: float, device: str) -> float:
    model = _model(st, backbone).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, b = st.x.to(device), st.y.to(device), st.batch_size
    _sync(device)
    t = time.perf_counter()
    for s in range(0, len(y), b):
        loss = F.cross_entropy(model(x[s : s + b]), y[s : s + b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t


def lightning_plain(st: Stream, backbone: str, lr: float, device: str) -> float:
    """Lightning's ordinary path: automatic optimisation over a TensorDataset DataLoader."""
    from torch.utils.data import DataLoader, TensorDataset

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model(st, backbone)

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    loader = DataLoader(TensorDataset(st.x, st.y), batch_size=st.batch_size, shuffle=False)
    timer = _TrainTimer()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         callbacks=[timer])
    trainer.fit(Plain(), loader)
    return timer.seconds


class _TrainTimer(pl.Callback):
    """Seconds from the start of training to the end of the last training step (it runs
    before the evaluator, so end-of-stream evaluation is not counted)."""

    def on_train_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device.type)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        _sync(pl_module.device.type)
        self.seconds = time.perf_counter() - self.t0


def adaptlab_run(st: Stream, learner_cls, device: str, batches_per_step: int = 50,
                 prepare: Callable | None = None, **learner_args) -> float:
    from adaptlab.evaluation import StreamEvaluator

    learner = learner_cls(input_shape=st.input_shape, n_classes=st.n_classes,
                          batch_size=st.batch_size, seed=0, **learner_args)
    if prepare is not None:
        prepare(learner)
    timer = _TrainTimer()
    evaluator = StreamEvaluator(init_eval=False, figures=False, print_table=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         callbacks=[timer, evaluator], num_sanity_val_steps=0,
                         default_root_dir="/tmp/adaptlab_bench")
    # One evaluation point at the end: rows compare training work, not evaluation work.
    st = dataclasses.replace(st, eval_positions=(len(st),), row_segments=(st.row_segments[-1],),
                             first_rows=tuple(0 for _ in st.segments))
    dm = StreamDataModule(st, batches_per_step=batches_per_step, device_cache=device == "cuda")
    trainer.fit(learner, datamodule=dm)
    return timer.seconds


def avalanche_naive(st: Stream, backbone: str, lr: float, device: str) -> float | None:
    try:
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils import as_classification_dataset
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import Naive
    except ImportError:
        return None
    from torch.utils.data import TensorDataset

    ds = TensorDataset(st.x, st.y)
    ds.targets = st.y.tolist()
    bench = benchmark_from_datasets(train=[as_classification_dataset(ds)])
    model = _model(st, backbone)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                     train_mb_size=st.batch_size, train_epochs=1, device=device,
                     evaluator=EvaluationPlugin(loggers=[]))
    exp = bench.train_stream[0]
    _sync(device)
    t = time.perf_counter()
    strategy.train(exp, shuffle=False, num_workers=0)
    _sync(device)
    return time.perf_counter() - t


def _with_experts(k: int) -> Callable:
    """Grow a fresh TAME to k experts before training (a stationary stream keeps k)."""
    def prepare(learner) -> None:
        for _ in range(k - 1):
            learner._spawn()
            learner.core.add_expert()
        learner.pool.invalidate()

    return prepare


def variants(st: Stream, backbone: str, lr: float, device: str) -> dict[str, Callable]:
    from adaptlab.strategies import TAME, Finetune, Replay

    common = {"backbone": backbone, "backbone_args": BACKBONES[backbone], "lr": lr}
    out: dict[str, Callable] = {
        "plain PyTorch loop": lambda: plain_loop(st, backbone, lr, device),
        "Lightning Trainer, automatic optimisation":
            lambda: lightning_plain(st, backbone, lr, device),
        "adaptlab Finetune, 1 batch per step":
            lambda: adaptlab_run(st, Finetune, device, 1, **common),
        "adaptlab Finetune": lambda: adaptlab_run(st, Finetune, device, **common),
        "Avalanche Naive": lambda: avalanche_naive(st, backbone, lr, device),
        "adaptlab Replay (2x the work per step)":
            lambda: adaptlab_run(st, Replay, device, memory_size=500, **common),
    }
    experts = {"lr": lr, "momentum": 0.0, "weight_decay": 0.0}
    tame = {"backbone": backbone, "backbone_args": BACKBONES[backbone],
            "detector": {"grace_steps": 10**9}, "pruning": {"when": "off"},
            "selector": {"epochs": 1, "schedule": "end"}}
    for k in (1, 5, 20):
        out[f"adaptlab TAME, K={k} experts"] = (
            lambda k=k: adaptlab_run(st, TAME, device, prepare=_with_experts(k),
                                     experts=experts, **tame)
        )
    out["adaptlab TAME, K=20, eval_experts=on_trigger"] = lambda: adaptlab_run(
        st, TAME, device, prepare=_with_experts(20),
        experts={**experts, "eval_experts": "on_trigger"}, **tame)
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def whole_run(config: str, log_dir: str) -> tuple[float, dict | None]:
    """Wall seconds of `adaptlab fit --config config` in a fresh process, and its
    metrics.json `final` block (None when the run failed)."""
    exe = os.path.join(os.path.dirname(sys.executable), "adaptlab")
    cmd = [exe, "fit", "--config", config, "--trainer.logger.init_args.save_dir", log_dir,
           "--trainer.enable_progress_bar", "false"]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secs = time.perf_counter() - t
    paths = glob.glob(os.path.join(log_dir, "**", "metrics.json"), recursive=True)
    if done.returncode or not paths:
        return secs, None
    with open(paths[0]) as f:
        return secs, json.load(f)["final"]


def whole_runs(patterns: list[str], rounds: int) -> None:
    """The whole-run table: every committed digits config end to end."""
    configs = sorted({os.path.relpath(c, ROOT) for p in patterns
                      for c in glob.glob(os.path.join(ROOT, p))})
    best: dict[str, tuple[float, dict | None]] = {}
    with tempfile.TemporaryDirectory(prefix="adaptlab_whole_") as tmp:
        for r in range(rounds):
            for i, config in enumerate(configs):
                secs, final = whole_run(config, os.path.join(tmp, f"{r}_{i}"))
                if config not in best or (final is not None and secs < best[config][0]):
                    best[config] = (secs, final)
    print(f"\nWhole runs (`adaptlab fit`, fresh process each, best of {rounds}):\n")
    print("| config | wall s | acc_final | acc_online |\n|---|---:|---:|---:|")
    for config, (secs, final) in best.items():
        if final is None:
            print(f"| `{config}` | failed | — | — |")
            continue
        acc, online = final.get("acc_final"), final.get("acc_online")
        print(f"| `{config}` | {secs:.1f} | {acc:.4f} | "
              f"{'—' if online is None else f'{online:.4f}'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="passes per segment")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 128])
    ap.add_argument("--backbones", nargs="+", default=["mlp", "lenet"], choices=list(BACKBONES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    ap.add_argument("--quick", action="store_true", help="MLP, batch 10 only")
    ap.add_argument("--whole-runs", action="store_true",
                    help="also time every committed digits config end to end")
    ap.add_argument("--whole-only", action="store_true", help="only the whole-run table")
    ap.add_argument("--whole-rounds", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=["configs/*/*digits*.yaml"],
                    help="globs of the whole-run configs (relative to the repository)")
    args = ap.parse_args()
    if args.whole_only:
        whole_runs(args.configs, args.whole_rounds)
        return
    if args.quick:
        args.batch_sizes, args.backbones = [10], ["mlp"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else (
        platform.processor() or platform.machine())
    print(f"Split-Digits x {args.repeats} passes per segment; torch {torch.__version__}, "
          f"{args.device} ({dev_name}), {args.threads} CPU thread(s), best of {args.rounds} "
          "interleaved rounds")
    print("\n| backbone | batch | variant | samples/s | × plain loop |\n|---|---:|---|---:|---:|")
    for backbone in args.backbones:
        for b in args.batch_sizes:
            st = split(repeats=args.repeats, batch_size=b)
            runs = variants(st, backbone, args.lr, args.device)
            plain_loop(st, backbone, args.lr, args.device)  # warm-up (allocator, kernels)
            best: dict[str, float | None] = {}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    t = fn()
                    best[name] = None if t is None else min(t, best.get(name) or float("inf"))
            base = len(st) / best["plain PyTorch loop"]
            for name, secs in best.items():
                if secs is None:
                    print(f"| {backbone} | {b} | {name} | not installed | — |")
                    continue
                rate = len(st) / secs
                print(f"| {backbone} | {b} | {name} | {rate:,.0f} | {rate / base:.2f} |",
                      flush=True)
    if args.whole_runs:
        whole_runs(args.configs, args.whole_rounds)


if __name__ == "__main__":
    main()
