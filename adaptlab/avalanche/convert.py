"""Benchmarks both ways: an Avalanche benchmark or stream as an adaptlab `Stream`, and an
adaptlab `Stream` as an Avalanche benchmark, sample for sample in the same order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import (
    TaskAwareSupervisedClassificationDataset,
)
from avalanche.benchmarks.utils.data_attribute import TaskLabels
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from torch.utils.data import DataLoader, TensorDataset

from ..streams import Segment, Stream
from ..streams.core import digest


def segment_of(exp: Any) -> int:
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
    return np.full(n, segment_of(exp), dtype=np.int64)


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
    from ..streams.core import Purpose, rng

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
        tests.setdefault(segment_of(exp), []).append((x, y))
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


def as_float(x: torch.Tensor) -> torch.Tensor:
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
    x, y = as_float(stream.x), stream.y
    train = [_tensor_dataset(x[s:e], y[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    test_xy = [(as_float(stream.test_sets[s.id][0]), stream.test_sets[s.id][1])
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


