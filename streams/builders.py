"""`StreamBuilder`: the parameters every stream shares, and the one assembly path.

A builder subclass only says what its segments are (`_make_segments`); sources, subsampling,
scheduling, fingerprints and validation happen here once. Builders are plain classes with
explicit keyword parameters so that LightningCLI YAML can name them with `class_path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .core import Purpose, Segment, Stream, digest, require_positive, rng
from .schedules import arrange, check_schedule
from .sources import SourceData, load_source, source_name


@dataclass
class SegmentData:
    """One segment's training pool and held-out test set, before scheduling."""

    name: str
    group: str
    params: dict[str, Any]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class StreamBuilder:
    """Parameters shared by every stream (streams.md §3) and `build() -> Stream`."""

    kind = "stream"
    supervised_default = True

    def __init__(
        self,
        *,
        # a name or a file path; from Python also a SourceData. Annotated `str` alone: with a
        # union, jsonargparse reads an existing file's *contents* in place of its path.
        source: str = "digits",
        source_args: dict[str, Any] | None = None,
        root: str | None = None,
        download: bool = False,
        batch_size: int = 10,
        order: list[int] | None = None,
        recurrence: str = "reuse",
        repeats: int = 1,
        reshuffle_each_repeat: bool = False,
        shuffle_within_segment: bool = True,
        transition: int = 0,
        eval_at: str = "end",
        label_shift: dict[str, Any] | None = None,
        max_samples_per_segment: int | None = None,
        test_samples_per_segment: int | None = None,
        align_batches_to_boundaries: bool = False,
        supervised: bool | None = None,
        seed: int | None = None,
        split_seed: int = 0,
    ) -> None:
        check_schedule(batch_size=batch_size, recurrence=recurrence, repeats=repeats,
                       transition=transition, eval_at=eval_at, label_shift=label_shift)
        require_positive("max_samples_per_segment", max_samples_per_segment, allow_none=True)
        require_positive("test_samples_per_segment", test_samples_per_segment, allow_none=True)
        self.source = source
        self.source_args = None if source_args is None else dict(source_args)
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.order = None if order is None else list(order)
        self.recurrence = recurrence
        self.repeats = repeats
        self.reshuffle_each_repeat = reshuffle_each_repeat
        self.shuffle_within_segment = shuffle_within_segment
        self.transition = transition
        self.eval_at = eval_at
        self.label_shift = None if label_shift is None else dict(label_shift)
        self.max_samples_per_segment = max_samples_per_segment
        self.test_samples_per_segment = test_samples_per_segment
        self.align_batches_to_boundaries = align_batches_to_boundaries
        self.supervised = self.supervised_default if supervised is None else supervised
        self.seed = 0 if seed is None else int(seed)  # the CLI fills it from seed_everything
        self.split_seed = split_seed

    # -- what a subclass provides -------------------------------------------------------------
    def _make_segments(self, src: SourceData) -> list[SegmentData]:
        raise NotImplementedError

    def _n_classes(self, src: SourceData, segments: list[SegmentData]) -> int:
        return src.n_classes

    def _load(self) -> SourceData:
        return load_source(
            self.source, root=self.root, download=self.download, split_seed=self.split_seed,
            source_args=self.source_args,
        )

    # -- shared -------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The parameters that define the stream (fingerprint, hparams); where the files
        live (`root`, `download`) does not change the stream, so it is left out."""
        params = {"builder": type(self).__name__, **{
            k: v for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("root", "download")
        }}
        params["source"] = source_name(self.source)  # the data enter via their fingerprint
        if self.source_args is None:
            del params["source_args"]
        return params

    def _subsample(self, seg: SegmentData, s: int) -> SegmentData:
        for limit, xs, ys, split in (
            (self.max_samples_per_segment, "x_train", "y_train", 0),
            (self.test_samples_per_segment, "x_test", "y_test", 1),
        ):
            n = len(getattr(seg, ys))
            if limit is not None and limit < n:
                keep = torch.from_numpy(
                    np.sort(rng(self.seed if split == 0 else self.split_seed,
                                Purpose.SUBSAMPLE, s, split).choice(n, limit, replace=False))
                )
                setattr(seg, xs, getattr(seg, xs)[keep])
                setattr(seg, ys, getattr(seg, ys)[keep])
        return seg

    def build(self) -> Stream:
        """Load the source, make the segments, schedule them, and freeze the result."""
        src = self._load()
        segs = [self._subsample(sd, s) for s, sd in enumerate(self._make_segments(src))]
        if not segs:
            raise ValueError(f"{self.kind} stream: no segments (the stream would be empty)")
        for s, sd in enumerate(segs):
            if len(sd.y_train) == 0 or len(sd.y_test) == 0:
                raise ValueError(
                    f"segment {s} ({sd.name}) is empty: no training or test samples "
                    f"(train {len(sd.y_train)}, test {len(sd.y_test)})"
                )
        sizes = [len(sd.y_train) for sd in segs]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        pool_x = torch.cat([sd.x_train for sd in segs])
        pool_y = torch.cat([sd.y_train for sd in segs])
        pools = {s: np.arange(offsets[s], offsets[s + 1]) for s in range(len(segs))}
        arr = arrange(
            pools, pool_y.numpy(), batch_size=self.batch_size, seed=self.seed, order=self.order,
            recurrence=self.recurrence, repeats=self.repeats,
            reshuffle_each_repeat=self.reshuffle_each_repeat,
            shuffle_within_segment=self.shuffle_within_segment, transition=self.transition,
            eval_at=self.eval_at, label_shift=self.label_shift,
            align_batches_to_boundaries=self.align_batches_to_boundaries,
        )
        if pool_x.is_floating_point() and not bool(torch.isfinite(pool_x).all()):
            bad = int(torch.nonzero(~torch.isfinite(pool_x.flatten(1)).all(1))[0])
            raise ValueError(f"the data contains NaN or inf (first at pool sample {bad})")
        idx = torch.from_numpy(arr.order)
        y = pool_y[idx].contiguous()
        if torch.unique(y).numel() < 2:
            raise ValueError(
                f"the stream has one class only (every label is {int(y[0])}); "
                "a classifier cannot be trained or judged on it"
            )
        segments = tuple(
            Segment(s, segs[s].name, segs[s].group, segs[s].params, sizes[s], len(segs[s].y_test))
            for s in arr.segments_used
        )
        stream = Stream(
            name=f"{self.kind}_{src.name}",
            kind=self.kind,
            x=pool_x[idx].contiguous(),
            y=y,
            segment_ids=torch.from_numpy(arr.segment_ids),
            segments=segments,
            test_sets={s: (segs[s].x_test, segs[s].y_test) for s in arr.segments_used},
            batch_size=self.batch_size,
            n_classes=self._n_classes(src, segs),
            eval_positions=arr.eval_positions,
            row_segments=arr.row_segments,
            first_rows=arr.first_rows,
            true_shifts=arr.true_shifts,
            seed=self.seed,
            split_seed=self.split_seed,
            params=self.params(),
            source_fingerprint=src.fingerprint,
            supervised=self.supervised,
            order_digest=digest(arr.order, arr.segment_ids),
        )
        return stream
