"""adaptlab's accuracy-matrix metrics inside Avalanche's `EvaluationPlugin`.

The metric records what the Lightning evaluator records (rows of R, online events) from
Avalanche's events, and builds `metrics.json` with the same pure document builder
(`adaptlab.evaluation.document`), so both back ends report identical numbers.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from .. import metrics
from ..evaluation.document import build_document, matrix_scalars
from ..evaluation.files import RunFiles, now
from ..evaluation.record import EventLog, Record
from ..evaluation.summary import summarize
from ..streams import Stream
from .convert import as_float, segment_of

_EXP_TAG = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream(?:/Task\d+)?/Exp(\d+)$")


def accuracy_matrix_from_metrics(all_metrics: dict[str, Any], *, n_segments: int) -> np.ndarray:
    """R from an `EvaluationPlugin.get_all_metrics()`: row i is the i-th value of every
    `Top1_Acc_Exp/eval_phase/test_stream[/TaskNNN]/ExpNNN` history."""
    cols: dict[int, list[float]] = {}
    for name, (_, values) in all_metrics.items():
        m = _EXP_TAG.match(name)
        if m:
            cols[int(m.group(1))] = list(values)
    if sorted(cols) != list(range(n_segments)):
        raise ValueError(f"accuracy_matrix_from_metrics: found experiences {sorted(cols)}, "
                         f"expected 0..{n_segments - 1}")
    rows = max(len(v) for v in cols.values())
    R = np.full((rows, n_segments), np.nan)
    for j, v in cols.items():
        R[: len(v), j] = v
    return R


class SegmentMatrixMetrics(PluginMetric[dict]):
    """adaptlab's accuracy-matrix metrics inside Avalanche's `EvaluationPlugin`.

    R is keyed by segment, not by experience index: the row label is the training segment
    taken at `before_training_exp`, a new row starts when it changes, and while it stays the
    last evaluation wins. So online sub-experiences, recurring and gradual schedules give the
    same R as the Lightning evaluator, where Avalanche's `forgetting_metrics` emits nothing.
    Online accuracy is scored from `mb_output` before each update (test-then-train).

    Args:
        stream: the adaptlab stream (taken from `stream_to_avalanche` experiences when None);
            needed for `metrics.json`.
        log_dir: where `metrics.json` and `run.json` go (the bridge passes its own).
        stream_name: the evaluation stream whose experiences are the columns.
    """

    adaptlab_safe = True

    def __init__(self, *, stream: Stream | None = None, log_dir: str | None = None,
                 stream_name: str = "test") -> None:
        super().__init__()
        self.stream, self.log_dir, self.stream_name = stream, log_dir, stream_name
        self.init: dict[int, float] | None = None
        self.rows: list[dict[str, Any]] = []
        self.log = EventLog()
        self.test_sizes: dict[int, int] = {}
        self.started_at: str | None = None
        self._segment: int | None = None
        self._new_row = False
        self._position = 0
        self._exp_end = 0
        self._counts: dict[int, list[Any]] = {}
        self._eval_seg: int | None = None
        self._files: RunFiles | None = None

    @property
    def events(self) -> list[tuple[int, int, int, int]]:
        """The online events `(pos, n, n_correct, seg)` recorded so far."""
        return [tuple(int(v) for v in e) for e in self.log.array()]

    # -- PluginMetric API ---------------------------------------------------------------------
    def result(self) -> dict:
        return {"R": self.matrix().tolist()}

    def reset(self) -> None:
        pass

    # -- training -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any) -> None:
        self.started_at = self.started_at or now()
        exp = strategy.experience
        if self.stream is None:
            self.stream = getattr(exp, "_adaptlab_stream", None)
        seg = segment_of(exp)
        if seg != self._segment:
            self._segment, self._new_row = seg, True
        self._exp_end = self._position + len(exp.dataset)

    def after_training_iteration(self, strategy: Any) -> None:
        """One online event per iteration, over the stream's own samples only: replay
        strategies append memory samples after the current batch (or train on memory only),
        so the position never runs past the experience."""
        out, y = strategy.mb_output, strategy.mb_y
        n = min(len(y), int(strategy.train_mb_size), self._exp_end - self._position)
        if out is None or n <= 0:
            return
        correct = (out[:n].argmax(-1) == y[:n]).sum()
        self.log.add(np.array([[self._position, n, self._segment]], dtype=np.int64), correct)
        self._position += n

    def after_training_exp(self, strategy: Any) -> None:
        self._position = self._exp_end

    # -- evaluation ---------------------------------------------------------------------------
    def before_eval(self, strategy: Any) -> None:
        self._counts = {}

    def before_eval_exp(self, strategy: Any) -> None:
        exp = strategy.experience
        counted = exp.origin_stream.name == self.stream_name
        self._eval_seg = segment_of(exp) if counted else None

    def after_eval_iteration(self, strategy: Any) -> None:
        if self._eval_seg is None:
            return
        c = self._counts.setdefault(self._eval_seg, [0, 0])
        c[0] = c[0] + (strategy.mb_output.argmax(-1) == strategy.mb_y).sum()
        c[1] += len(strategy.mb_y)

    def after_eval(self, strategy: Any) -> list[MetricValue] | None:
        if not self._counts:
            return None
        self.log.flush()
        acc = {s: float(c) / n for s, (c, n) in self._counts.items()}
        self.test_sizes |= {s: n for s, (_, n) in self._counts.items()}
        self._counts = {}
        step = int(strategy.clock.train_iterations)
        if self._segment is None:
            self.init = acc
            return None
        row = {"after_segment": self._segment, "position": self._position,
               "observe_step": step, "acc": acc}
        if self._new_row or not self.rows:
            self.rows.append(row)
            self._new_row = False
        else:
            self.rows[-1] = row
        values = self._running()
        self._write(strategy)
        return [MetricValue(self, k, v, step) for k, v in values.items() if v is not None]

    # -- results ------------------------------------------------------------------------------
    def columns(self) -> list[int]:
        if self.stream is not None:
            return [s.id for s in self.stream.segments]
        return sorted(set(self.test_sizes) | {r["after_segment"] for r in self.rows})

    def matrix(self) -> np.ndarray:
        """R (rows x columns), NaN where a column was not evaluated."""
        cols = self.columns()
        return np.array([[r["acc"].get(c, np.nan) for c in cols] for r in self.rows], float)

    def first(self) -> list[int]:
        segs = [r["after_segment"] for r in self.rows]
        if self.stream is not None and len(self.stream.first_rows) == len(self.columns()):
            return list(self.stream.first_rows)
        return [segs.index(c) if c in segs else len(segs) for c in self.columns()]

    def _running(self) -> dict[str, float | None]:
        R = self.matrix()
        cols = self.columns()
        n = [self.test_sizes.get(c, 0) for c in cols]
        b = None if self.init is None else [self.init.get(c, np.nan) for c in cols]
        try:
            run = metrics.running_report(R, upto_row=len(R) - 1, first=self.first(), b=b, n=n)
        except ValueError:  # nothing seen yet
            return {}
        return matrix_scalars(run, self.stream_name)

    def document(self, strategy: Any, status: str | None = None) -> dict[str, Any] | None:
        """The `metrics.json` document (`metrics.md` §7), by the evaluator's own builder."""
        if self.stream is None:
            return None
        st = self.stream
        cols = self.columns()
        record = Record(
            init=None if self.init is None else [self.init.get(c) for c in cols],
            rows=[{**r, "acc": [r["acc"].get(c) for c in cols]} for r in self.rows],
            events=self.log,
        )
        if status is None:
            done = bool(self.rows) and self.rows[-1]["position"] == len(st)
            status = "completed" if done else "running"

        def test_set(segment: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = st.test_sets[segment]
            return as_float(x), y

        summary = summarize(strategy.model, cols, test_set, self.log.events(),
                            with_metrics=status != "running")
        return build_document(st, record, summary, status,
                              backend=f"avalanche:{type(strategy).__name__}")

    def _write(self, strategy: Any) -> None:
        log_dir = self.log_dir or getattr(strategy, "log_dir", None)
        if log_dir is None or self.stream is None:
            return
        doc = self.document(strategy)
        if self._files is None or self._files.log_dir != log_dir:
            self._files = RunFiles(log_dir)
        model = getattr(strategy, "learner", strategy.model)
        self._files.write(doc, learner=model, started_at=self.started_at,
                          hparams=dict(getattr(model, "hparams", {}) or {}),
                          strategy=type(strategy).__name__)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init, "rows": self.rows, "events": self.log.state(),
                "test_sizes": self.test_sizes, "started_at": self.started_at,
                "segment": self._segment, "new_row": self._new_row, "position": self._position,
                "exp_end": self._exp_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init, self.rows = state["init"], state["rows"]
        self.log.load(state["events"])
        self.test_sizes = dict(state["test_sizes"])
        self.started_at, self._segment = state["started_at"], state["segment"]
        self._new_row, self._position = state["new_row"], state["position"]
        self._exp_end = state["exp_end"]

    def __str__(self) -> str:
        return "SegmentMatrix"


def segment_matrix_metrics(*, stream: Stream | None = None, log_dir: str | None = None,
                           stream_name: str = "test") -> SegmentMatrixMetrics:
    """The metric to give `EvaluationPlugin`: adaptlab's R-based metrics and metrics.json."""
    return SegmentMatrixMetrics(stream=stream, log_dir=log_dir, stream_name=stream_name)
