"""The evaluation document, built once for both back ends: pure functions of what a run
measured (a `Record`), what the learner says of itself (a `LearnerSummary`) and the stream.

`build_document` gives `metrics.json` (`metrics.md` §7); `boundary_scalars`,
`online_scalars` and `final_scalars` give the TensorBoard scalars of the same numbers. The
Lightning callback and the Avalanche metric call these and nothing else computes a metric.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import metrics
from ..jsonio import metrics_document
from ..streams import Stream
from .record import Record
from .summary import LearnerSummary

__all__ = ["boundary_scalars", "build_document", "final_metrics", "final_scalars",
           "matrix_scalars", "online_scalars"]


def matrix_scalars(run: dict[str, Any], stream_name: str = "test") -> dict[str, float | None]:
    """The running accuracy-matrix metrics (a `metrics.running_report`) under the names both
    back ends log."""
    names = {"Top1_Acc_Seen": "acc_final", "Acc_IncrementalAvg": "acc_incremental_avg",
             "Forgetting_Chaudhry": "forgetting_chaudhry", "BWT_GEM": "bwt_gem",
             "BWT_Pairwise": "bwt_pairwise", "FWT_GEM": "fwt_gem"}
    return {f"{tag}/eval_phase/{stream_name}_stream": run[key] for tag, key in names.items()}


def boundary_scalars(st: Stream, record: Record, row: int) -> dict[str, float | None]:
    """The scalars logged at evaluation point `row`: per-segment accuracy, the running
    matrix metrics, and the online accuracy on the segment that just ended."""
    R = record.matrix()
    acc = record.rows[row]["acc"]
    first = list(st.first_rows)
    n = [s.n_test for s in st.segments]
    fl = metrics.forgetting_last_curve(R, first=first)[row]
    run = metrics.running_report(R, upto_row=row, first=first, b=record.init, n=n)
    values: dict[str, float | None] = {
        f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}": a for j, a in enumerate(acc)
    }
    values |= {
        "Top1_Acc_Stream/eval_phase/test_stream": run["acc_final_weighted"],
        "StreamForgetting/eval_phase/test_stream": fl,
        "StreamBWT/eval_phase/test_stream": None if fl is None else -fl,
    }
    values |= matrix_scalars(run)
    ev = record.events.events()
    k = st.row_segments[row]
    seg_acc = metrics.acc_online_per_segment(ev.select(ev.seg == k)).get(k)
    col = st.segment_index[k]
    values[f"Top1_Acc_Online/train_phase/train_stream/Exp{col:03d}"] = seg_acc
    if not st.supervised and seg_acc is not None:
        values[f"TTA_Online_Error/train_phase/train_stream/Exp{col:03d}"] = 1 - seg_acc
    return values


def online_scalars(st: Stream, record: Record, window: int,
                   summary_detections: int | None) -> tuple[list[Any], dict[str, float]]:
    """The windowed online-accuracy point `[position, accuracy]` and the online scalars;
    `summary_detections`: the learner's detection count (None: no detector to report)."""
    tail = record.events.tail(window)
    ev = metrics.OnlineEvents(tail[:, 0], tail[:, 1], tail[:, 2], tail[:, 3])
    win = metrics.acc_online_windowed(ev, window)
    log = record.events
    values = {
        "Top1_Acc_Online/train_phase/train_stream": log.correct / max(1, log.n),
        "Top1_Acc_Online_Window/train_phase/train_stream": win,
    }
    if not st.supervised:
        values["TTA_Online_Error/train_phase/train_stream"] = 1 - log.correct / max(1, log.n)
    if summary_detections is not None:
        values["ShiftDetect_Count/train_phase/train_stream"] = summary_detections
    return [int(tail[-1, 0]), win], values


