"""The Avalanche 0.6 bridge (spec `avalanche.md`): the only module that imports Avalanche.

- `StreamLearnerStrategy` runs any adaptlab `StreamLearner` as a `SupervisedTemplate`: one
  Avalanche training iteration is one `observe(x, y)`; experience boundaries never reach the
  learner (task-free stays task-free).
- `stream_from_avalanche` / `stream_to_avalanche` convert benchmarks both ways, so adaptlab
  learners and Avalanche strategies run on exactly the same samples in the same order.
- `segment_matrix_metrics()` computes adaptlab's accuracy-matrix metrics inside Avalanche's
  `EvaluationPlugin` (they also work on online and recurring streams, where Avalanche's own
  forgetting emits nothing) and writes the same `metrics.json` as the Lightning evaluator.
- `ForgettingPlugin` drives the forgetting regimes' `ForgettingCore` from Avalanche events.
- Checkpoints are Lightning-format dicts (Avalanche's own dill checkpointing fails on this stack).
"""

from __future__ import annotations

import os
import random
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import (
        TaskAwareSupervisedClassificationDataset,
    )
    from avalanche.benchmarks.utils.data_attribute import TaskLabels
    from avalanche.benchmarks.utils.flat_data import ConstantSequence
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation import PluginMetric
    from avalanche.evaluation.metric_results import MetricValue
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.templates import SupervisedTemplate
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "adaptlab.avalanche needs Avalanche (avalanche-lib 0.6): "
        "pip install 'adaptlab[avalanche]'"
    ) from err

from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from . import metrics
from .evaluation import StreamEvaluator, _now
from .jsonio import to_jsonable, write_json_atomic
from .learner import StreamLearner
from .streams import Segment, Stream
from .streams.core import digest

__all__ = [
    "ForgettingPlugin", "IncompatiblePluginError", "SegmentMatrixMetrics", "StreamLearnerStrategy",
    "accuracy_matrix_from_metrics", "online_stream", "segment_matrix_metrics",
    "stream_from_avalanche", "stream_to_avalanche",
]


class IncompatiblePluginError(ValueError):
    """A plugin that would leak experience boundaries to a task-free learner, or that reads
    `mb_output` as a training output the learner does not produce."""


# =========================================================================== conversions


def _segment_of(exp: Any) -> int:
    """The segment an experience belongs to: ours, an online origin's, or its own index."""
    seg = getattr(exp, "adaptlab_segment", None)
    if seg is not None:
        return int(seg)
    logged = exp.logging() if hasattr(exp, "logging") else exp
    origin = getattr(logged, "origin_experience", None)
    if origin is not None:
        return int(origin.current_experience)
    return int(logged.current_experience)


def _sample_segments(exp: Any, n: int) -> np.ndarray:
    """Per-sample segment ids; linear-decay sub-experiences have no origin, only counts."""
    counts = getattr(exp, "n_samples_from_each_exp", None)
    logged = exp.logging() if hasattr(exp, "logging") else exp
    if counts is not None and getattr(logged, "origin_experience", None) is None:
        return np.repeat(np.arange(len(counts)), counts)
    return np.full(n, _segment_of(exp), dtype=np.int64)


def _materialise(dataset: Any, transforms: str) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """(x, y, task labels) of an Avalanche dataset, read once in its own order."""
    ds = dataset.eval() if transforms == "eval" else dataset.train()
    loader = DataLoader(ds, batch_size=1024, shuffle=False,
                        collate_fn=getattr(ds, "collate_fn", None))
    xs, ys, ts = [], [], []
    for mb in loader:
        xs.append(mb[0])
        ys.append(torch.as_tensor(mb[1]).long())
        ts.append(torch.as_tensor(mb[2]).long() if len(mb) > 2 else torch.zeros_like(ys[-1]))
    if not xs:
        raise ValueError("stream_from_avalanche: an experience has no samples")
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def _streams_of(source: Any, test_stream: Any) -> tuple[Iterable[Any], Iterable[Any]]:
    if hasattr(source, "train_stream"):  # a CLScenario
        train = source.train_stream
        test = test_stream if test_stream is not None else getattr(source, "test_stream", None)
    else:
        train, test = source, test_stream
    if test is None:
        raise ValueError(
            "stream_from_avalanche: no test stream; pass a benchmark with a test_stream or "
            "test_stream=<the benchmark's test stream> (the evaluator needs held-out sets)"
        )
    return train, test


