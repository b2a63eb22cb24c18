"""Shift-detection report: delay / false alarms / misses of every `ShiftDetector` rule.

    python tools/detect_report.py constructed            # (a) loss sequences, all rules
    python tools/detect_report.py tame --seeds 0 1 2     # (b) real TAME runs, generated streams

(a) Constructed loss sequences, one detector channel seeded with ln 2: a learning curve
(ln 2 decaying to the loss level 0.5 over `LEARN` steps), then stationary skewed noise (gamma,
mean 0.5, standard deviation sigma) and, for the shift rows, a step of `shift * sigma` at
`SHIFT_AT`. A detection within `TOLERANCE` steps of the shift is a hit (delay = steps after
the shift), a firing before it a false alarm, no hit a miss; the stationary rows run 5,000
steps without a shift and count every firing as a false alarm.

(b) TAME on generated streams (`adaptlab.streams.from_arrays` sources, `Split` and `Permuted`
schedules; scikit-learn's `make_classification` at several `class_sep` / `flip_y`, and 1-D
sine signals in noise) with the frozen defaults (`TAME()`'s own) and only `test` varied. The
evaluator's detection report gives delay (batches), false alarms, misses; the table also
shows experts vs segments and the accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptlab.detect import TESTS, ShiftDetector  # noqa: E402

LEVEL, LEARN, SHIFT_AT, TOLERANCE, STATIONARY = 0.5, 100, 600, 50, 5000
SIGMAS = (0.02, 0.1, 0.25)  # noise levels (sd of the per-batch loss around LEVEL = 0.5)
SHIFTS = (2.0, 3.0, 6.0)  # shift sizes, in units of the noise sd


def constructed_losses(n: int, sigma: float, shift: float = 0.0, shift_at: int | None = None,
                       seed: int = 0) -> np.ndarray:
    """Per-batch losses: ln 2 decaying to LEVEL over LEARN steps, gamma noise of sd `sigma`
    (losses are positive and right-skewed), plus `shift * sigma` from `shift_at` on."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    mean = LEVEL + (math.log(2) - LEVEL) * np.exp(-t / (LEARN / 5))
    if shift_at is not None:
        mean = mean + shift * sigma * (t >= shift_at)
    shape = (mean / sigma) ** 2  # gamma with this mean and sd sigma
    return rng.gamma(shape, mean / shape)


def firings(det: ShiftDetector, losses: np.ndarray) -> list[int]:
    """Steps at which the single-signal detector fires (it restarts after each firing)."""
    return [t for t, v in enumerate(losses) if det.update(float(v))]


def score(fired: list[int], shift_at: int | None) -> dict[str, Any]:
    """false alarms, and for a shift: the delay of the first firing within TOLERANCE, or a miss."""
    if shift_at is None:
        return {"false_alarms": len(fired), "delay": None, "missed": None}
    before = [t for t in fired if t < shift_at]
    hits = [t - shift_at for t in fired if shift_at <= t < shift_at + TOLERANCE]
    return {"false_alarms": len(before), "delay": hits[0] if hits else None,
            "missed": not hits}


def rule_kwargs(test: str) -> dict[str, Any]:
    """The detector as TAME builds it (W 100, alpha 0.2, grace 20), rule defaults."""
    return {"window": 100, "alpha": 0.2, "grace": 20, "test": test}


def constructed_table(seeds: list[int], tests: tuple[str, ...] = TESTS) -> list[dict[str, Any]]:
    rows = []
    for test in tests:
        for sigma in SIGMAS:
            fa = [score(firings(ShiftDetector(**rule_kwargs(test)),
                                constructed_losses(STATIONARY, sigma, seed=s)), None)
                  for s in seeds]
            row = {"rule": test, "sigma": sigma,
                   "stationary_false_alarms": sum(r["false_alarms"] for r in fa)}
            for shift in SHIFTS:
                res = [score(firings(ShiftDetector(**rule_kwargs(test)), constructed_losses(
                    SHIFT_AT + 2 * TOLERANCE, sigma, shift, SHIFT_AT, seed=s)), SHIFT_AT)
                    for s in seeds]
                delays = [r["delay"] for r in res if r["delay"] is not None]
                row[f"{shift:g}sd"] = {
                    "delay": float(np.mean(delays)) if delays else None,
                    "missed": sum(r["missed"] for r in res),
                    "false_alarms": sum(r["false_alarms"] for r in res)}
            rows.append(row)
    return rows


