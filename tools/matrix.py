"""The benchmark matrix beyond digits: every method on generated streams nobody tuned on.

    python tools/matrix.py --seeds 0 1 2                 # the whole matrix (~15-30 min, 1 thread)
    python tools/matrix.py --only signals_easy/split     # one cell
    python tools/matrix.py --seeds 0 1 2 --table-only    # the table again from the files

Families (sources of `streams/generated.py`, difficulty fixed here before any run):
`tabular_easy`/`tabular_hard` (make_classification, class_sep 2.0 / 0.4 with 10 % label noise)
and `signals_easy`/`signals_hard` (1-D signals, noise 1.0 / 2.0). Schedules: `split` (5 x 2
classes), `permuted` (5 feature permutations), `recurring` (split, segments 0 1 2 0 3 1 4, each
occurrence on its own part of the data) and `shared` (split into 5 tasks of 3 classes where
neighbouring tasks share one class). TAME's defaults were chosen on another stream
(`tools/detect_report.py`'s DEVELOPMENT: make_classification, 40 features, permuted), so every
cell here is held out; none was tuned on.

Each cell runs `tools/compare.py` with the same budget for every method (passes, memory, MLP
backbone, batch) and the table reads only the runs' metrics.json / run.json. Columns: Joint's
accuracy is the i.i.d. bound of the same samples; TAME's first accuracy is class-IL (right
expert and right label, comparable with the baselines' class-IL accuracy), then experts found
vs distinct segments, missed shifts and false alarms of its detector.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import compare  # noqa: E402

FAMILIES: dict[str, dict[str, Any]] = {
    "tabular_easy": {"source": "tabular", "source_args": {"class_sep": 2.0}},
    "tabular_hard": {"source": "tabular", "source_args": {"class_sep": 0.4, "flip_y": 0.1}},
    "signals_easy": {"source": "signals", "source_args": {"noise": 1.0}},
    "signals_hard": {"source": "signals", "source_args": {"noise": 2.0}},
}
SCHEDULES: dict[str, dict[str, Any]] = {
    "split": {"class_path": "adaptlab.streams.Split", "args": {"classes_per_segment": 2}},
    "permuted": {"class_path": "adaptlab.streams.Permuted", "args": {"n_segments": 5}},
    "recurring": {"class_path": "adaptlab.streams.Split",
                  "args": {"classes_per_segment": 2, "order": [0, 1, 2, 0, 3, 1, 4],
                           "recurrence": "split"}},
    "shared": {"class_path": "adaptlab.streams.Split",
               "args": {"segments": [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [8, 9, 0]],
                        "shared_classes": "partition"}},
}
METHODS = ["Joint", "Finetune", "Replay", "TAME", "av:Replay"]


def cells(only: list[str] | None) -> list[tuple[str, str]]:
    out = [(f, s) for f in FAMILIES for s in SCHEDULES]
    if only:
        unknown = [o for o in only if tuple(o.split("/", 1)) not in out]
        if unknown:
            raise SystemExit(f"--only: unknown cells {unknown}; e.g. {out[0][0]}/{out[0][1]}")
        out = [c for c in out if f"{c[0]}/{c[1]}" in only]
    return out


def compare_args(family: str, schedule: str, args: argparse.Namespace,
                 table_only: bool = False) -> list[str]:
    sched = SCHEDULES[schedule]
    stream_args = {**FAMILIES[family], **sched["args"], "batch_size": 10}
    methods = [m for m in METHODS if m != "av:Replay" or compare.avalanche_available()]
    argv = ["--stream", sched["class_path"], "--stream-args", json.dumps(stream_args),
            "--name", f"{family}__{schedule}", "--seeds", *map(str, args.seeds),
            "--repeats", str(args.repeats), "--memory", str(args.memory),
            "--out", args.out, "--methods", *methods]
    if args.tame_config:
        argv += ["--tame-config", args.tame_config]
    return argv + (["--table-only"] if table_only else [])


def summary(args: argparse.Namespace, todo: list[tuple[str, str]]) -> str:
    def mean(values: list[Any], fmt: str) -> str:
        vals = [float(v) for v in values if v is not None]
        if not vals or len(vals) < len(values):
            return "—"
        m = statistics.fmean(vals)
        return format(m, fmt) + (f" ± {format(statistics.stdev(vals), fmt)}"
                                 if len(vals) > 1 else "")

    lines = [
        f"Benchmark matrix: seeds {', '.join(map(str, args.seeds))}, mean ± std; every method "
        f"{args.repeats} passes per segment, memory {args.memory}, batch 10, MLP backbones; "
        f"TAME settings from {args.tame_config or 'configs/tame/split_signals.yaml'} (frozen "
        "defaults chosen on tools/detect_report.py's development stream; no cell was tuned "
        "on).", "",
        "| stream | Joint (i.i.d.) | Finetune | Replay | Avalanche Replay | TAME class-IL "
        "| TAME task-inferred | TAME experts (segments) | missed shifts | false alarms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family, schedule in todo:
        base = Path(args.out) / f"{family}__{schedule}"
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in args.seeds:
            for d in sorted((base / f"seed{seed}").glob("*")):
                if (d / "metrics.json").exists():
                    r = compare.read_run(d)
                    rows.setdefault(r["method"], []).append(r)
        if not rows:
            continue

        def col(method: str, key: str = "acc", fmt: str = ".3f",
                rows: dict[str, list[dict[str, Any]]] = rows) -> str:
            return mean([r[key] for r in rows[method]], fmt) if method in rows else "—"

        tame = rows.get("adaptlab TAME", [])
        det = [r["detection"] or {} for r in tame]
        segments = len(tame[0]["stream"]["segments"]) if tame else None
        name = f"{family}/{schedule}"
        lines.append(
            f"| {name} | {col('adaptlab Joint')} | {col('adaptlab Finetune')} "
            f"| {col('adaptlab Replay')} | {col('Avalanche Replay')} | {col('adaptlab TAME')} "
            f"| {col('adaptlab TAME', 'within')} "
            f"| {col('adaptlab TAME', 'experts', '.1f')} ({segments}) "
            f"| {mean([d.get('missed_detections') for d in det], '.1f')} "
            f"| {mean([d.get('false_alarms') for d in det], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--repeats", type=int, default=5, help="passes per segment, every method")
    ap.add_argument("--memory", type=int, default=500)
    ap.add_argument("--tame-config", default=None)
    ap.add_argument("--only", nargs="+", default=None, help="cells, e.g. signals_hard/permuted")
    ap.add_argument("--out", default="/tmp/adaptlab_matrix")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--write", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    todo = cells(args.only)
    if not args.table_only:
        for family, schedule in todo:
            print(f"[matrix] {family}/{schedule}", file=sys.stderr, flush=True)
            compare.main(compare_args(family, schedule, args))
    text = summary(args, todo)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
