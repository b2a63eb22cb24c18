"""Markdown table of finished runs, read only from their metrics.json and run.json.

    python tools/table.py lightning_logs            # every run under a folder
    python tools/table.py lightning_logs/replay_split_digits/version_0
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
    found = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "metrics.json")):
            found.append(p)
        else:
            found += sorted(os.path.dirname(m) for m in glob.glob(
                os.path.join(p, "**", "metrics.json"), recursive=True))
    return found


def fmt(v: object) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def table(dirs: list[str]) -> str:
    lines = ["| learner | stream | " + " | ".join(c for _, c in COLUMNS) + " | status |",
             "|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for d in dirs:
        doc = json.load(open(os.path.join(d, "metrics.json")))
        run = json.load(open(os.path.join(d, "run.json"))) if os.path.exists(
            os.path.join(d, "run.json")) else {}
        cells = [fmt(doc["final"].get(k)) for k, _ in COLUMNS]
        lines.append(f"| {run.get('learner', '?')} | {doc['stream']['name']} | "
                     + " | ".join(cells) + f" | {doc['status']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders or folders containing runs")
    args = ap.parse_args()
    dirs = runs(args.paths)
    if not dirs:
        raise SystemExit(f"no metrics.json under {args.paths}")
    print(table(dirs))


if __name__ == "__main__":
    main()