def print_constructed(rows: list[dict[str, Any]], n_seeds: int) -> None:
    head = " | ".join(f"shift {s:g} sd: delay / FA / miss" for s in SHIFTS)
    print(f"\n(a) constructed sequences, {n_seeds} seeds per cell; delay in steps (mean over "
          f"hits), FA = false alarms before the shift, miss = no firing within {TOLERANCE} "
          f"steps; stationary: firings in {STATIONARY} steps (all seeds)\n")
    print(f"| rule | noise sd | stationary FA | {head} |")
    print("|---|---|---|" + "---|" * len(SHIFTS))
    for r in rows:
        cells = []
        for s in SHIFTS:
            c = r[f"{s:g}sd"]
            d = "-" if c["delay"] is None else f"{c['delay']:.1f}"
            cells.append(f"{d} / {c['false_alarms']} / {c['missed']}")
        print(f"| {r['rule']} | {r['sigma']:g} | {r['stationary_false_alarms']} | "
              + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- (b) TAME runs

DATA = {  # name: (generator, its settings); 10 classes, 40 features, 3,000 samples
    "tab-easy": ("tabular", {"class_sep": 2.0, "flip_y": 0.01}),
    "tab-mid": ("tabular", {"class_sep": 1.0, "flip_y": 0.05}),
    "tab-hard": ("tabular", {"class_sep": 0.6, "flip_y": 0.1}),
    "sig-mid": ("signals", {"noise": 1.0}),
    "sig-hard": ("signals", {"noise": 1.6}),
}
SCHEDULES = {
    "split": ("Split", {"classes_per_segment": 2, "labels": "local"}),
    "recurring": ("Split", {"classes_per_segment": 2, "labels": "local",
                            "order": [0, 1, 2, 1, 3]}),
    "permuted": ("Permuted", {"n_segments": 5}),
}
DEVELOPMENT = ("tab-mid", "permuted", 100)  # the one stream (and data seed) defaults were chosen on
PASSES, BATCH = 5, 10


def generated(kind: str, seed: int, n: int = 3000, **kw: Any):
    """A 10-class, 40-feature source (standardised on the train split), 70/30 split."""
    from sklearn.datasets import make_classification

    from adaptlab.streams import from_arrays

    rng = np.random.default_rng(seed)
    if kind == "tabular":
        x, y = make_classification(n_samples=n, n_features=40, n_informative=10, n_redundant=5,
                                   n_classes=10, n_clusters_per_class=1, random_state=seed,
                                   **kw)
    else:  # class c: a sine of frequency c + 1, random phase and amplitude, in noise
        y = rng.permutation(np.arange(n) % 10)
        t = np.linspace(0.0, 1.0, 40)
        phase = rng.uniform(0, 1, (n, 1))
        amp = rng.uniform(0.5, 1.5, (n, 1))
        x = amp * np.sin(2 * np.pi * (y[:, None] + 1) * (t[None] + phase)) \
            + kw["noise"] * rng.normal(size=(n, 40))
    cut = int(0.7 * n)
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-8
    x = (x - mu) / sd
    return from_arrays(x[:cut], y[:cut], x[cut:], y[cut:], name=f"{kind}{seed}",
                       params={"kind": kind, "seed": seed, **kw})


def iid_accuracy(source, pairs: bool) -> float:
    """Test accuracy of a one-hidden-layer MLP (64) trained i.i.d.: on all 10 classes, or
    (`pairs`) the mean over the split's 2-class segments."""
    from sklearn.neural_network import MLPClassifier

    x, y = source.x_train.flatten(1).numpy(), source.y_train.numpy()
    xt, yt = source.x_test.flatten(1).numpy(), source.y_test.numpy()
    groups = [(2 * i, 2 * i + 1) for i in range(5)] if pairs else [tuple(range(10))]
    accs = []
    for g in groups:
        m, mt = np.isin(y, g), np.isin(yt, g)
        clf = MLPClassifier((64,), max_iter=300, random_state=0).fit(x[m], y[m])
        accs.append(clf.score(xt[mt], yt[mt]))
    return float(np.mean(accs))


def tame_run(data: str, schedule: str, seed: int, **tame_kw: Any) -> dict[str, Any]:
    """TAME (frozen defaults + `tame_kw`) on one generated stream; the evaluator's numbers."""
    import pytorch_lightning as pl
    import torch

    from adaptlab import streams
    from adaptlab.data import StreamDataModule
    from adaptlab.evaluation import StreamEvaluator
    from adaptlab.strategies import TAME

    torch.set_num_threads(1)
    kind, gen_kw = DATA[data]
    source = generated(kind, seed, **gen_kw)
    cls, sched_kw = SCHEDULES[schedule]
    stream = getattr(streams, cls)(source=source, batch_size=BATCH, repeats=PASSES, seed=seed,
                                   **sched_kw).build()
    pl.seed_everything(seed, verbose=False)
    learner = TAME(input_shape=stream.input_shape, n_classes=stream.n_classes,
                   batch_size=stream.batch_size, seed=seed, backbone="mlp",
                   backbone_args={"hidden": [64]}, **tame_kw)
    ev = StreamEvaluator(print_table=False, figures=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[ev], accelerator="cpu",
                             default_root_dir=tmp)
        t0 = time.time()
        trainer.fit(learner, datamodule=StreamDataModule(stream, batches_per_step=50))
        doc = ev.document(trainer, learner, "completed")
    det = doc["shift_detection"]["report"]
    lrn = doc["final"]["learner"]
    return {
        "data": data, "schedule": schedule, "seed": seed, "test": learner.detector.test,
        "segments": len(doc["stream"]["true_shifts"]) + 1,
        "experts": lrn["n_experts"],
        "delay": None if det["detection_delay"] is None else det["detection_delay"] / BATCH,
        "false_alarms": det["false_alarms"], "missed": det["missed_detections"],
        "acc_online": doc["final"]["acc_online"],
        "acc_task_oracle": lrn.get("acc_task_oracle"),
        "acc_task_inferred": lrn.get("acc_task_inferred", lrn.get("acc_within_task")),
        "acc_class_il": lrn["acc_class_il"],
        "iid": iid_accuracy(source, pairs=schedule != "permuted"),
        "seconds": round(time.time() - t0, 1),
    }


def print_tame(rows: list[dict[str, Any]]) -> None:
    print("\n(b) TAME on generated streams (batch 10, 5 passes, frozen defaults, only `test` "
          "varied); delay in batches (mean), iid = i.i.d. MLP accuracy on a segment's task\n")
    print("| data | schedule | seed | rule | experts / segments | delay | FA | miss | iid | "
          "oracle expert | inferred | class-IL | online |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    for r in rows:
        print(f"| {r['data']} | {r['schedule']} | {r['seed']} | {r['test']} | "
              f"{r['experts']} / {r['segments']} | {f(r['delay'])} | {r['false_alarms']} | "
              f"{r['missed']} | {f(r['iid'])} | {f(r['acc_task_oracle'])} | "
              f"{f(r['acc_task_inferred'])} | {f(r['acc_class_il'])} | {f(r['acc_online'])} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["constructed", "tame", "all"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tests", nargs="+", default=list(TESTS), choices=TESTS)
    ap.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TAME overrides for (b), dotted keys, YAML values (e.g. "
                         "experts.lr=0.05 detector.window=50)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    if args.part in ("constructed", "all"):
        t0 = time.time()
        out["constructed"] = constructed_table(args.seeds, tuple(args.tests))
        print_constructed(out["constructed"], len(args.seeds))
        print(f"\n({time.time() - t0:.0f} s)")
    if args.part in ("tame", "all"):
        import yaml

        extra: dict[str, Any] = {}
        for key, value in (kv.split("=", 1) for kv in args.set):
            *groups, name = key.split(".")
            node = extra
            for g in groups:
                node = node.setdefault(g, {})
            node[name] = yaml.safe_load(value)
        rows = []
        for data in args.data:
            for schedule in args.schedules:
                for seed in args.seeds:
                    for test in args.tests:
                        detector = {"test": test, **extra.get("detector", {})}
                        rows.append(tame_run(data, schedule, seed,
                                             **{**extra, "detector": detector}))
                        print(json.dumps(rows[-1]), flush=True)
        out["tame"] = rows
        print_tame(rows)
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