def stream_from_avalanche(
    source: Any,
    *,
    test_stream: Any = None,
    batch_size: int = 10,
    order: str = "dataset",
    seed: int = 0,
    transforms: str = "eval",
    allow_task_labels: bool = False,
    name: str | None = None,
) -> Stream:
    """An adaptlab `Stream` holding exactly the samples of an Avalanche benchmark or stream.

    Accepts a `CLScenario`, a `CLStream` or an online stream (`split_online_stream`,
    `split_continuous_linear_decay_stream`). Experiences follow one another in stream order;
    a segment is an origin experience, and a row of the accuracy matrix ends wherever the
    segment changes (so recurring segments get one row per occurrence). Data is materialised
    once into tensors with the `transforms` (`"eval"` or `"train"`) of the dataset.

    Args:
        source: the benchmark or train stream.
        test_stream: held-out experiences, one per segment (default: the benchmark's).
        batch_size: the stream's mini-batch size B.
        order: `"dataset"` keeps each experience's order (Avalanche's with `shuffle=False`);
            `"shuffle"` permutes within each experience, seeded by `seed`.
        allow_task_labels: task labels are dropped (task-free learners never see them); a
            stream that carries non-zero ones raises unless this is set.
    """
    from .streams.core import Purpose, rng

    if order not in ("dataset", "shuffle"):
        raise ValueError(f"order: {order!r} is not 'dataset' or 'shuffle'")
    if transforms not in ("eval", "train"):
        raise ValueError(f"transforms: {transforms!r} is not 'eval' or 'train'")
    train, test = _streams_of(source, test_stream)
    xs, ys, segs, labels = [], [], [], []
    task_labels: set[int] = set()
    for i, exp in enumerate(train):
        x, y, t = _materialise(exp.dataset, transforms)
        seg = _sample_segments(exp, len(y))
        if order == "shuffle":
            perm = rng(seed, Purpose.SHUFFLE, i).permutation(len(y))
            x, y, seg = x[perm], y[perm], seg[perm]
        xs.append(x)
        ys.append(y)
        segs.append(seg)
        labels.append(int(np.bincount(seg).argmax()))
        task_labels |= set(t.unique().tolist())
    if not xs:
        raise ValueError("stream_from_avalanche: the train stream has no experiences")
    if task_labels - {0} and not allow_task_labels:
        raise ValueError(
            f"stream_from_avalanche: the stream carries task labels {sorted(task_labels)}; "
            "adaptlab learners are task-free and never see them. Pass allow_task_labels=True "
            "to drop them (they are kept in stream.params['task_labels'] only)"
        )
    sizes = [len(y) for y in ys]
    ends = np.cumsum(sizes)
    eval_positions, row_segments = [], []
    for k, (label, end) in enumerate(zip(labels, ends)):
        if k + 1 < len(labels) and labels[k + 1] == label:
            continue  # the same segment goes on: one row per occurrence
        eval_positions.append(int(end))
        row_segments.append(label)

    tests: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for exp in test:
        x, y, _ = _materialise(exp.dataset, "eval")
        tests.setdefault(_segment_of(exp), []).append((x, y))
    seg_ids = sorted(set(row_segments) | {int(s) for seg in segs for s in np.unique(seg)})
    missing = [s for s in seg_ids if s not in tests]
    if missing:
        raise ValueError(f"stream_from_avalanche: segments {missing} have no test experience")
    test_sets = {s: (torch.cat([x for x, _ in tests[s]]), torch.cat([y for _, y in tests[s]]))
                 for s in seg_ids}
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    seg_all = torch.from_numpy(np.concatenate(segs).astype(np.int64))
    n_train = {s: int((seg_all == s).sum()) for s in seg_ids}
    segments = tuple(
        Segment(s, f"exp{s:03d}", "avalanche",
                {"classes": sorted(set(test_sets[s][1].tolist()))}, n_train[s],
                len(test_sets[s][1]))
        for s in seg_ids
    )
    first_rows = tuple(row_segments.index(s) if s in row_segments else len(row_segments)
                       for s in seg_ids)
    n_classes = int(max(y_all.max(), *(y.max() for _, y in test_sets.values()))) + 1
    params = {
        "builder": "stream_from_avalanche", "source": type(source).__name__,
        "batch_size": batch_size, "order": order, "seed": seed, "transforms": transforms,
        "align_batches_to_boundaries": True, "task_labels": sorted(task_labels),
    }
    return Stream(
        name=name or f"avalanche_{getattr(train, 'name', 'stream')}",
        kind="avalanche",
        x=x_all.contiguous(), y=y_all.contiguous(), segment_ids=seg_all,
        segments=segments, test_sets=test_sets, batch_size=batch_size, n_classes=n_classes,
        eval_positions=tuple(eval_positions), row_segments=tuple(row_segments),
        first_rows=first_rows, true_shifts=tuple(eval_positions[:-1]), seed=seed, split_seed=0,
        params=params,
        source_fingerprint=digest(x_all.numpy(), y_all.numpy(),
                                  *(t[0].numpy() for t in test_sets.values())),
        order_digest=digest(seg_all.numpy()),
    )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TaskAwareSupervisedClassificationDataset:
    """Batches `(x, y, 0)`: targets for Avalanche's metrics, task label 0, no segment id.
    Task-aware, because EWC and LwF read the dataset's `task_set`."""
    return TaskAwareSupervisedClassificationDataset(
        [TensorDataset(x, y)],
        data_attributes=[DataAttribute(y.tolist(), "targets"),
                         TaskLabels(ConstantSequence(0, len(y)))],
    )


