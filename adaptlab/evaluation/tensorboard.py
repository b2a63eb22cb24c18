"""TensorBoard output of an evaluation: the end-of-run figures and the hyper-parameters
paired with the final metrics."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from .. import figures
from ..streams import Stream
from .record import Record
from .summary import LearnerSummary


def run_figures(st: Stream, record: Record, window: int,
                summary: LearnerSummary) -> dict[str, Figure]:
    """The accuracy matrix, the online accuracy and (expert learners) the expert timeline."""
    R = record.matrix()
    out = {
        "Figures/accuracy_matrix": figures.accuracy_matrix(
            R, [f"{i}: {st.segments[st.segment_index[s]].name}"
                for i, s in enumerate(st.row_segments[: len(R)])],
            [s.name for s in st.segments]),
        "Figures/online_accuracy": figures.online_accuracy(record.curve, st.true_shifts, window),
    }
    if summary.active_experts is not None:
        ev = record.events.events()
        out["Figures/expert_timeline"] = figures.expert_timeline(
            ev.pos, summary.active_experts[: len(ev)], ev.seg, st.true_shifts,
            sorted(summary.shift_events))
    return out


def log_final(logger: Any, hparams: dict[str, Any], scalars: dict[str, float],
              step: int) -> None:
    """Final metrics with the hyper-parameters: TensorBoard's HPARAMS view pairs them (its
    `metrics=`); other loggers get the hyper-parameters, where they take them, and scalars."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(hparams, metrics=scalars)
    else:
        try:
            logger.log_hyperparams(hparams)
        except NotImplementedError:
            pass  # a logger without hyper-parameter support
        logger.log_metrics(scalars, step=step)
    logger.save()
