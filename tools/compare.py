"""Compare adaptlab and Avalanche continual learners on one stream: one command, one table.

    python tools/compare.py --stream split --seeds 0 1 2
    python tools/compare.py --stream permuted --n-segments 10 --seeds 0 1 2
    python tools/compare.py --stream configs/finetune/split_digits.yaml    # any config's stream
    python tools/compare.py --stream adaptlab.streams.Permuted \
        --stream-args '{source: signals, source_args: {noise: 2.0}, n_segments: 5}'

Every method gets the same budget: the same samples in the same order, `--repeats` passes per
segment, replay memory `--memory` (TAME: its selector buffer plus one retraining buffer per
segment fill the same M), and an MLP backbone.

For every seed s it builds the stream once (stream seed s, learner seed s) and runs, in this
process:
- adaptlab `Finetune`, `Replay` (reservoir memory M, task-free) and `Joint` (the i.i.d. upper
  bound) through a Lightning Trainer with the `StreamEvaluator`, `--repeats` passes per segment;
- adaptlab `TAME` through the same Trainer, on the same data, with the learner settings of
  `--tame-config` (default: `configs/tame/<split|permuted>_digits.yaml` on digits,
  `configs/tame/split_signals.yaml`, TAME's frozen defaults, elsewhere): on Split
  `labels: local`, and its class-incremental accuracy (`final.learner.acc_class_il`, right
  expert and right label) is the number compared with the baselines' `acc_final`;
- where Avalanche is importable, Avalanche's `Naive`, `Replay` (M), `EWC`, `LwF`, `GDumb` (M)
  and `ER_ACE` (M), boundary-aware, in Avalanche's own training loop on
  `stream_to_avalanche(...)` of the same samples (one pass per experience, `train_epochs` =
  passes), with `segment_matrix_metrics` writing the same `metrics.json`.

Every baseline has the same MLP (D-`--hidden`-C, the same seeded initialisation) and SGD
settings. Each run writes `metrics.json` and `run.json` under
`--out/<name>/seed<s>/<method>/`; compare.py adds a `compare` block (method label, wall
seconds of the run, settings) to `run.json`. The table is then built only from those files
(`--table-only` rebuilds it from an earlier run) and is printed as Markdown and written to
`--out/<name>/table.md`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NATIVE = ["Finetune", "Replay", "Joint", "TAME"]
SHORTCUTS = ("split", "permuted")
AVALANCHE = ["Naive", "Replay", "EWC", "LwF", "GDumb", "ER_ACE"]
LABELS = {"ER_ACE": "ER-ACE"}


def avalanche_available() -> bool:
    try:
        importlib.import_module("avalanche.training.supervised")
    except ImportError:
        return False
    return True


def method_key(name: str) -> tuple[str, str]:
    """`Finetune` -> ("adaptlab", "Finetune"); `av:Replay` -> ("avalanche", "Replay")."""
    if name.startswith("av:"):
        strat = name[3:]
        if strat not in AVALANCHE:
            raise SystemExit(f"--methods: unknown Avalanche strategy {strat!r} ({AVALANCHE})")
        return "avalanche", strat
    if name not in NATIVE:
        raise SystemExit(f"--methods: unknown method {name!r} (adaptlab: {NATIVE}; "
                         f"Avalanche: {['av:' + a for a in AVALANCHE]})")
    return "adaptlab", name


def label_of(backend: str, name: str) -> str:
    return f"{'adaptlab' if backend == 'adaptlab' else 'Avalanche'} {LABELS.get(name, name)}"


def slug(backend: str, name: str) -> str:
    return f"{backend}_{name}"


# --------------------------------------------------------------------------- configuration


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise SystemExit(f"compare.py: no config file at {str(path)!r}")
    return yaml.safe_load(path.read_text()) or {}


def stream_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The stream to compare on: `split`/`permuted` (digits, as in the TAME digits configs), a
    config file (its `data.stream`), or a stream class path with `--stream-args`."""
    import yaml

    if args.stream in SHORTCUTS:
        path = ROOT / "configs" / "tame" / f"{args.stream}_digits.yaml"
        stream = _read_yaml(path)["data"]["stream"]
        params = dict(stream["init_args"])
        if args.stream == "permuted":
            params["n_segments"] = args.n_segments
        label = args.stream
    elif args.stream.endswith((".yaml", ".yml")):
        path = Path(args.stream)
        stream = (_read_yaml(path).get("data") or {}).get("stream")
        if not isinstance(stream, dict) or "class_path" not in stream:
            raise SystemExit(f"compare.py: {args.stream} has no data.stream.class_path")
        params = dict(stream.get("init_args") or {})
        label = path.stem
    else:
        stream = {"class_path": args.stream}
        params = {}
        label = args.stream.rsplit(".", 1)[-1].lower()
    extra = yaml.safe_load(args.stream_args) if args.stream_args else {}
    if not isinstance(extra, dict):
        raise SystemExit(f"--stream-args: expected a mapping, got {args.stream_args!r}")
    params |= extra
    class_path = stream["class_path"]
    if "." not in class_path:
        class_path = f"adaptlab.streams.{class_path}"
    if params.get("source") not in (None, "digits"):
        from adaptlab.streams.sources import source_name

        name = source_name(params["source"])
        label = label if label.endswith(name) else f"{label}_{name}"
    return {"class_path": class_path, "params": params, "label": args.name or label}