def stream_to_avalanche(stream: Stream) -> Any:
    """An Avalanche benchmark with exactly the stream's samples, in order.

    One train experience per evaluation interval of `stream.eval_positions` (so Avalanche's
    per-experience evaluation gives the accuracy-matrix rows), one test experience per
    segment (the columns). Every experience gets `adaptlab_segment`; train experiences of an
    unsupervised stream get `adaptlab_supervised = False` (the bridge then hides labels).
    """
    bounds = (0, *stream.eval_positions)
    x, y = _as_float(stream.x), stream.y
    train = [_tensor_dataset(x[s:e], y[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    test_xy = [(_as_float(stream.test_sets[s.id][0]), stream.test_sets[s.id][1])
               for s in stream.segments]
    test = [_tensor_dataset(tx, ty) for tx, ty in test_xy]
    bm = with_classes_timeline(benchmark_from_datasets(train=train, test=test))
    for i, exp in enumerate(bm.train_stream):
        exp.adaptlab_segment = int(stream.row_segments[i])
        exp.adaptlab_supervised = stream.supervised
        exp.adaptlab_last = i == len(train) - 1
        exp._adaptlab_xy = (x[bounds[i]:bounds[i + 1]], y[bounds[i]:bounds[i + 1]])
        exp._adaptlab_stream = stream
    for seg, exp, xy in zip(stream.segments, bm.test_stream, test_xy):
        exp.adaptlab_segment = int(seg.id)
        exp._adaptlab_xy = xy  # the bridge slices batches from these (no per-sample getitem)
    bm.adaptlab_stream = stream
    return bm


def online_stream(bm_or_stream: Any, *, experience_size: int, seed: int = 0) -> Any:
    """`split_online_stream` in the stream's own order (Avalanche's default reshuffles)."""
    stream = getattr(bm_or_stream, "train_stream", bm_or_stream)
    return split_online_stream(stream, experience_size, shuffle=False, seed=seed)


# =========================================================================== metrics


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


class _StreamView:
    """What `StreamEvaluator.document` reads from a Trainer: the stream and its test sets."""

    def __init__(self, stream: Stream, eval_batch_size: int) -> None:
        self.datamodule = self
        self.stream = stream
        self.eval_batch_size = eval_batch_size

    def test_set(self, segment_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.test_sets[segment_id]
        return _as_float(x), y


class _ModelView(nn.Module):
    """A plain model seen as a learner by the metrics code (no detector, no experts)."""

    has_experts = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_size_modules(self) -> list[nn.Module]:
        return [self.model]

    def shift_events(self) -> list[int]:
        return []

    def expert_ids(self, x: torch.Tensor | None = None) -> None:
        return None


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
        self.events: list[tuple[int, int, int, int]] = []
        self.test_sizes: dict[int, int] = {}
        self.started_at: str | None = None
        self._segment: int | None = None
        self._new_row = False
        self._position = 0
        self._exp_end = 0
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []
        self._counts: dict[int, list[Any]] = {}
        self._eval_seg: int | None = None

    # -- PluginMetric API ---------------------------------------------------------------------
    def result(self) -> dict:
        return {"R": self.matrix().tolist()}

    def reset(self) -> None:
        pass

    # -- training -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any) -> None:
        self.started_at = self.started_at or _now()
        exp = strategy.experience
        if self.stream is None:
            self.stream = getattr(exp, "_adaptlab_stream", None)
        seg = _segment_of(exp)
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
        self._pending.append((self._position, n, self._segment, correct))
        self._position += n

    def after_training_exp(self, strategy: Any) -> None:
        self._position = self._exp_end

    def _flush(self) -> None:
        if self._pending:
            counts = torch.stack([c for *_, c in self._pending]).cpu().tolist()
            self.events += [(p, n, int(c), s) for (p, n, s, _), c in zip(self._pending, counts)]
            self._pending = []

    # -- evaluation ---------------------------------------------------------------------------
    def before_eval(self, strategy: Any) -> None:
        self._counts = {}

    def before_eval_exp(self, strategy: Any) -> None:
        exp = strategy.experience
        counted = exp.origin_stream.name == self.stream_name
        self._eval_seg = _segment_of(exp) if counted else None

    def after_eval_iteration(self, strategy: Any) -> None:
        if self._eval_seg is None:
            return
        c = self._counts.setdefault(self._eval_seg, [0, 0])
        c[0] = c[0] + (strategy.mb_output.argmax(-1) == strategy.mb_y).sum()
        c[1] += len(strategy.mb_y)

    def after_eval(self, strategy: Any) -> list[MetricValue] | None:
        if not self._counts:
            return None
        self._flush()
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
        return [MetricValue(self, f"{k}/eval_phase/{self.stream_name}_stream", v, step)
                for k, v in values.items() if v is not None]

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
        return {
            "Top1_Acc_Seen": run["acc_final"],
            "Acc_IncrementalAvg": run["acc_incremental_avg"],
            "Forgetting_Chaudhry": run["forgetting_chaudhry"],
            "BWT_GEM": run["bwt_gem"],
            "BWT_Pairwise": run["bwt_pairwise"],
            "FWT_GEM": run["fwt_gem"],
        }

    def document(self, strategy: Any, status: str | None = None) -> dict[str, Any] | None:
        """The `metrics.json` document (`metrics.md` §7), built by the Lightning evaluator's
        own code so that both back ends report identical numbers."""
        if self.stream is None:
            return None
        self._flush()
        st = self.stream
        cols = self.columns()
        ev = StreamEvaluator(print_table=False, figures=False)
        ev.load_state_dict({
            "init": None if self.init is None else [self.init.get(c) for c in cols],
            "rows": [{**r, "acc": [r["acc"].get(c) for c in cols]} for r in self.rows],
            "anytime": [], "curve": [],
            "events": torch.tensor(self.events, dtype=torch.int64).reshape(-1, 4),
            "next_anytime": None, "started_at": self.started_at, "logged_at": -1,
        })
        model = strategy.model
        learner = model if isinstance(model, StreamLearner) else _ModelView(model)
        learner.backend = f"avalanche:{type(strategy).__name__}"
        if status is None:
            done = bool(self.rows) and self.rows[-1]["position"] == len(st)
            status = "completed" if done else "running"
        view = _StreamView(st, int(getattr(strategy, "eval_mb_size", 1024) or 1024))
        try:
            return ev.document(view, learner, status)
        finally:
            if isinstance(model, StreamLearner):
                del learner.backend

    def _write(self, strategy: Any) -> None:
        log_dir = self.log_dir or getattr(strategy, "log_dir", None)
        if log_dir is None or self.stream is None:
            return
        doc = self.document(strategy)
        os.makedirs(log_dir, exist_ok=True)
        write_json_atomic(os.path.join(log_dir, "metrics.json"), doc)
        model = getattr(strategy, "learner", strategy.model)
        hp = dict(getattr(model, "hparams", {}) or {})
        write_json_atomic(os.path.join(log_dir, "run.json"), to_jsonable({
            "log_dir": log_dir, "seed": getattr(model, "seed", None),
            "learner": type(model).__name__, "strategy": type(strategy).__name__,
            "status": doc["status"], "started_at": self.started_at,
            "finished_at": _now() if doc["status"] != "running" else None,
            "hparams": {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                        for k, v in hp.items()},
        }))

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"init": self.init, "rows": self.rows,
                "events": torch.tensor(self.events, dtype=torch.int64).reshape(-1, 4),
                "test_sizes": self.test_sizes, "started_at": self.started_at,
                "segment": self._segment, "new_row": self._new_row, "position": self._position,
                "exp_end": self._exp_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init, self.rows = state["init"], state["rows"]
        self.events = [tuple(int(v) for v in e) for e in state["events"].tolist()]
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


# =========================================================================== the strategy


class _ClockLogger(FabricTensorBoardLogger):
    """Fabric gives `self.log` no step: stamp Avalanche's `clock.train_iterations` (which
    equals the learner's `observe_steps`), so curves overlay the Lightning ones."""

    def __init__(self, log_dir: str, clock: Any) -> None:
        super().__init__(root_dir=log_dir, name="", version="", default_hp_metric=False)
        self._clock = clock

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        clock = self._clock()
        super().log_metrics(metrics, step=step if step is not None or clock is None
                            else int(clock.train_iterations))


def _learner_optimizers(learner: StreamLearner) -> list[torch.optim.Optimizer]:
    """The optimizers `configure_optimizers` returns (none for learners that build their own
    at run time, like TAME's per-expert ones)."""
    conf = learner.configure_optimizers()
    if conf is None:
        return []
    if isinstance(conf, torch.optim.Optimizer):
        return [conf]
    if isinstance(conf, dict):
        conf = [conf]
    out = []
    for item in conf:
        opt = item.get("optimizer") if isinstance(item, dict) else item
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"StreamLearnerStrategy: configure_optimizers returned "
                            f"{type(opt).__name__}, not a torch optimizer (schedulers: step "
                            "them in the learner; there is no Trainer to do it)")
        out.append(opt)
    return out


def _is_last(exp: Any) -> bool:
    """Is this the stream's last training experience (so the next evaluation is final)?"""
    last = getattr(exp, "adaptlab_last", None)
    if last is not None:
        return bool(last)
    logged = exp.logging() if hasattr(exp, "logging") else exp
    try:
        origin = getattr(logged, "origin_experience", None)
        if origin is not None:
            return bool(logged.is_last_subexp) and (
                origin.current_experience == len(origin.origin_stream) - 1)
        if hasattr(logged, "is_last_subexp"):
            return bool(logged.is_last_subexp)
        return logged.current_experience == len(logged.origin_stream) - 1
    except (TypeError, AttributeError):  # a lazy stream of unknown length
        return False


class _TensorBatches:
    """Mini-batches sliced straight from a `stream_to_avalanche` experience's tensors (no
    per-sample indexing or collation), `(x, y)`; the task label is added on unpacking."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.b = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.b)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for s in range(0, len(self.y), self.b):
            yield [self.x[s:s + self.b], self.y[s:s + self.b]]


class StreamLearnerStrategy(SupervisedTemplate):
    """Any adaptlab `StreamLearner` as an Avalanche strategy (spec `avalanche.md` §3–§4).

    One training iteration is one `observe(x, y)`; `mb_output` holds its pre-update logits,
    so Avalanche's train accuracy is online accuracy. The learner is hosted in a Lightning
    `Fabric`, so `self.optimizers()`, `self.manual_backward()` and `self.log()` work without a
    Trainer. Experience boundaries never reach the learner: it sees its own fit/epoch hooks
    once, and per-iteration hooks exactly as under a Trainer.

    Args:
        learner: the StreamLearner (manual optimisation).
        train_mb_size: the stream's mini-batch size B.
        eval_mb_size: evaluation batch size (use the native run's for bit-equal accuracies).
        precision: Fabric precision (`32-true`, `bf16-mixed`, …).
        plugins: evaluation metrics, loggers and adaptlab plugins; others raise
            `IncompatiblePluginError` unless `allow_unsafe_plugins=True`.
        evaluator: an `EvaluationPlugin` (default: accuracy per experience and stream,
            `segment_matrix_metrics()`, TensorBoard in `log_dir`).
        log_dir: TensorBoard, `metrics.json` and the learner's own logs.
        labels_to_learner: `False` hides labels (−100) from the learner; `None` follows the
            experience (`stream_to_avalanche` marks unsupervised streams).
        adapt_in_eval: run `observe` (with gradients) instead of `forward` in evaluation.
    """

    def __init__(
        self,
        *,
        learner: StreamLearner,
        train_mb_size: int = 10,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "32-true",
        plugins: Sequence[Any] | None = None,
        evaluator: EvaluationPlugin | None = None,
        log_dir: str | None = None,
        eval_every: int = -1,
        peval_mode: str = "experience",
        labels_to_learner: bool | None = None,
        adapt_in_eval: bool = False,
        allow_unsafe_plugins: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(learner, StreamLearner):
            raise TypeError(f"StreamLearnerStrategy: learner must be an adaptlab StreamLearner "
                            f"(observe(x, y) -> (logits, loss)), got {type(learner).__name__}")
        if learner.automatic_optimization:
            raise TypeError(f"StreamLearnerStrategy: {type(learner).__name__} uses automatic "
                            "optimisation; a StreamLearner optimises manually inside observe "
                            "(automatic_optimization = False, backward via manual_backward)")
        if base_kwargs.get("train_epochs", 1) != 1:
            raise ValueError("train_epochs: must be 1; repetition belongs to the Stream "
                             "(its `repeats`), not to the training loop")
        for key in ("model", "optimizer", "criterion"):
            if key in base_kwargs:
                raise TypeError(f"StreamLearnerStrategy: {key} comes from the learner; "
                                "do not pass it")
        for p in plugins or ():
            safe = isinstance(p, (EvaluationPlugin, PluginMetric)) or getattr(
                p, "adaptlab_safe", False)
            if not safe and not allow_unsafe_plugins:
                raise IncompatiblePluginError(
                    f"plugin {type(p).__name__}: only evaluation metrics, loggers and adaptlab "
                    "plugins are allowed; boundary-aware plugins (Replay, EWC, LwF, …) leak "
                    "experience boundaries to a task-free learner or read mb_output as a "
                    "training output. Pass allow_unsafe_plugins=True to use it anyway"
                )
        self.learner = learner
        self.log_dir = log_dir or os.path.join(
            "lightning_logs", f"avalanche_{type(learner).__name__}")
        dev = torch.device(device)
        self.fabric = Fabric(
            accelerator=dev.type, devices=[dev.index or 0] if dev.type == "cuda" else 1,
            precision=precision, loggers=[_ClockLogger(self.log_dir, self._clock_or_none)],
        )
        # learners read `self.trainer.precision` (TAME); through Fabric's trainer shim
        # that is this attribute, the Trainer's string form
        self.fabric.precision = str(precision)
        opts = _learner_optimizers(learner)
        self.fabric.setup(learner, *opts)
        if evaluator is None:
            evaluator = EvaluationPlugin(
                accuracy_metrics(experience=True, stream=True), segment_matrix_metrics(),
                loggers=[TensorboardLogger(self.log_dir)],
            )
        super().__init__(
            model=learner, optimizer=opts[0] if opts else None,
            criterion=nn.CrossEntropyLoss(), train_mb_size=train_mb_size, train_epochs=1,
            eval_mb_size=eval_mb_size, device=dev, plugins=plugins, evaluator=evaluator,
            eval_every=eval_every, peval_mode=peval_mode, **base_kwargs,
        )
        self.labels_to_learner = labels_to_learner
        self.adapt_in_eval = adapt_in_eval
        self._started = False
        self._hide_labels = False
        self._dirty = False
        self._final_exp = False
        self._final_done = False
        self._forward_done = False
        self._ours: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _clock_or_none(self) -> Any:
        return getattr(self, "clock", None)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The learner's optimizers (raw torch objects), for plugins."""
        return [o.optimizer for o in self.learner._fabric_optimizers]

    # -- what Avalanche must not do to a learner ----------------------------------------------
    def make_optimizer(self, **kwargs: Any) -> None:
        """Nothing: Avalanche's first `update_optimizer` would reset the optimizer and put
        every parameter in it, breaking learners with several or run-time optimizers."""

    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        """Nothing: the learner owns its model and optimizers (see `make_optimizer`)."""

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        """Unchanged: dynamic heads would need boundaries the learner must not see."""
        return self.model if model is None else model

    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool | None = None,
                              pin_memory: bool | None = None, persistent_workers: bool = False,
                              drop_last: bool = False, **kwargs: Any) -> None:
        """`shuffle` defaults as the data came: an adaptlab stream (`stream_to_avalanche`) keeps
        its order, sliced from tensors; any other benchmark is shuffled, Avalanche's default
        (its experiences are often sorted by class, which order-sensitive learners cannot
        survive)."""
        xy = getattr(self.experience, "_adaptlab_xy", None)
        if shuffle is None:
            shuffle = xy is None
        if (xy is not None and not shuffle and not drop_last
                and len(self.adapted_dataset) == len(xy[1])):
            self.dataloader = _TensorBatches(xy[0], xy[1], self.train_mb_size)
            return
        super().make_train_dataloader(num_workers=num_workers, shuffle=shuffle,
                                      pin_memory=pin_memory,
                                      persistent_workers=persistent_workers,
                                      drop_last=drop_last, **kwargs)

    def make_eval_dataloader(self, num_workers: int = 0, shuffle: bool = False,
                             pin_memory: bool | None = None, persistent_workers: bool = False,
                             **kwargs: Any) -> None:
        """`stream_to_avalanche` test sets are sliced from tensors, as the native evaluator."""
        xy = getattr(self.experience, "_adaptlab_xy", None)
        if xy is not None and len(self.adapted_dataset) == len(xy[1]):
            self.dataloader = _TensorBatches(xy[0], xy[1], self.eval_mb_size)
            return
        super().make_eval_dataloader(num_workers=num_workers, shuffle=shuffle,
                                     pin_memory=pin_memory,
                                     persistent_workers=persistent_workers, **kwargs)

    def _unpack_minibatch(self) -> None:
        """Avalanche's metrics read `mb_task_id` (`mbatch[-1]`): add a zero task label."""
        mb = list(self.mbatch)
        if len(mb) == 2:
            mb.append(torch.zeros(len(mb[1]), dtype=torch.long))
        self.mbatch = mb
        super()._unpack_minibatch()

    def forward(self) -> torch.Tensor:
        """The learner's evaluation forward, under the Fabric precision."""
        with self.fabric.autocast():
            return self.model(self.mb_x)

    # -- training -----------------------------------------------------------------------------
    def _before_training(self, **kwargs: Any) -> None:
        super()._before_training(**kwargs)
        if not self._started:  # once, as under a Trainer: the fit is the whole stream
            self._started = True
            self.learner.on_fit_start()
            self.learner.on_train_start()
            self.learner.on_train_epoch_start()

    def _before_training_exp(self, **kwargs: Any) -> None:
        exp = self.experience
        classes = sorted(getattr(exp, "classes_in_this_experience", None) or [])
        if classes and classes[-1] >= len(classes) and not getattr(self, "_warned_labels", False):
            self._warned_labels = True  # global class ids: say it once per run
            self.learner.check_labels(task_local=False)
        hide = self.labels_to_learner is False or (
            self.labels_to_learner is None and getattr(exp, "adaptlab_supervised", True) is False)
        self._hide_labels = hide
        self._final_exp = _is_last(exp)
        super()._before_training_exp(**kwargs)

    def _relay_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The learner's `manual_backward` inside the bridge: Avalanche's backward events
        around the real backward, once per backward the learner makes."""
        if not self._forward_done:
            self._forward_done = True
            self._after_forward()
        self.loss = loss
        self._before_backward()
        self.learner.on_before_backward(self.loss)
        self.fabric.backward(self.loss, *args, **kwargs)
        self.learner.on_after_backward()
        self._after_backward()

    def _is_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        known = self._ours.get(optimizer)
        if known is None:  # first step of this optimizer (TAME creates them at run time)
            mine = {id(p) for p in self.learner.parameters()}
            known = any(id(p) in mine for g in optimizer.param_groups for p in g["params"])
            self._ours[optimizer] = known
        return known

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._is_ours(optimizer):
            self._before_update()
            self.learner.on_before_optimizer_step(optimizer)

    def _step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._is_ours(optimizer):
            self._after_update()

    def training_epoch(self, **kwargs: Any) -> None:
        """Per mini-batch: `before_training_iteration`, `before_forward`, `observe` (backward
        and update events fire from inside it, once per real backward or step), then
        `after_training_iteration` with `mb_output` = the pre-update logits."""
        learner = self.learner
        from torch.optim import optimizer as optim
        handles = [optim.register_optimizer_step_pre_hook(self._step_pre_hook),
                   optim.register_optimizer_step_post_hook(self._step_post_hook)]
        learner.manual_backward = self._relay_backward  # the bridge is the learner's host
        losses: list[torch.Tensor] = []
        try:
            for idx, mbatch in enumerate(self.dataloader):
                if self._stop_training:
                    break
                self.mbatch = mbatch
                self._unpack_minibatch()
                batch = (self.mb_x, self.mb_y)
                self._before_training_iteration(**kwargs)
                learner.on_train_batch_start(batch, idx)
                self.loss = self._make_empty_loss()
                self._before_forward(**kwargs)
                self._forward_done = False
                y = torch.full_like(self.mb_y, -100) if self._hide_labels else self.mb_y
                learner.batch_position = learner.samples_seen
                with self.fabric.autocast():
                    logits, loss = learner.observe(self.mb_x, y)
                learner.samples_seen += len(self.mb_x)
                if logits.requires_grad or (loss is not None and loss.requires_grad):
                    raise TypeError(f"{type(learner).__name__}.observe: must return detached "
                                    "pre-update logits and loss (the learner contract)")
                learner.observe_steps += 1
                self._dirty = True
                if not self._forward_done:
                    self._after_forward(**kwargs)
                self.mb_output = logits
                if loss is not None:
                    self.loss = loss
                    losses.append(loss)
                    if len(losses) == 50:  # one host sync per 50 steps, as the native loop
                        learner._check_finite(torch.stack(losses))
                        losses = []
                self._after_training_iteration(**kwargs)
                learner.on_train_batch_end({"preds": logits.argmax(-1)}, batch, idx)
            if losses:
                learner._check_finite(torch.stack(losses))
        finally:
            del learner.manual_backward
            for h in handles:
                h.remove()

    # -- evaluation ---------------------------------------------------------------------------
    def eval(self, exp_list: Any, **kwargs: Any) -> dict[str, Any]:
        """Avalanche's eval, after the learner's `before_evaluation(final)` (once per
        evaluation point; `final` is the last experience's, or pass `final=True`)."""
        final = kwargs.pop("final", None)
        final = self._final_exp if final is None else bool(final)
        if not self._final_done and (self._dirty or final):
            with torch.enable_grad():
                self.learner.before_evaluation(final)
            self._final_done = final
            self._dirty = False
        return super().eval(exp_list, **kwargs)

    def eval_epoch(self, **kwargs: Any) -> None:
        if not self.adapt_in_eval:
            return super().eval_epoch(**kwargs)
        for mbatch in self.dataloader:  # test-time adaptation: observe, with gradients
            self.mbatch = mbatch
            self._unpack_minibatch()
            self._before_eval_iteration(**kwargs)
            self._before_eval_forward(**kwargs)
            y = torch.full_like(self.mb_y, -100) if self._hide_labels else self.mb_y
            with torch.enable_grad(), self.fabric.autocast():
                self.mb_output, _ = self.learner.observe(self.mb_x, y)
            self._after_eval_forward(**kwargs)
            self.loss = self.criterion()
            self._after_eval_iteration(**kwargs)

    def close(self) -> None:
        """The learner's end-of-fit hooks (a Trainer calls them when the stream ends)."""
        if self._started:
            self.learner.on_train_epoch_end()
            self.learner.on_train_end()
            self.learner.on_fit_end()
            self._started = False
        for logger in self.fabric.loggers:
            logger.finalize("success")

    # -- checkpoints --------------------------------------------------------------------------
    def _stateful_plugins(self) -> list[Any]:
        found = [p for p in self.plugins if hasattr(p, "state_dict") and hasattr(
            p, "load_state_dict") and not isinstance(p, nn.Module)]
        found += [m for m in getattr(self.evaluator, "metrics", [])
                  if isinstance(m, SegmentMatrixMetrics)]
        return found

    def save_checkpoint(self, path: str) -> None:
        """A Lightning-format checkpoint (tensors and plain containers only, so it loads with
        `weights_only=True`); resuming continues exactly, adaptlab's R included."""
        learner = self.learner
        clock = {k: v for k, v in vars(self.clock).items() if isinstance(v, int)}
        np_state = np.random.get_state()
        ckpt: dict[str, Any] = {
            "state_dict": learner.state_dict(),
            "optimizer_states": [o.state_dict() for o in self.optimizers],
            "hyper_parameters": to_jsonable(dict(learner.hparams)),
            "pytorch-lightning_version": __import__("pytorch_lightning").__version__,
            "epoch": 0, "global_step": learner.update_steps,
            "adaptlab_bridge": {
                "clock": clock, "experiences_trained": self.clock.train_exp_counter,
                "started": self._started, "dirty": self._dirty, "final_done": self._final_done,
                "plugins": [p.state_dict() for p in self._stateful_plugins()],
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "python_version": random.getstate()[0],
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                        "numpy_pos": int(np_state[2])},
            },
        }
        learner.on_save_checkpoint(ckpt)
        self.fabric.save(path, ckpt)

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote into this (identically built) strategy."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        learner = self.learner
        learner.on_load_checkpoint(ckpt)
        learner.load_state_dict(ckpt["state_dict"])
        opts = self.optimizers
        if len(opts) != len(ckpt["optimizer_states"]):
            raise ValueError(f"checkpoint: {len(ckpt['optimizer_states'])} optimizer states "
                             f"for {len(opts)} optimizers; build the strategy as it was saved")
        for o, s in zip(opts, ckpt["optimizer_states"]):
            o.load_state_dict(s)
        state = ckpt["adaptlab_bridge"]
        for k, v in state["clock"].items():
            setattr(self.clock, k, v)
        self._started, self._dirty = state["started"], state["dirty"]
        self._final_done = state["final_done"]
        plugins = self._stateful_plugins()
        if len(plugins) != len(state["plugins"]):
            raise ValueError("checkpoint: the strategy has other plugins than the saved one")
        for p, s in zip(plugins, state["plugins"]):
            p.load_state_dict(s)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32),
                             rng["numpy_pos"], 0, 0.0))


