"""`LearnerSummary`: what the document needs from a learner, read once from the model.

The document builder is pure; this is the one place that asks a model about itself (its
size, its detections, its experts). Any `nn.Module` works: a plain model (an Avalanche
strategy's) has no detector and no experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import metrics
from ..learner import StreamLearner, TestSet


@dataclasses.dataclass
class LearnerSummary:
    """`params_total`/`params_nonzero`: model size; `shift_events`: where its detectors
    fired; `has_experts`; `metrics`: `final.learner` (`metrics.EXPERT_METRICS`);
    `active_experts`: the expert of every observed batch (the expert timeline), or None."""

    params_total: int
    params_nonzero: int
    shift_events: list[int]
    has_experts: bool
    metrics: dict[str, Any]
    active_experts: np.ndarray | None = None


def summarize(
    model: nn.Module, segments: Sequence[int], test_set: TestSet, events: metrics.OnlineEvents,
    *, with_metrics: bool = True,
) -> LearnerSummary:
    """The summary of `model`. `with_metrics=False` leaves `metrics` null: the learner's
    routing pass over every test set is for the end of a run, not every boundary."""
    if not isinstance(model, StreamLearner):
        return LearnerSummary(metrics.params_total([model]), metrics.params_nonzero([model]),
                              [], False, dict.fromkeys(metrics.EXPERT_METRICS))
    sized = model.model_size_modules()
    total, nonzero = metrics.params_total(sized), metrics.params_nonzero(sized)
    learner_metrics = (model.learner_summary(segments, test_set, events) if with_metrics
                       else dict.fromkeys(metrics.EXPERT_METRICS))
    active = model.expert_ids()
    if active is not None:
        active = np.asarray(active.cpu() if torch.is_tensor(active) else active)
    return LearnerSummary(total, nonzero, list(model.shift_events()), model.has_experts,
                          learner_metrics, active)
