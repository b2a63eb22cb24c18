"""The final metrics as a plain-text table for the terminal."""

from __future__ import annotations

import os
from typing import Any


def format_table(doc: dict[str, Any], log_dir: str) -> str:
    """The final metrics and the accuracy matrix of a `metrics.json` document."""
    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    final = doc["final"]
    keys = ["acc_final", "acc_final_weighted", "acc_incremental_avg", "forgetting_chaudhry",
            "forgetting_last", "bwt_gem", "fwt_gem", "acc_online", "tta_online_error",
            "params_total", "params_nonzero"]
    lines = [f"adaptlab — {doc['stream']['name']} ({doc['status']})", "-" * 44]
    lines += [f"{k:<24}{f(final[k]):>20}" for k in keys]
    lines += [f"{k:<24}{f(v):>20}" for k, v in final["learner"].items() if v is not None]
    if doc.get("shift_detection"):
        rep = doc["shift_detection"]["report"]
        lines += [f"{'detection_delay':<24}{f(rep['detection_delay']):>20}",
                  f"{'false_alarms':<24}{f(rep['false_alarms']):>20}",
                  f"{'missed_detections':<24}{f(rep['missed_detections']):>20}"]
    lines += ["-" * 44, "accuracy matrix (rows: after segment, columns: test set)"]
    for r in doc["accuracy_matrix"]["rows"]:
        lines.append(f"  seg {r['after_segment']:>3} | " + " ".join(
            "  —  " if a is None else f"{a:.3f}" for a in r["acc"]))
    lines.append(f"metrics.json: {os.path.join(log_dir, 'metrics.json')}")
    return "\n".join(lines)