# =========================================================================== forgetting


class _PublishLogger:
    """The forgetting callbacks log through `trainer.logger`; here that is the evaluator."""

    def __init__(self, plugin: ForgettingPlugin, strategy: Any) -> None:
        self.plugin, self.strategy = plugin, strategy

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        ev = getattr(self.strategy, "evaluator", None)
        if ev is not None:
            for k, v in values.items():
                ev.publish_metric_value(MetricValue(self.plugin, k, float(v), int(step)))


class _SegmentMeta:
    """`batch_meta()` for `rearm_on: segment` (an oracle, as in the Lightning callback)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def batch_meta(self) -> dict[str, Any]:
        return {"segment_ids": torch.tensor([_segment_of(self.strategy.experience)])}


class ForgettingPlugin(SupervisedPlugin, supports_distributed=False):
    """The forgetting regimes as an Avalanche plugin, e.g.
    `ForgettingPlugin(EmbeddingForgetting(regime="active", every_k=5))`.

    It drives the same regime object as the Lightning callback (its `ForgettingCore`
    schedule and in-place reset), so both back ends reset at the same steps: the reset due
    after step s = `clock.train_iterations` is applied at the start of the next iteration,
    before the forward pass. Works on the bridge and on Avalanche's own `Naive`, `ER_ACE`, ….
    """

    adaptlab_safe = True

    def __init__(self, forgetting: Any) -> None:
        from adaptlab.strategies.forgetting import (
            EmbeddingForgetting,
            ProbabilisticEmbeddingForgetting,
        )

        super().__init__()
        if not isinstance(forgetting, (EmbeddingForgetting, ProbabilisticEmbeddingForgetting)):
            raise TypeError(f"ForgettingPlugin: takes an EmbeddingForgetting or "
                            f"ProbabilisticEmbeddingForgetting, got {type(forgetting).__name__}")
        self.forgetting = forgetting
        self.probabilistic = isinstance(forgetting, ProbabilisticEmbeddingForgetting)
        self._published = 0

    def _host(self, strategy: Any) -> tuple[Any, Any]:
        """What the callback reads from a Trainer and a module, from the strategy."""
        opts = getattr(strategy, "optimizers", None)
        if not isinstance(opts, list):
            opts = [strategy.optimizer] if getattr(strategy, "optimizer", None) else []
        trainer = _Host(optimizers=opts, logger=_PublishLogger(self, strategy),
                        is_global_zero=True, global_step=int(strategy.clock.train_iterations),
                        callbacks=[], datamodule=_SegmentMeta(strategy))
        return trainer, _Host()

    @property
    def reset_steps(self) -> list[int]:
        return list(getattr(self.forgetting, "reset_steps", []))

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        from adaptlab.strategies.forgetting import find_model

        trainer, _ = self._host(strategy)
        model = find_model(strategy.model)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        core = self.forgetting.core
        core.bind(model, opt)
        if self.probabilistic and self.forgetting.exclude_ids is None:
            pad = core.emb.padding_idx
            core.exclude = torch.tensor([] if pad is None else [pad], dtype=torch.long)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        trainer, _ = self._host(strategy)
        if trainer.optimizers and not self.probabilistic:  # the optimizer may be rebuilt
            self.forgetting.core.check_optimizer(trainer.optimizers[0])

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        trainer, module = self._host(strategy)
        if self.probabilistic:
            self.forgetting.core.restore()
            return
        self.forgetting.on_train_batch_start(trainer, module, (strategy.mb_x,), 0)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.before_forward(int(strategy.clock.train_iterations),
                                                strategy.mb_x)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.after_backward()

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.before_optimizer_step()

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.restore()
            return
        trainer, module = self._host(strategy)
        module.last_loss = strategy.loss
        self.forgetting.on_train_batch_end(trainer, module, {"loss": strategy.loss}, None, 0)
        step = int(strategy.clock.train_iterations)
        ev = getattr(strategy, "evaluator", None)
        if ev is not None and len(self.forgetting.reset_steps) != self._published:
            self._published = len(self.forgetting.reset_steps)
            ev.publish_metric_value(MetricValue(
                self, "Forgetting_Resets/train_phase/train_stream",
                len(self.forgetting.reset_steps), step))

    def state_dict(self) -> dict[str, Any]:
        return self.forgetting.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forgetting.load_state_dict(state)


class _Host:
    """A bag of attributes standing in for the Trainer / module the callbacks read."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)