def tame_config(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """TAME's learner settings from `--tame-config`, read here so they live in one place.
    Default: the digits config of the same kind for the digits shortcuts (the paper's pinned
    choices), `configs/tame/split_signals.yaml` (TAME's frozen defaults) for any other stream."""
    if args.tame_config:
        path = Path(args.tame_config)
    elif args.stream in SHORTCUTS:
        path = ROOT / "configs" / "tame" / f"{args.stream}_digits.yaml"
    else:
        path = ROOT / "configs" / "tame" / "split_signals.yaml"
    cfg = _read_yaml(path)
    try:
        shown = str(path.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(path)
    return {
        "path": shown,
        "model": dict(cfg["model"]["init_args"]),
        "batches_per_step": int((cfg.get("data") or {}).get("batches_per_step", 50)),
    }


def stream_params(args: argparse.Namespace, spec: dict[str, Any], seed: int, *,
                  tame: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """The stream's parameters for one method: the same samples, seed and passes for all
    (equal budget); on Split, TAME gets local labels (its protocol) and the baselines global
    ones. `--tame-repeats` alone breaks the equal budget, and the caption says so."""
    p = dict(spec["params"])
    p["seed"] = seed
    if args.max_samples_per_segment is not None:
        p["max_samples_per_segment"] = args.max_samples_per_segment
        p["test_samples_per_segment"] = args.max_samples_per_segment
    if spec["class_path"].endswith(".Split"):
        p["labels"] = "local" if tame else "global"
    p["repeats"] = args.repeats
    if tame and args.tame_repeats is not None:
        p["repeats"] = args.tame_repeats
    if repeats is not None:
        p["repeats"] = repeats
    return p


def build_stream(spec: dict[str, Any], params: dict[str, Any]):
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**params).build()


def tame_memory(args: argparse.Namespace, tcfg: dict[str, Any], stream) -> dict[str, int]:
    """TAME's buffers within the baselines' memory M, at one expert per segment: a retraining
    buffer C_p per segment (its config's, at most half of M shared out) and the selector buffer
    C_s with the rest, so C_s + segments x C_p = M (TAME's `memory.selector_capacity` and
    `memory.retrain_capacity`)."""
    k = len(stream.segments)
    memory = tcfg["model"].get("memory") or {}
    c_p = min(int(memory.get("retrain_capacity", 200)), (args.memory // 2) // k)
    c_s = args.memory - c_p * k
    if c_s < stream.n_classes:
        raise SystemExit(
            f"--memory {args.memory}: too small for TAME on {k} segments "
            f"(retraining buffers of {c_p} leave {c_s} for the selector)"
        )
    return {"selector_capacity": c_s, "retrain_capacity": c_p}


def mlp(stream, hidden: int, seed: int) -> torch.nn.Module:
    """The baselines' backbone, initialised as `StreamLearner.build_backbone` does."""
    from adaptlab.models import build_model
    from adaptlab.seeding import seeded

    with seeded(seed * 1_000_003):
        return build_model("mlp", stream.input_shape, stream.n_classes, hidden=(hidden,))


# --------------------------------------------------------------------------- runs


def _annotate(run_dir: Path, info: dict[str, Any]) -> None:
    """Add the `compare` block to run.json (metrics.json stays as the evaluator wrote it)."""
    from adaptlab.jsonio import to_jsonable, write_json_atomic

    path = run_dir / "run.json"
    run = json.loads(path.read_text()) if path.exists() else {}
    run["compare"] = info
    write_json_atomic(str(path), to_jsonable(run))


def run_native(name: str, stream, seed: int, run_dir: Path, args: argparse.Namespace,
               tcfg: dict[str, Any]) -> float:
    """One adaptlab learner through a Lightning Trainer with the evaluator."""
    import pytorch_lightning as pl

    from adaptlab import strategies
    from adaptlab.data import StreamDataModule
    from adaptlab.evaluation import StreamEvaluator

    pl.seed_everything(seed, verbose=False)
    kw = {"input_shape": stream.input_shape, "n_classes": stream.n_classes,
          "batch_size": stream.batch_size, "seed": seed}
    if name == "TAME":
        memory = {**(tcfg["model"].get("memory") or {}), **tame_memory(args, tcfg, stream)}
        learner = strategies.TAME(**{**tcfg["model"], "memory": memory, **kw})
        batches_per_step = tcfg["batches_per_step"]
    else:
        extra = {"memory_size": args.memory} if name == "Replay" else {}
        learner = getattr(strategies, name)(
            backbone="mlp", backbone_args={"hidden": [args.hidden]}, optimizer="sgd",
            lr=args.lr, **extra, **kw)
        batches_per_step = 50
    ev = StreamEvaluator(print_table=False, figures=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[ev], accelerator="cpu",
                         default_root_dir=str(run_dir))
    dm = StreamDataModule(stream, batches_per_step=batches_per_step, eval_batch_size=1024)
    t = time.perf_counter()
    trainer.fit(learner, datamodule=dm)
    return time.perf_counter() - t


def avalanche_kwargs(name: str, args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    return {"Naive": {}, "Replay": {"mem_size": args.memory},
            "EWC": {"ewc_lambda": args.ewc_lambda, "mode": "separate"},
            "LwF": {"alpha": args.lwf_alpha, "temperature": args.lwf_temperature},
            "GDumb": {"mem_size": args.memory},
            "ER_ACE": {"mem_size": args.memory, "batch_size_mem": batch_size}}[name]


# Replay's loader draws its memory batches in the loader's order and GDumb trains on its
# class-grouped memory only, so these two shuffle (seeded); the others keep the stream order.
AVALANCHE_SHUFFLE = {"Replay", "GDumb"}


def run_avalanche(name: str, stream, passes: int, seed: int, run_dir: Path,
                  args: argparse.Namespace) -> float:
    import pytorch_lightning as pl
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin

    from adaptlab.avalanche import segment_matrix_metrics, stream_to_avalanche

    bm = stream_to_avalanche(stream)
    pl.seed_everything(seed, verbose=False)
    model = mlp(stream, args.hidden, seed)
    seg = segment_matrix_metrics(stream=stream, log_dir=str(run_dir))
    strat = getattr(supervised, name)(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=stream.batch_size,
        train_epochs=passes, eval_mb_size=1024, device="cpu",
        evaluator=EvaluationPlugin(seg, loggers=[]),
        **avalanche_kwargs(name, args, stream.batch_size))
    shuffle = name in AVALANCHE_SHUFFLE
    t = time.perf_counter()
    strat.eval(bm.test_stream)  # the init row, as the native evaluator's init_eval
    for exp in bm.train_stream:
        strat.train(exp, shuffle=shuffle, num_workers=0)
        strat.eval(bm.test_stream)
    return time.perf_counter() - t


def run_all(args: argparse.Namespace, methods: list[tuple[str, str]]) -> list[Path]:
    spec = stream_spec(args)
    tcfg = tame_config(args, spec)
    base = Path(args.out) / spec["label"]
    dirs = []
    streams: dict[tuple[int, str], Any] = {}

    def get(seed: int, key: str, params: dict[str, Any]):
        if (seed, key) not in streams:
            streams[seed, key] = build_stream(spec, params)
        return streams[seed, key]

    for seed in args.seeds:
        for backend, name in methods:
            run_dir = base / f"seed{seed}" / slug(backend, name)
            shutil.rmtree(run_dir, ignore_errors=True)  # no stale files from an older run
            run_dir.mkdir(parents=True)
            if backend == "adaptlab":
                tame = name == "TAME"
                params = stream_params(args, spec, seed, tame=tame)
                stream = get(seed, "tame" if tame else "baseline", params)
                secs = run_native(name, stream, seed, run_dir, args, tcfg)
                settings: dict[str, Any] = {"passes": params["repeats"]}
                if tame:
                    settings["config"] = tcfg["path"]
                    settings |= tame_memory(args, tcfg, stream)
                else:
                    settings |= {"hidden": args.hidden, "lr": args.lr}
                    if name == "Replay":
                        settings["memory"] = args.memory
            else:
                # One pass per experience; Avalanche repeats it as `train_epochs` = passes, so
                # memories hold distinct samples (the stream's passes repeat the same order).
                params = stream_params(args, spec, seed, repeats=1)
                stream = get(seed, "avalanche", params)
                secs = run_avalanche(name, stream, args.repeats, seed, run_dir, args)
                settings = {"passes": args.repeats, "train_epochs": args.repeats,
                            "hidden": args.hidden, "lr": args.lr,
                            "shuffle": name in AVALANCHE_SHUFFLE,
                            **avalanche_kwargs(name, args, stream.batch_size)}
            _annotate(run_dir, {"method": label_of(backend, name), "backend": backend,
                                "name": name, "seed": seed, "wall_s": secs,
                                "input_shape": list(stream.input_shape),
                                "stream_params": params, "settings": settings})
            print(f"[compare] {spec['label']} seed {seed} {label_of(backend, name)}: "
                  f"{secs:.1f} s", file=sys.stderr, flush=True)
            dirs.append(run_dir)
    return dirs


# --------------------------------------------------------------------------- the table


def read_run(run_dir: Path) -> dict[str, Any]:
    """The values of one row, from metrics.json and run.json only."""
    doc = json.loads((run_dir / "metrics.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    info = run.get("compare", {})
    final = doc["final"]
    learner = final.get("learner") or {}
    kind = doc["stream"]["kind"]
    is_tame = learner.get("n_experts") is not None
    if is_tame:
        acc, within = learner.get("acc_class_il"), learner.get("acc_task_inferred")
    else:
        acc = final.get("acc_final")
        # Permuted: every segment has the same label set, so within-task is acc_final.
        # Split with global labels: it would need outputs masked to the segment's classes,
        # which metrics.json does not hold.
        within = acc if kind == "permuted" else None
    wall = info.get("wall_s")
    if wall is None and run.get("started_at") and run.get("finished_at"):
        from datetime import datetime

        wall = (datetime.fromisoformat(run["finished_at"])
                - datetime.fromisoformat(run["started_at"])).total_seconds()
    backend = doc["backend"]
    method = info.get("method") or (
        f"Avalanche {backend.split(':', 1)[1]}" if backend.startswith("avalanche")
        else f"adaptlab {run.get('learner', '?')}")
    return {
        "method": method, "seed": info.get("seed", run.get("seed")), "status": doc["status"],
        "acc": acc, "within": within, "forgetting": final.get("forgetting_chaudhry"),
        "experts": learner.get("n_experts"), "params": final.get("params_nonzero"),
        "params_total": final.get("params_total"), "wall": wall,
        "selector": learner.get("selector_acc"),
        "detection": (doc.get("shift_detection") or {}).get("report"),
        "stream": doc["stream"], "info": info,
    }


def _mean_std(values: list[Any], fmt: str) -> str:
    vals = [float(v) for v in values if v is not None]
    if not vals or len(vals) < len(values):
        return "—"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(vals), fmt)}"


def build_table(run_dirs: list[Path], args: argparse.Namespace) -> str:
    rows = [read_run(d) for d in run_dirs]
    order: list[str] = []
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] not in by_method:
            order.append(r["method"])
        by_method.setdefault(r["method"], []).append(r)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    lines = [caption(rows, seeds, args), "",
             "| method | final avg acc (class-IL) | task-inferred acc | forgetting (Chaudhry) "
             "| experts | non-zero params | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in order:
        rs = by_method[m]
        bad = [r["status"] for r in rs if r["status"] != "completed"]
        name = m + (f" ({', '.join(sorted(set(bad)))})" if bad else "")
        lines.append(
            f"| {name} | {_mean_std([r['acc'] for r in rs], '.3f')} "
            f"| {_mean_std([r['within'] for r in rs], '.3f')} "
            f"| {_mean_std([r['forgetting'] for r in rs], '.3f')} "
            f"| {_mean_std([r['experts'] for r in rs], '.1f')} "
            f"| {_mean_std([r['params'] for r in rs], ',.0f')} "
            f"| {_mean_std([r['wall'] for r in rs], '.1f')} |")
    tame = [r for r in rows if r["experts"] is not None]
    if tame:
        lines += ["", tame_notes(tame)]
    return "\n".join(lines)


def caption(rows: list[dict[str, Any]], seeds: list[int], args: argparse.Namespace) -> str:
    st = rows[0]["stream"]
    base = next((r for r in rows if r["info"].get("backend") == "adaptlab"
                 and r["experts"] is None), rows[0])
    n_seg = len(st["segments"])
    parts = [f"**{st['name']}** ({st['kind']}, {n_seg} segments, batch {st['batch_size']}), "
             f"seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds. "
             f"Finals are fractions; forgetting is Chaudhry's (max earlier row − last row, "
             f"over segments before the last); wall time is the run's own loop "
             f"(evaluations included), {torch.get_num_threads()} torch thread(s)."]
    s = base["info"].get("settings", {})
    if s.get("hidden") is not None:
        shape = "x".join(str(d) for d in base["info"].get("input_shape") or ["D"])
        parts.append(f"Baselines: MLP {shape}-{s['hidden']}-{st.get('n_classes', 'C')}, the same "
                     f"seeded initialisation, SGD lr {s['lr']} (no momentum), "
                     f"{s['passes']} passes per segment, memory M = "
                     f"{args.memory if args is not None else '?'} samples.")
    av = [r for r in rows if r["info"].get("backend") == "avalanche"]
    if av:
        hp = {}
        for r in av:
            hp[r["info"]["name"]] = r["info"].get("settings", {})
        bits = []
        for name, st_ in hp.items():
            extra = {k: v for k, v in st_.items() if k not in (
                "passes", "train_epochs", "hidden", "lr", "shuffle")}
            shown = ", ".join(f"{k} {v}" for k, v in extra.items())
            bits.append(LABELS.get(name, name) + (f" ({shown})" if shown else "")
                        + (", shuffled" if st_.get("shuffle") else ""))
        epochs = next(iter(hp.values())).get("train_epochs")
        parts.append(
            "Avalanche 0.6 strategies are boundary-aware (they are told where experiences "
            "end) and run in Avalanche's own loop on `stream_to_avalanche` of the same "
            f"samples, one experience per segment, train_epochs = passes = {epochs}, "
            "train_mb_size = batch, same backbone and lr: " + "; ".join(bits) + ".")
    tame = [r for r in rows if r["experts"] is not None]
    if tame:
        info = tame[0]["info"]
        sp, ts = info.get("stream_params", {}), info.get("settings", {})
        parts.append(
            f"TAME: task-free, settings from `{ts.get('config', '?')}`, "
            f"{sp.get('repeats', '?')} passes per segment"
            + (f", labels {sp['labels']}" if "labels" in sp else "")
            + f", memory: selector buffer {ts.get('selector_capacity', '?')} + "
            f"{ts.get('retrain_capacity', '?')} retraining samples per expert "
            f"(= M at one expert per segment), MLP experts; its first column is `acc_class_il` "
            "(routed to the right expert *and* right label), its second `acc_task_inferred` "
            "(label right, expert as routed); forgetting is over its own accuracy matrix.")
        base_passes = s.get("passes") if s else None
        if base_passes is not None and sp.get("repeats") != base_passes:
            parts.append(f"**Unequal budget**: TAME had {sp.get('repeats')} passes per segment, "
                         f"the baselines {base_passes}.")
    if st["kind"] == "split":
        parts.append("Within-task accuracy of the class-IL baselines is not in their "
                     "metrics.json (it needs outputs masked to the segment's classes): —.")
    elif st["kind"] == "permuted":
        parts.append("On Permuted every segment has the same label set, so a baseline's "
                     "within-task accuracy is its final accuracy.")
    return " ".join(parts)


def tame_notes(tame: list[dict[str, Any]]) -> str:
    sel = _mean_std([r["selector"] for r in tame], ".3f")
    det = [r["detection"] or {} for r in tame]
    fa = [d.get("false_alarms") for d in det]
    missed = [d.get("missed_detections") for d in det]
    delay = [None if d.get("detection_delay") is None else d["detection_delay"]
             / r["stream"]["batch_size"] for d, r in zip(det, tame)]
    return (f"TAME: selector accuracy {sel}; shift detection: delay {_mean_std(delay, '.2f')} "
            f"batches, false alarms {_mean_std(fa, '.1f')}, missed {_mean_std(missed, '.1f')}; "
            f"dense parameters {_mean_std([r['params_total'] for r in tame], ',.0f')}.")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", default="split",
                    help="split | permuted (digits), a config file (its data.stream), or a "
                         "stream class path (with --stream-args)")
    ap.add_argument("--stream-args", default=None,
                    help="YAML mapping merged into the stream's init_args, e.g. "
                         "'{source: signals, source_args: {noise: 2.0}}'")
    ap.add_argument("--name", default=None, help="output folder name (default: from --stream)")
    ap.add_argument("--tame-config", default=None,
                    help="TAME's config (default: configs/tame/<split|permuted>_digits.yaml on "
                         "digits, configs/tame/split_signals.yaml elsewhere)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-segments", type=int, default=10, help="Permuted: segments")
    ap.add_argument("--repeats", type=int, default=5,
                    help="passes per segment for every method (Avalanche: train_epochs)")
    ap.add_argument("--tame-repeats", type=int, default=None,
                    help="TAME's passes per segment if they must differ (unequal budget)")
    ap.add_argument("--memory", type=int, default=500, help="replay memory M (samples)")
    ap.add_argument("--hidden", type=int, default=128, help="baseline MLP hidden width")
    ap.add_argument("--lr", type=float, default=0.05, help="baseline SGD learning rate")
    ap.add_argument("--ewc-lambda", type=float, default=100.0)
    ap.add_argument("--lwf-alpha", type=float, default=1.0)
    ap.add_argument("--lwf-temperature", type=float, default=2.0)
    ap.add_argument("--max-samples-per-segment", type=int, default=None,
                    help="subsample each segment's train and test sets (smoke tests)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"subset: {NATIVE} and av:<{'|'.join(AVALANCHE)}> "
                         "(default: all; Avalanche ones where it is installed)")
    ap.add_argument("--out", default="/tmp/adaptlab_compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true",
                    help="rebuild the table from the files of an earlier run")
    args = ap.parse_args(argv)
    threads, show = torch.get_num_threads(), warnings.showwarning
    torch.set_num_threads(args.threads)
    warnings.showwarning = lambda *a, **k: None  # Avalanche re-enables its deprecations
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)
        warnings.showwarning = show


def _main(args: argparse.Namespace) -> str:
    import pytorch_lightning  # noqa: F401  (it sets its loggers' levels when first imported)

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.methods is None:
        names = NATIVE + (["av:" + a for a in AVALANCHE] if avalanche_available() else [])
    else:
        names = args.methods
    methods = [method_key(n) for n in names]
    if any(b == "avalanche" for b, _ in methods) and not avalanche_available():
        print("[compare] Avalanche is not installed: skipping its strategies", file=sys.stderr)
        methods = [m for m in methods if m[0] != "avalanche"]

    base = Path(args.out) / stream_spec(args)["label"]
    if args.table_only:
        dirs = [base / f"seed{s}" / slug(b, n) for s in args.seeds for b, n in methods]
        dirs = [d for d in dirs if (d / "metrics.json").exists()]
        if not dirs:
            raise SystemExit(f"no metrics.json under {base}")
    else:
        t = time.perf_counter()
        dirs = run_all(args, methods)
        print(f"[compare] all runs: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    text = build_table(dirs, args)
    base.mkdir(parents=True, exist_ok=True)
    (base / "table.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
