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
    python tools/bench.py --clock cpu          # per-step times in this thread's CPU time
    python tools/bench.py --whole-runs         # also every committed digits config end to end
    python tools/bench.py --tta                # also the TTA learners (needs the source export)

`--tta` adds a table of the test-time learners (configs/tta/*_digits.yaml settings, the
lenet_bn source export, the continual corrupted-digits stream of tta_report.py with each
corruption's pool passed once: 12 x 432 samples, batch 64), each against a plain PyTorch loop
doing the same work on the same batches (see `TTA_REFERENCES`), and against a plain forward.

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


# The per-step timer: wall time, or this thread's CPU time (`--clock cpu`: on a CPU shared with
# other jobs, time spent waiting for a core is not counted; torch runs on this one thread).
_clock = time.perf_counter


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(st: Stream, backbone: str, lr: float, device: str) -> float:
    model = _model(st, backbone).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, b = st.x.to(device), st.y.to(device), st.batch_size
    _sync(device)
    t = _clock()
    for s in range(0, len(y), b):
        loss = F.cross_entropy(model(x[s : s + b]), y[s : s + b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return _clock() - t


def plain_replay_loop(st: Stream, backbone: str, lr: float, device: str,
                      memory: int = 500) -> float:
    """Replay's work written as a plain loop: each step trains on [batch; as many samples
    drawn from a reservoir memory] (one forward over 2B rows), then offers the batch to the
    memory (Algorithm R, one decision per item)."""
    import random

    model = _model(st, backbone).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, b = st.x.to(device), st.y.to(device), st.batch_size
    mem_x = torch.zeros(memory, *x.shape[1:], device=device)
    mem_y = torch.zeros(memory, dtype=torch.int64, device=device)
    inp = torch.empty(2 * b, *x.shape[1:], device=device)
    tgt = torch.empty(2 * b, dtype=torch.int64, device=device)
    idx = torch.empty(b, dtype=torch.int64, device=device)
    gen, rng, seen = torch.Generator(device).manual_seed(0), random.Random(0), 0
    _sync(device)
    t = _clock()
    for s in range(0, len(y), b):
        xb, yb = x[s : s + b], y[s : s + b]
        if seen and len(yb) == b:
            inp[:b].copy_(xb)
            tgt[:b].copy_(yb)
            torch.randint(0, min(seen, memory), (b,), generator=gen, out=idx)
            torch.index_select(mem_x, 0, idx, out=inp[b:])
            torch.index_select(mem_y, 0, idx, out=tgt[b:])
            loss = F.cross_entropy(model(inp), tgt)
        else:
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for i in range(len(yb)):
            j = seen if seen < memory else rng.randrange(seen + 1)
            if j < memory:
                mem_x[j] = xb[i]
                mem_y[j] = yb[i]
            seen += 1
    _sync(device)
    return _clock() - t


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
        self.t0 = _clock()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        _sync(pl_module.device.type)
        self.seconds = _clock() - self.t0


def adaptlab_run(st: Stream, learner_cls, device: str, batches_per_step: int = 50,
                 prepare: Callable | None = None, **learner_args) -> float:
    learner = learner_cls(input_shape=st.input_shape, n_classes=st.n_classes,
                          batch_size=st.batch_size, seed=0, **learner_args)
    if prepare is not None:
        prepare(learner)
    return fit_timed(st, learner, device, batches_per_step)


def fit_timed(st: Stream, learner: pl.LightningModule, device: str,
              batches_per_step: int = 50) -> float:
    """Seconds of `learner`'s training on `st` through Lightning with the evaluator."""
    from adaptlab.evaluation import StreamEvaluator

    timer = _TrainTimer()
    evaluator = StreamEvaluator(init_eval=False, figures=False, print_table=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         callbacks=[timer, evaluator], num_sanity_val_steps=0,
                         default_root_dir=os.path.join(tempfile.gettempdir(),
                                                       f"adaptlab_bench_{os.getpid()}"))
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
    t = _clock()
    strategy.train(exp, shuffle=False, num_workers=0)
    _sync(device)
    return _clock() - t


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
        "plain PyTorch replay loop (Replay's work)":
            lambda: plain_replay_loop(st, backbone, lr, device),
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


# -- test-time adaptation -----------------------------------------------------------------------
TTA_METHODS = ("noadapt", "bn", "tent", "eata", "sar", "cotta", "lame")
TTA_REFERENCES = {
    "noadapt": "plain forward, BatchNorm on the source statistics (eval mode), no grad",
    "bn": "plain forward, BatchNorm on the batch's statistics, no grad",
    "tent": "plain TENT step: forward, mean entropy, backward, Adam on the BN affine params",
    "eata": "the plain TENT step (EATA's sample selection and Fisher penalty are its own work)",
    "sar": "plain SAM step on the mean entropy: two forward/backward passes, SGD (momentum) "
           "on the BN affine params (SAR's sample filtering left out)",
    "cotta": "plain CoTTA step: anchor forward, teacher forward (32 augmented ones when the "
             "anchor is unsure, the same torchvision augmentations), student forward/backward, "
             "Adam on all weights, EMA teacher, stochastic restore",
    "lame": "plain eval forward, then the same kNN affinity and Laplacian solver functions",
}


def _tta_tools():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # called once per row: put tools/ on the path once
        sys.path.insert(0, here)
    import tta_report

    return tta_report


def tta_stream():
    """tta_report's continual corrupted-digits stream, each corruption's pool passed once."""
    tr = _tta_tools()
    return tr.build_stream({**tr.stream_args({}, 0), "repeats": 1})


def _batch_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Plain PyTorch's test-batch normalisation: BatchNorm in train mode without running
    statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return model.train()


def plain_tta(method: str, st: Stream, device: str) -> float:
    """Seconds of the plain PyTorch loop that does `method`'s work (`TTA_REFERENCES`)."""
    import copy

    from adaptlab.strategies.tta import (
        cotta_augmentations,
        entropy,
        knn_affinity,
        laplacian_optimization,
        load_source,
        norm_affine,
    )

    tr = _tta_tools()
    cfg = tr.config(method)["model"]["init_args"]
    model, _ = load_source(str(tr.ROOT / cfg["source"]), input_shape=st.input_shape,
                           n_classes=st.n_classes, backbone=None, backbone_args=None)
    model = model.to(device)
    if method in ("noadapt", "lame"):
        model.eval().requires_grad_(False)
    else:
        _batch_statistics(model)
    affine = norm_affine(model)
    if method in ("tent", "eata", "sar"):
        model.requires_grad_(False)
        for p in affine:
            p.requires_grad_(True)

    if method in ("noadapt", "bn"):
        def step(xb):
            with torch.no_grad():
                return model(xb)
    elif method in ("tent", "eata"):
        opt = torch.optim.Adam(affine, lr=cfg.get("lr", 1e-3))

        def step(xb):
            logits = model(xb)
            loss = entropy(logits).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif method == "sar":
        opt = torch.optim.SGD(affine, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9))
        rho = cfg.get("rho", 0.05)

        def step(xb):
            opt.zero_grad(set_to_none=True)
            entropy(model(xb)).mean().backward()
            with torch.no_grad():
                grads = [p.grad for p in affine]
                scale = rho / (torch.stack([g.norm() for g in grads]).norm() + 1e-12)
                climb = torch._foreach_mul(grads, scale)
                torch._foreach_add_(affine, climb)
            opt.zero_grad(set_to_none=True)
            entropy(model(xb)).mean().backward()
            with torch.no_grad():
                torch._foreach_sub_(affine, climb)
            opt.step()
    elif method == "cotta":
        teacher = copy.deepcopy(model).requires_grad_(False)
        anchor = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.get("lr", 1e-3))
        augment = cotta_augmentations(st.input_shape, cfg.get("hflip", True))
        m, thr = cfg.get("teacher_momentum", 0.999), cfg.get("confidence_threshold", 0.92)
        n_aug, restore = cfg.get("n_augmentations", 32), cfg.get("restore_prob", 0.01)

        def step(xb):
            with torch.no_grad():
                if float(anchor(xb).softmax(1).amax(1).mean()) >= thr:
                    target = teacher(xb)
                else:
                    target = torch.stack([teacher(augment(xb)) for _ in range(n_aug)]).mean(0)
            student = model(xb)
            loss = -(target.softmax(1) * student.log_softmax(1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for t, p in zip(teacher.parameters(), model.parameters()):
                    t.mul_(m).add_(p, alpha=1 - m)
                for p, p0 in zip(model.parameters(), anchor.parameters()):
                    p.copy_(torch.where(torch.rand(p.shape, device=device) < restore, p0, p))
    elif method == "lame":
        feats: list[torch.Tensor] = []
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.register_forward_pre_hook(lambda _m, args: feats.append(args[0]))
        knn, lam = cfg.get("knn", 5), cfg.get("bound_lambda", 1.0)

        def step(xb):
            with torch.no_grad():
                feats.clear()
                logits = model(xb)
                f = F.normalize(feats.pop().flatten(1), dim=-1)
                w = knn_affinity(f, knn)
                return laplacian_optimization(-logits.log_softmax(-1), 0.5 * (w + w.t()), lam,
                                              cfg.get("max_steps", 100))
    else:
        raise ValueError(f"bench: no plain reference for TTA method {method!r}")

    batches = st.x.to(device).split(st.batch_size)
    _sync(device)
    t = _clock()
    for xb in batches:
        step(xb)
    _sync(device)
    return _clock() - t


def adaptlab_tta(method: str, st: Stream, device: str) -> float:
    """The TTA learner of configs/tta/<method>_digits.yaml through Lightning and the
    evaluator, as `adaptlab fit` runs it."""
    return fit_timed(st, _tta_tools().make_learner(method, st, 0), device)


def tta_table(methods: list[str], rounds: int, device: str) -> None:
    tr = _tta_tools()
    source = tr.ROOT / tr.config("noadapt")["model"]["init_args"]["source"]
    if not source.is_file():
        print(f"\nTTA rows skipped: no source export at {source} "
              "(adaptlab fit --config configs/tta/source_digits.yaml)")
        return
    st = tta_stream()
    runs: dict[str, Callable[[], float]] = {}
    for m in methods:
        runs[f"plain {m}"] = lambda m=m: plain_tta(m, st, device)
        runs[m] = lambda m=m: adaptlab_tta(m, st, device)
    plain_tta("noadapt", st, device)  # warm-up
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = min(fn(), best.get(name, float("inf")))
    forward = best.get("plain noadapt") or plain_tta("noadapt", st, device)
    print(f"\nTest-time adaptation ({len(st):,} corrupted-digits samples, batch "
          f"{st.batch_size}, lenet_bn source; best of {rounds} interleaved rounds). "
          "`× plain` is the ratio of samples/s to the plain PyTorch loop doing the same work "
          "(below); `cost` is time per batch over a plain eval forward:\n")
    print("| method | samples/s | plain loop samples/s | × plain | cost (× forward) |\n"
          "|---|---:|---:|---:|---:|")
    for m in methods:
        rate, plain = len(st) / best[m], len(st) / best[f"plain {m}"]
        print(f"| {tr.NAMES[m]} | {rate:,.0f} | {plain:,.0f} | {rate / plain:.2f} | "
              f"{best[m] / forward:.1f} |", flush=True)
    print("\nPlain references:")
    for m in methods:
        print(f"- {tr.NAMES[m]}: {TTA_REFERENCES[m]}")


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


def _setup(args: argparse.Namespace) -> None:
    global _clock
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    if args.clock == "cpu":
        if args.device == "cuda" or args.threads != 1:
            raise SystemExit("bench: --clock cpu times one CPU thread (--device cpu --threads 1)")
        _clock = time.thread_time
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="passes per segment")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 128])
    ap.add_argument("--backbones", nargs="+", default=["mlp", "lenet"], choices=list(BACKBONES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="per-step timer: wall time, or the thread's CPU time (a shared machine)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    ap.add_argument("--quick", action="store_true", help="MLP, batch 10 only")
    ap.add_argument("--whole-runs", action="store_true",
                    help="also time every committed digits config end to end")
    ap.add_argument("--whole-only", action="store_true", help="only the whole-run table")
    ap.add_argument("--whole-rounds", type=int, default=1)
    ap.add_argument("--tta", action="store_true",
                    help="also the TTA learners against plain TTA loops (a few minutes)")
    ap.add_argument("--tta-only", action="store_true", help="only the TTA table")
    ap.add_argument("--tta-methods", nargs="+", default=list(TTA_METHODS), choices=TTA_METHODS)
    ap.add_argument("--configs", nargs="+", default=["configs/*/*digits*.yaml"],
                    help="globs of the whole-run configs (relative to the repository)")
    args = ap.parse_args()
    if args.whole_only:
        whole_runs(args.configs, args.whole_rounds)
        return
    if args.tta_only:
        _setup(args)
        tta_table(args.tta_methods, args.rounds, args.device)
        return
    if args.quick:
        args.batch_sizes, args.backbones = [10], ["mlp"]
    _setup(args)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else (
        platform.processor() or platform.machine())
    print(f"Split-Digits x {args.repeats} passes per segment; torch {torch.__version__}, "
          f"{args.device} ({dev_name}), {args.threads} CPU thread(s), best of {args.rounds} "
          f"interleaved rounds, {args.clock} clock")
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
    if args.tta:
        tta_table(args.tta_methods, args.rounds, args.device)
    if args.whole_runs:
        whole_runs(args.configs, args.whole_rounds)


if __name__ == "__main__":
    main()
