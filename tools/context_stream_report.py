"""StreamAdapter on a test-time context stream: how the three reset policies compare.

    python tools/context_stream_report.py --seeds 0 1 2 3 4

Runs `configs/stream_adapter/context_stream.yaml` (tokcls4 tasks t0 t1 t2 t1 t3, unannounced)
through the real CLI once per seed (the stream's tasks and examples) and reset policy —
`detected` (the core ShiftDetector on the pre-absorb loss), `none` (the gate forgets) and
`segment` (oracle resets at the true changes, an upper bound) — and prints a Markdown table
of online accuracy, recovery after a change (samples to 90% of the plateau), and the detection
report (false alarms, missed shifts, delay). Needs the Stage A and classification Stage B
exports (see the config's header). Extra arguments after `--` go to every `adaptlab fit`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stream_adapter" / "context_stream.yaml"
POLICIES = ("detected", "none", "segment")


def run_one(policy: str, seed: int, log_dir: str, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "adaptlab.cli", "fit", "--config", str(CONFIG),
            "--model.init_args.reset_on", policy, "--data.stream.init_args.seed", str(seed),
            "--trainer.logger.init_args.save_dir", log_dir,
            "--trainer.logger.init_args.version", f"{policy}_s{seed}",
            "--evaluator.print_table", "false", "--evaluator.figures", "false", *extra]
    if policy == "segment":
        args.append("--trainer.callbacks+=adaptlab.strategies.SegmentReset")
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"context_stream_report: {policy}, seed {seed}: "
                 f"{out.stderr.strip().splitlines()[-1]}")
    doc = json.load(open(Path(log_dir) / "stream_adapter" / f"{policy}_s{seed}" /
                         "metrics.json"))
    report = (doc.get("shift_detection") or {}).get("report") or {}
    return {"acc_online": doc["final"]["acc_online"],
            "recovery": doc["final"]["recovery_samples"],
            "false_alarms": report.get("false_alarms"),
            "missed": report.get("missed_detections"),
            "delay": report.get("detection_delay")}


def fmt(vals: list, digits: int = 3) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--log-dir", default=None, help="where runs write (default: a temp dir)")
    args = ap.parse_args(argv)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="context_stream_")
    rows = {p: [run_one(p, s, log_dir, extra) for s in args.seeds] for p in POLICIES}
    lines = [
        f"`python tools/context_stream_report.py --seeds {' '.join(map(str, args.seeds))}` "
        f"(mean ± sd over {len(args.seeds)} stream seeds)", "",
        "| reset_on | acc_online | recovery (samples) | false alarms | missed | delay (samples) |",
        "|---|---|---|---|---|---|",
    ]
    for p, rs in rows.items():
        col = {k: [r[k] for r in rs] for k in rs[0]}
        lines.append(f"| `{p}`{' (oracle)' if p == 'segment' else ''} | "
                     f"{fmt(col['acc_online'])} | {fmt(col['recovery'], 1)} | "
                     f"{fmt(col['false_alarms'], 1)} | {fmt(col['missed'], 1)} | "
                     f"{fmt(col['delay'], 1)} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