def final_metrics(st: Stream, record: Record, summary: LearnerSummary, *,
                  tolerance: int | None = None, warmup: int = 0) -> dict[str, Any]:
    """Everything `metrics.json` holds under `final`, `per_segment`, `shift_detection`."""
    R = record.matrix()
    first = list(st.first_rows)
    n = [s.n_test for s in st.segments]
    ev = record.events.events()
    final: dict[str, Any] = dict.fromkeys([
        "acc_final", "acc_final_weighted", "acc_incremental_avg", "forgetting_chaudhry",
        "forgetting_last", "bwt_gem", "bwt_pairwise", "fwt_gem",
    ])
    if len(R):
        full = len(R) == len(st.eval_positions)
        rep = metrics.matrix_report(R, first=first, b=record.init, n=n) if full else (
            metrics.running_report(R, upto_row=len(R) - 1, first=first, b=record.init, n=n)
        )
        final.update(rep)
    final["acc_online"] = metrics.acc_online(ev)
    rec = metrics.recovery_samples(ev, st.eval_positions)
    known = [r for r in rec if r is not None]
    final["recovery_samples"] = float(np.mean(known)) if known else None
    final["recovery_samples_per_occurrence"] = rec
    final["acc_anytime_auc"] = None
    if record.anytime:
        final["acc_anytime_auc"] = metrics.acc_anytime_auc(
            [p for p, _ in record.anytime], np.array([a for _, a in record.anytime]), n=n
        )
    final["tta_online_error"] = None
    final["tta_online_error_mean_domain"] = None
    if not st.supervised:
        final["tta_online_error"] = metrics.tta_online_error(ev)
        final["tta_online_error_mean_domain"] = metrics.tta_online_error_mean_domain(
            ev, {s.id: s.group for s in st.segments}
        )
    final["params_total"] = summary.params_total
    final["params_nonzero"] = summary.params_nonzero
    final["learner"] = summary.metrics

    per_online = metrics.acc_online_per_segment(ev)
    f_ch = metrics.forgetting_chaudhry(R, first=first, per_segment=True) if len(R) else None
    f_last = metrics.forgetting_last(R, first=first, per_segment=True) if len(R) else None
    per_segment = {}
    for j, seg in enumerate(st.segments):
        on = per_online.get(seg.id)
        per_segment[str(seg.id)] = {
            "acc_online": on,
            "forgetting_chaudhry": f_ch[j] if f_ch else None,
            "forgetting_last": f_last[j] if f_last else None,
            "tta_online_error": None if (st.supervised or on is None) else 1 - on,
        }
    detection = None
    detections = summary.shift_events
    if summary.has_experts or detections:
        rep = metrics.detection_report(
            list(st.true_shifts), sorted(detections), len(st), tolerance=tolerance,
            warmup=warmup, batch_size=st.batch_size,
        )
        detection = {"tolerance": rep.tolerance, "warmup": warmup,
                     "detections": sorted(detections), "report": dataclasses.asdict(rep)}
    return {"final": final, "per_segment": per_segment, "shift_detection": detection}


def build_document(st: Stream, record: Record, summary: LearnerSummary, status: str, *,
                   backend: str = "lightning", tolerance: int | None = None,
                   warmup: int = 0) -> dict[str, Any]:
    """The `metrics.json` document (`metrics.md` §7) of a run in state `status`."""
    doc: dict[str, Any] = metrics_document(status, backend=backend) | {
        "stream": {
            **{k: v for k, v in st.describe().items() if k != "params"},
        },
        "accuracy_matrix": {
            "columns": [s.id for s in st.segments],
            "test_sizes": [s.n_test for s in st.segments],
            "init": record.init,
            "rows": record.rows,
        },
    }
    doc |= final_metrics(st, record, summary, tolerance=tolerance, warmup=warmup)
    doc["curves"] = {
        "acc_online_windowed": record.curve,
        "acc_anytime": metrics.acc_anytime_curve(
            [p for p, _ in record.anytime], np.array([a for _, a in record.anytime]),
            n=[s.n_test for s in st.segments],
        ) if record.anytime else [],
    }
    doc["definitions"] = metrics.DEFINITIONS
    return doc


def final_scalars(doc: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, float]]:
    """The end-of-run scalars: `(logged at the last step, paired with the hyper-parameters)`."""
    final = doc["final"]
    values: dict[str, float | None] = {
        "Model_Params_Total/train_phase/train_stream": final["params_total"],
        "Model_Params_NonZero/train_phase/train_stream": final["params_nonzero"],
        "Acc_Anytime_AUC/eval_phase/test_stream": final["acc_anytime_auc"],
    }
    if doc["shift_detection"]:
        rep = doc["shift_detection"]["report"]
        for tag, key in [("Delay", "detection_delay"), ("FalseAlarms", "false_alarms"),
                         ("Missed", "missed_detections"), ("FDR", "false_discovery_rate"),
                         ("MTFA", "mtfa")]:
            values[f"ShiftDetect_{tag}/train_phase/train_stream"] = rep[key]
    scalars = {f"final/{k}": v for k, v in final.items()
               if isinstance(v, (int, float)) and v is not None}
    scalars |= {f"final/learner/{k}": v for k, v in final["learner"].items()
                if isinstance(v, (int, float)) and v is not None}
    return values, scalars
