"""Diff two trees of `metrics.json` files: did a change keep every result?

    python tools/compare_metrics.py BEFORE_DIR AFTER_DIR [--atol 0] [--tensorboard]

Files are paired by their path relative to each root, with Lightning's `version_N` folders
dropped (a rerun into a fresh directory gets another version). Wall-clock fields
(`created_at`, `started_at`, `finished_at`, anything ending in `_seconds` or `_time`) and
the package versions are ignored; every other value must be equal (floats within `--atol`,
default exact). `--tensorboard` also compares the TensorBoard event file next to each
`metrics.json`: every scalar tag with its (step, value) series, and the figure tags. Exit 0
when all pairs match, 1 otherwise (each difference printed with its
JSON path), 2 when a file is missing on one side.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

IGNORED = re.compile(r"(^|/)(created_at|started_at|finished_at|versions|log_dir)$|"
                     r"(_seconds|_time|_s)$")


def _key(root: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(root).parts if not re.fullmatch(r"version_\d+", p)]
    return "/".join(parts)


def collect(root: Path) -> dict[str, Path]:
    """`metrics.json` files under `root`, keyed by their version-free relative path."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("metrics.json"), key=lambda q: q.stat().st_mtime):
        out[_key(root, p)] = p  # several versions of one run: the newest wins
    return out


def diff(a: Any, b: Any, path: str = "", atol: float = 0.0) -> list[str]:
    """Every difference between two JSON values, as `path: a != b` lines."""
    if IGNORED.search(path):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}/{k}"
            if IGNORED.search(sub):
                continue
            if k not in a or k not in b:
                out.append(f"{sub}: only in {'after' if k not in a else 'before'}")
            else:
                out += diff(a[k], b[k], sub, atol)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]", atol)]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= atol else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def tensorboard_summary(run_dir: Path) -> dict[str, Any] | None:
    """Scalars `{tag: [(step, value), …]}` and figure tags of a run's event file(s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        return None
    scalars: dict[str, list[list[float]]] = {}
    images: set[str] = set()
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend([e.step, e.value] for e in acc.Scalars(tag))
        images |= set(acc.Tags()["images"])
    return {"scalars": scalars, "figures": sorted(images)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--atol", type=float, default=0.0, help="float tolerance (default exact)")
    ap.add_argument("--tensorboard", action="store_true",
                    help="also compare the TensorBoard scalars and figure tags")
    args = ap.parse_args(argv)
    before, after = collect(args.before), collect(args.after)
    if not before:
        print(f"no metrics.json under {args.before}", file=sys.stderr)
        return 2
    missing = sorted(set(before) ^ set(after))
    for key in missing:
        print(f"{key}: only in {'before' if key in before else 'after'}")
    bad = 0
    for key in sorted(set(before) & set(after)):
        d = diff(json.loads(before[key].read_text()), json.loads(after[key].read_text()),
                 atol=args.atol)
        if args.tensorboard:
            tb_b, tb_a = (tensorboard_summary(p[key].parent) for p in (before, after))
            d += [f"tensorboard{line}" for line in diff(tb_b, tb_a, atol=args.atol)]
        print(f"{'same' if not d else 'DIFFERENT'}  {key}")
        for line in d[:20]:
            print(f"    {line}")
        if len(d) > 20:
            print(f"    … {len(d) - 20} more")
        bad += bool(d)
    print(f"{len(set(before) & set(after))} compared, {bad} different, {len(missing)} unpaired")
    return 2 if missing else int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
