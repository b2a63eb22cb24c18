"""Markdown table of finished runs, read only from their metrics.json and run.json.

    python tools/table.py lightning_logs            # every completed run under a folder
    python tools/table.py lightning_logs --all      # also running, failed and interrupted ones
    python tools/table.py lightning_logs/replay_split_digits/version_0

Every run writes the same metrics.json frame (`adaptlab.jsonio.metrics_document`); runs
without a stream (StreamAdapter's episodic stages) show — in the stream columns.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

COLUMNS = [
    ("acc_final", "final acc"), ("forgetting_chaudhry", "forgetting"), ("bwt_gem", "BWT"),
    ("acc_incremental_avg", "avg incr. acc"), ("acc_online", "online acc"),
    ("params_nonzero", "non-zero params"),
]


def runs(paths: list[str]) -> list[str]:
    """Every folder holding a metrics.json at or below the given paths (a stray metrics.json
    in a parent folder does not hide the runs beneath it)."""
    found: list[str] = []
    for p in paths:
        found += sorted(os.path.dirname(m) for m in glob.glob(
            os.path.join(p, "**", "metrics.json"), recursive=True))
    return list(dict.fromkeys(found))


def fmt(v: object) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def table(dirs: list[str], root: str | None = None, include_unfinished: bool = False) -> str:
    lines = ["| run | learner | stream | " + " | ".join(c for _, c in COLUMNS) + " | status |",
             "|---|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for d in dirs:
        doc = json.load(open(os.path.join(d, "metrics.json")))
        if doc.get("status") not in ("completed", "stopped_early") and not include_unfinished:
            continue
        run = json.load(open(os.path.join(d, "run.json"))) if os.path.exists(
            os.path.join(d, "run.json")) else {}
        final = doc.get("final") or {}
        cells = [fmt(final.get(k)) for k, _ in COLUMNS]
        name = os.path.relpath(d, root) if root and os.path.relpath(d, root) != "." else d
        stream = (doc.get("stream") or {}).get("name", "—")
        lines.append(f"| {name} | {run.get('learner', '?')} | {stream} | "
                     + " | ".join(cells) + f" | {doc.get('status', '?')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or folders containing runs")
    ap.add_argument("--all", action="store_true",
                    help="also list runs that are running, failed or interrupted")
    args = ap.parse_args(argv)
    dirs = runs(args.paths)
    if not dirs:
        raise SystemExit(f"no metrics.json under {args.paths}")
    root = args.paths[0] if len(args.paths) == 1 and os.path.isdir(args.paths[0]) else None
    text = table(dirs, root, args.all)
    print(text)
    return text


if __name__ == "__main__":
    main()
