"""The test-time adaptation table: every TTA learner on corrupted digits, several seeds.

Each run is the CLI's path in-process (`StreamDataModule` -> learner -> `StreamEvaluator`, a
TensorBoard log and `metrics.json` per run under `lightning_logs/tta_report/`); the learners'
settings are read from `configs/tta/<method>_digits.yaml`, the stream from
`configs/tta/tent_digits.yaml` with the variant's overlay. Needs the source export:

    adaptlab fit --config configs/tta/source_digits.yaml
    python tools/tta_report.py                       # table + plot: 3 streams x 7 methods x 5 seeds
    python tools/tta_report.py --recurring           # shift-aware vs no vs periodic resets
    python tools/tta_report.py --cost                # time per adapted batch vs a plain forward

Writes `tools/results/tta_report.md` (+ `.json`) and `tools/results/tta_online_error.png`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results"
METHODS = ("noadapt", "bn", "tent", "eata", "sar", "cotta", "lame")
NAMES = {"noadapt": "Source", "bn": "BN-1", "tent": "TENT", "eata": "EATA", "sar": "SAR",
         "cotta": "CoTTA", "lame": "LAME"}
VARIANTS = {"continual": {}, "mixed": {"schedule": "mixed"},
            "correlated": {"label_shift": {"delta": 0.1, "slots": 7}}}
RECURRING = {"corruptions": ["contrast", "brightness", "fog"], "order": [0, 1, 2, 0, 1, 2]}


def quiet() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def config(method: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / "tta" / f"{method}_digits.yaml").read_text())


def learner_class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def stream_args(variant: dict[str, Any], seed: int) -> dict[str, Any]:
    args = dict(config("tent")["data"]["stream"]["init_args"])
    args.update(variant, seed=seed)
    return args


def build_stream(args: dict[str, Any]):
    from adaptlab.streams import Corrupted

    return Corrupted(**args).build()


def make_learner(method: str, stream, seed: int, **override: Any):
    model = config(method)["model"]
    kwargs = {**model["init_args"], **override}
    kwargs["source"] = str(ROOT / kwargs["source"])
    return learner_class(model["class_path"])(
        input_shape=stream.input_shape, n_classes=stream.n_classes,
        batch_size=stream.batch_size, seed=seed, **kwargs)


class BatchErrors:
    """Per-batch online error (for the plot), computed from the scored predictions."""

    def __init__(self, stream) -> None:
        import pytorch_lightning as pl

        outer = self
        self.errors: list[float] = []

        class _CB(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                preds = outputs["preds"].cpu()
                b = stream.batch_size
                start = trainer.datamodule.samples_consumed - len(preds)
                y = stream.y[start:start + len(preds)]
                for i in range(0, len(preds), b):
                    outer.errors.append(float((preds[i:i + b] != y[i:i + b]).float().mean()))

        self.callback = _CB()


def run(learner, stream, name: str, curve: bool = False) -> tuple[dict[str, Any], list[float]]:
    """One pass through the real loop; the run's metrics.json and its per-batch errors."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from adaptlab.data import StreamDataModule
    from adaptlab.evaluation import StreamEvaluator

    errs = BatchErrors(stream)
    logger = TensorBoardLogger(str(ROOT / "lightning_logs" / "tta_report"), name=name,
                               version=0, default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=1, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[StreamEvaluator(print_table=False, figures=False),
                   *([errs.callback] if curve else [])])
    trainer.fit(learner, datamodule=StreamDataModule(stream, batches_per_step=50))
    doc = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    return doc, errs.errors


def domain_errors(doc: dict[str, Any], stream) -> dict[str, float]:
    """Online error per domain (corruption), pooled over the domain's occurrences."""
    out: dict[str, list[float]] = {}
    for seg in stream.segments:
        e = doc["per_segment"][str(seg.id)]["tta_online_error"]
        if e is not None:
            out.setdefault(seg.group, []).append(e)
    return {k: float(np.mean(v)) for k, v in out.items()}


