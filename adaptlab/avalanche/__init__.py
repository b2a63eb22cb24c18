"""The Avalanche 0.6 bridge (README, "Avalanche"): the only package that imports Avalanche.

- `strategy`: `StreamLearnerStrategy` runs any adaptlab `StreamLearner` as a
  `SupervisedTemplate`: one Avalanche training iteration is one `observe(x, y)`; experience
  boundaries never reach the learner (task-free stays task-free).
- `convert`: `stream_from_avalanche` / `stream_to_avalanche` convert benchmarks both ways, so
  adaptlab learners and Avalanche strategies run on exactly the same samples in the same order.
- `metrics`: `segment_matrix_metrics()` records adaptlab's accuracy matrix and online events
  inside Avalanche's `EvaluationPlugin` (they also work on online and recurring streams, where
  Avalanche's own forgetting emits nothing) and writes `metrics.json` with the Lightning
  evaluator's own document builder (`adaptlab.evaluation.document`).
- `forgetting`: `ForgettingPlugin` drives a forgetting regime from Avalanche events.
- Checkpoints are Lightning-format dicts (Avalanche's own dill checkpointing fails on this stack).
"""

from __future__ import annotations

try:
    import avalanche  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "adaptlab.avalanche needs Avalanche (avalanche-lib 0.6): "
        "pip install 'adaptlab[avalanche]'"
    ) from err

from .convert import online_stream, stream_from_avalanche, stream_to_avalanche
from .forgetting import ForgettingPlugin
from .metrics import SegmentMatrixMetrics, accuracy_matrix_from_metrics, segment_matrix_metrics
from .strategy import IncompatiblePluginError, StreamLearnerStrategy

__all__ = [
    "ForgettingPlugin", "IncompatiblePluginError", "SegmentMatrixMetrics", "StreamLearnerStrategy",
    "accuracy_matrix_from_metrics", "online_stream", "segment_matrix_metrics",
    "stream_from_avalanche", "stream_to_avalanche",
]