def fmt(values: list[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def table(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"seeds": args.seeds, "streams": {}}
    curves: dict[str, list[float]] = {}
    shifts: list[int] = []
    batch = 64
    for variant in args.streams:
        per: dict[str, dict[str, Any]] = {m: {"online": [], "domains": []} for m in args.methods}
        for seed in range(args.seeds):
            stream = build_stream(stream_args(VARIANTS[variant], seed))
            for m in args.methods:
                t0 = time.perf_counter()
                plot = variant == "continual" and seed == 0
                doc, errs = run(make_learner(m, stream, seed), stream,
                                f"{variant}/{m}/seed{seed}", curve=plot)
                per[m]["online"].append(doc["final"]["tta_online_error"])
                per[m]["domains"].append(domain_errors(doc, stream))
                if plot:
                    curves[m], shifts, batch = errs, list(stream.true_shifts), stream.batch_size
                print(f"{variant:10s} seed {seed} {NAMES[m]:7s} online error "
                      f"{100 * per[m]['online'][-1]:5.1f}  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        results["streams"][variant] = per
    if curves:
        plot_curves(curves, shifts, batch, RESULTS / "tta_online_error.png")
    return results


def plot_curves(curves: dict[str, list[float]], shifts: list[int], batch: int,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    k = 5
    for m, errs in curves.items():
        e = np.convolve(errs, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(e)) + k - 1, 100 * e, label=NAMES[m], lw=1.2)
    for s in shifts:
        ax.axvline(s / batch, color="grey", ls=":", lw=0.8)
    ax.set_xlabel(f"batch ({batch} images; dotted: domain changes)")
    ax.set_ylabel(f"online error % (mean of {k} batches)")
    ax.set_title("Continual corrupted digits, severity 5, seed 0")
    ax.legend(ncol=7, fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recurring(args: argparse.Namespace) -> dict[str, Any]:
    """The same learner with no reset, periodic resets and shift-aware resets, on a stream
    whose domains come back (A B C A B C) and on the continual stream."""
    out: dict[str, Any] = {}
    for stream_name, variant in (("recurring", RECURRING), ("continual", {})):
        for m in ("tent", "eata"):
            for reset in ("none", "periodic", "shift"):
                rows = []
                for seed in range(args.seeds):
                    stream = build_stream(stream_args(variant, seed))
                    kw: dict[str, Any] = {"reset": reset}
                    if reset == "periodic":
                        kw["reset_every"] = args.reset_every
                    doc, _ = run(make_learner(m, stream, seed, **kw), stream,
                                 f"resets/{stream_name}/{m}_{reset}/seed{seed}")
                    det = doc.get("shift_detection") or {}
                    rep = det.get("report") or {}
                    rows.append({"online": doc["final"]["tta_online_error"],
                                 "detections": det.get("detections"),
                                 "false_alarms": rep.get("false_alarms"),
                                 "detected": rep.get("true_positives"),
                                 "true_shifts": list(stream.true_shifts)})
                    print(f"{stream_name} {NAMES[m]:6s} reset {reset:8s} seed {seed} online "
                          f"error {100 * rows[-1]['online']:5.1f} detections "
                          f"{rows[-1]['detections']}", flush=True)
                out[f"{stream_name}/{m}/{reset}"] = rows
    return out


def cost(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per adapted batch of each method over a plain forward of the same backbone
    (one thread, batch 64, the learners' own `observe`, Lightning not involved)."""
    from adaptlab.strategies.tta import Source

    stream = build_stream(stream_args({}, 0))
    x = stream.x[:64].float()
    if x.max() > 1.5:
        x = x / 255.0
    y = torch.full((len(x),), -100)  # what an unsupervised stream hands the learner
    out: dict[str, float] = {}

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    plain = make_learner("noadapt", stream, 0)
    assert isinstance(plain, Source)
    net = plain.model
    with torch.no_grad():
        base = timed(lambda: net(x), 200)
    out["forward_ms"] = 1000 * base
    for m in args.methods:
        learner = make_learner(m, stream, 0)
        opt = learner.configure_optimizers()
        learner.optimizers = lambda opt=opt: opt  # no Trainer: hand the optimizer over
        learner._fast_update = True  # plain backward and step, as on one device
        t = timed(lambda learner=learner: learner.observe(x, y), 30 if m == "cotta" else 100)
        out[m] = t / base
        print(f"cost {NAMES[m]:7s} {1000 * t:7.2f} ms per batch = {t / base:5.1f}x forward",
              flush=True)
    return out


def write_report(results: dict[str, Any], path: Path) -> str:
    lines = []
    streams = results.get("streams", {})
    if streams:
        methods = list(next(iter(streams.values())))
        lines += ["| method | " + " | ".join(streams) + " |",
                  "|---|" + "---:|" * len(streams)]
        for m in methods:
            lines.append(f"| {NAMES[m]} | " + " | ".join(
                fmt(streams[v][m]["online"]) for v in streams) + " |")
        if "continual" in streams:
            per = streams["continual"]
            doms = list(per[methods[0]]["domains"][0])
            short = [d.replace("_noise", "").replace("_blur", " blur").replace(
                "_compression", "") for d in doms]
            lines += ["", "Continual, per domain (online error %, mean ± std over seeds):", "",
                      "| method | " + " | ".join(short) + " |",
                      "|---|" + "---:|" * len(doms)]
            for m in methods:
                lines.append(f"| {NAMES[m]} | " + " | ".join(
                    fmt([d[k] for d in per[m]["domains"]]) for k in doms) + " |")
    rec = results.get("recurring")
    if rec:
        lines += ["", "Resets: online error %, and the detector against the true domain changes "
                  "(recurring: contrast, brightness, fog, twice; continual: the stream above):",
                  "", "| stream | learner | reset | online error | detections / true changes | "
                  "delay of a detection (samples) | false alarms |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for key, rows in rec.items():
            stream_name, m, reset = key.split("/") if key.count("/") == 2 else (
                "recurring", *key.split("/"))
            det = ["—", "—", "—"]
            if reset == "shift":
                det = [f"{np.mean([len(r['detections'] or []) for r in rows]):.1f} / "
                       f"{len(rows[0]['true_shifts'])}",
                       _mean([d for r in rows for d in _delays(r)]),
                       _mean([r["false_alarms"] for r in rows])]
            lines.append(f"| {stream_name} | {NAMES[m]} | {reset} | "
                         f"{fmt([r['online'] for r in rows])} | " + " | ".join(det) + " |")
    c = results.get("cost")
    if c:
        lines += ["", f"Cost: time per adapted batch (64 images) / plain forward "
                  f"({c['forward_ms']:.2f} ms), one CPU thread:", "",
                  "| " + " | ".join(NAMES[m] for m in c if m != "forward_ms") + " |",
                  "|" + "---:|" * (len(c) - 1),
                  "| " + " | ".join(f"{v:.1f}x" for m, v in c.items() if m != "forward_ms")
                  + " |"]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


def _delays(row: dict[str, Any]) -> list[int]:
    """Samples from the last true change to each detection (detections before any change,
    false alarms, are left out)."""
    out = []
    for d in row["detections"] or []:
        before = [s for s in row["true_shifts"] if s <= d]
        if before:
            out.append(d - before[-1])
    return out


def _mean(values: list[Any]) -> str:
    known = [v for v in values if v is not None]
    return f"{np.mean(known):.0f}" if known else "—"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--streams", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--recurring", action="store_true", help="only the reset comparison")
    p.add_argument("--reset-every", type=int, default=20, help="periodic reset (batches)")
    p.add_argument("--cost", action="store_true", help="only the cost table")
    p.add_argument("--out", default=str(RESULTS / "tta_report.md"))
    args = p.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    if not (ROOT / "artifacts" / "tta_source_digits.pt").is_file():
        sys.exit("tta_report: no source model; run `adaptlab fit --config "
                 "configs/tta/source_digits.yaml` first")
    os.chdir(ROOT)
    out = Path(args.out)
    results: dict[str, Any] = {}
    if out.with_suffix(".json").is_file():  # keep the other parts of an earlier report
        results = json.loads(out.with_suffix(".json").read_text())
    if args.cost:
        results["cost"] = cost(args)
    elif args.recurring:
        results["recurring"] = recurring(args)
    else:
        results.update(table(args))
    print(write_report(results, out))


if __name__ == "__main__":
    main()
