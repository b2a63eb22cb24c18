"""Vision streams: class-incremental split, permuted, rotated, and corrupted (TTA).

Each is a config class (`Split`, `Permuted`, `Rotated`, `Corrupted`, usable from YAML with
`class_path`) and a function of the same name and parameters returning the built `Stream`.
Transforms run vectorised once at build time; nothing per sample happens while streaming.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from .builders import SegmentData, StreamBuilder
from .core import Purpose, Stream, require_positive, rng
from .corruptions import CORRUPTIONS, DEFAULT_ORDER, corrupt
from .datasets import CORRUPTION_NAMES_C, EXTRA_CORRUPTION_NAMES_C
from .sources import SourceData, load_cifar_c

__all__ = [
    "Split", "Permuted", "Rotated", "Corrupted", "split", "permuted", "rotated", "corrupted",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _require_images(builder: StreamBuilder, src: SourceData) -> None:
    if not src.is_image:
        raise ValueError(
            f"{type(builder).__name__}: needs images (C, H, W), but source {src.name!r} has "
            f"samples of shape {src.sample_shape}; use Split or Permuted for sequences and "
            "features"
        )


def _refuse_duplicates(option: str, classes: list[int], hint: str = "") -> None:
    twice = sorted(c for c, n in Counter(int(c) for c in classes).items() if n > 1)
    if twice:
        raise ValueError(
            f"{option}: classes {twice} appear more than once; each class belongs to one "
            f"segment{hint}"
        )


class Split(StreamBuilder):
    """Task-free class-incremental split: one segment per group of classes.

    `labels="global"` keeps the source labels (class-IL); `"local"` relabels 0..c-1 inside each
    segment (TAME's protocol, within-task accuracy). A class named in two `segments` is refused
    unless `shared_classes="partition"`: then its train and test samples are dealt (seeded,
    disjoint, near-equal parts) to the segments that name it, so tasks share classes.
    """

    kind = "split"

    def __init__(
        self,
        *,
        classes_per_segment: int = 2,
        segments: list[list[int]] | None = None,
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        labels: str = "global",
        shared_classes: str = "refuse",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if labels not in ("global", "local"):
            raise ValueError(f"labels: {labels!r} is not 'global' or 'local'")
        if shared_classes not in ("refuse", "partition"):
            raise ValueError(f"shared_classes: {shared_classes!r} is not 'refuse' or 'partition'")
        if segments is None:
            require_positive("classes_per_segment", classes_per_segment)
        self.classes_per_segment = classes_per_segment
        self.segments = None if segments is None else [list(g) for g in segments]
        self.class_order = None if class_order is None else list(class_order)
        self.shuffle_classes = shuffle_classes
        self.labels = labels
        self.shared_classes = shared_classes

    def _groups(self, src: SourceData) -> list[list[int]]:
        n_classes = src.n_classes
        if self.segments is not None:
            groups = self.segments
        else:
            order = self.class_order if self.class_order is not None else list(range(n_classes))
            _refuse_duplicates("class_order", order)
            if self.shuffle_classes and self.class_order is None:
                order = [int(c) for c in rng(self.seed, Purpose.CLASS_ORDER).permutation(order)]
            k = self.classes_per_segment
            groups = [order[i : i + k] for i in range(0, len(order), k)]
        for g in groups:
            _refuse_duplicates("segments (one group)", g)
        if self.shared_classes == "refuse":
            _refuse_duplicates("segments", [c for g in groups for c in g],
                               " (`shared_classes: partition` deals a shared class's samples "
                               "between its segments)")
        for g in groups:
            if not g:
                raise ValueError("segments: an empty class group makes an empty segment")
            missing = [c for c in g if not 0 <= int(c) < n_classes]
            if missing:
                raise ValueError(
                    f"segments: classes {missing} are not in source {src.name!r} "
                    f"(classes 0..{n_classes - 1})"
                )
        return groups

    def _make_segments(self, src: SourceData) -> list[SegmentData]:
        groups = self._groups(src)
        named = sorted({int(c) for g in groups for c in g})
        for split, y in (("training", src.y_train), ("test", src.y_test)):
            absent = sorted(set(named) - set(torch.unique(y).tolist()))
            if absent:
                raise ValueError(
                    f"segments: classes {absent[:10]}{' …' if len(absent) > 10 else ''} have no "
                    f"{split} samples in source {src.name!r}; remap the labels to 0..n-1 or "
                    "name the segments' classes explicitly (`segments:`)"
                )
        keep = [self._shares(groups, src.y_train, 0), self._shares(groups, src.y_test, 1)]
        out = []
        for s, g in enumerate(groups):
            lut = torch.full((src.n_classes,), -1, dtype=torch.int64)
            local = self.labels == "local"
            lut[torch.tensor(g)] = torch.arange(len(g)) if local else torch.tensor(g)
            tr, te = keep[0][s], keep[1][s]
            out.append(SegmentData(
                name="classes_" + "_".join(str(c) for c in g), group="split",
                params={"classes": [int(c) for c in g]},
                x_train=src.x_train[tr], y_train=lut[src.y_train[tr]],
                x_test=src.x_test[te], y_test=lut[src.y_test[te]],
            ))
        return out

    def _shares(self, groups: list[list[int]], y: torch.Tensor, split: int) -> list[torch.Tensor]:
        """Per segment, a mask of the samples it owns: every sample of its classes, or, for a
        class several segments share, that segment's part of a seeded deal."""
        masks = [torch.zeros(len(y), dtype=torch.bool) for _ in groups]
        for c in sorted({int(c) for g in groups for c in g}):
            owners = [s for s, g in enumerate(groups) if c in g]
            idx = torch.nonzero(y == c).flatten().numpy()
            if len(owners) > 1:
                idx = rng(self.seed if split == 0 else self.split_seed, Purpose.SPLIT, c,
                          split).permutation(idx)
            for s, part in zip(owners, np.array_split(idx, len(owners))):
                masks[s][torch.from_numpy(part)] = True
        return masks

    def _n_classes(self, src: SourceData, segments: list[SegmentData]) -> int:
        if self.labels == "local":
            return max(len(s.params["classes"]) for s in segments)
        return src.n_classes


class Permuted(StreamBuilder):
    """Domain-incremental: one seeded pixel permutation per segment (train and test)."""

    kind = "permuted"

    def __init__(self, *, n_segments: int = 10, identity_first: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        require_positive("n_segments", n_segments)
        self.n_segments = n_segments
        self.identity_first = identity_first

    def _make_segments(self, src: SourceData) -> list[SegmentData]:
        shape = src.sample_shape
        # positions: pixels of an image or steps of a sequence (one permutation shared by the
        # channels, as in permuted MNIST), or the features of a flat sample
        c, p = (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
        out = []
        for s in range(self.n_segments):
            if s == 0 and self.identity_first:
                perm = torch.arange(p)
            else:
                perm = torch.from_numpy(rng(self.seed, Purpose.PERMUTATION, s).permutation(p))

            def apply(x: torch.Tensor, perm: torch.Tensor = perm) -> torch.Tensor:
                return x.reshape(len(x), c, p)[:, :, perm].reshape(x.shape)

            out.append(SegmentData(
                name=f"permutation_{s}", group="permuted", params={"permutation": s},
                x_train=apply(src.x_train), y_train=src.y_train,
                x_test=apply(src.x_test), y_test=src.y_test,
            ))
        return out


class Rotated(StreamBuilder):
    """Domain-incremental: one rotation angle per segment (bilinear, fill 0, once at build)."""

    kind = "rotated"

    def __init__(
        self,
        *,
        angles: list[float] | None = None,
        n_segments: int = 5,
        max_angle: float = 180.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if angles is None:
            require_positive("n_segments", n_segments)
        self.angles = None if angles is None else [float(a) for a in angles]
        self.n_segments = n_segments
        self.max_angle = float(max_angle)

    def _angles(self) -> list[float]:
        if self.angles is not None:
            return self.angles
        return [float(a) for a in np.linspace(0.0, self.max_angle, self.n_segments)]

    def _make_segments(self, src: SourceData) -> list[SegmentData]:
        _require_images(self, src)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        def rot(x: torch.Tensor, a: float) -> torch.Tensor:
            x = _as_float(x)
            if math.isclose(a % 360.0, 0.0):
                return x.clone()
            return F.rotate(x, a, interpolation=InterpolationMode.BILINEAR, fill=0.0)

        return [
            SegmentData(
                name=f"rotation_{a:g}", group="rotated", params={"angle": a},
                x_train=rot(src.x_train, a), y_train=src.y_train,
                x_test=rot(src.x_test, a), y_test=src.y_test,
            )
            for a in self._angles()
        ]


class Corrupted(StreamBuilder):
    """Test-time adaptation: the source's test images under a sequence of corruptions.

    Schedules: `continual` (each corruption at `severity`), `gradual` (levels 1→5→1 per
    corruption, one segment per level), `mixed` (all pooled and shuffled, one final evaluation).
    A disjoint `test_fraction` of the images forms the held-out test sets. Labels are hidden
    from the learner unless `supervised=True`.
    """

    kind = "corrupted"
    supervised_default = False

    def __init__(
        self,
        *,
        corruptions: list[str] | None = None,
        schedule: str = "continual",
        severity: int = 5,
        levels: list[int] | None = None,
        samples_per_level: int | None = None,
        domain_order: str = "fixed",
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.corruptions = list(DEFAULT_ORDER) if corruptions is None else list(corruptions)
        # the CIFAR-C files hold all 15 benchmark corruptions (+4 extra); generated streams
        # have the ones `corruptions.py` implements
        valid = (CORRUPTION_NAMES_C + EXTRA_CORRUPTION_NAMES_C
                 if self.source in ("cifar10_c", "cifar100_c") else CORRUPTIONS)
        unknown = [c for c in self.corruptions if c not in valid]
        if unknown:
            raise ValueError(f"corruptions: {unknown} unknown; valid: {list(valid)}")
        if schedule not in ("continual", "gradual", "mixed"):
            raise ValueError(f"schedule: {schedule!r} is not continual, gradual or mixed")
        self.levels = [1, 2, 3, 4, 5, 4, 3, 2, 1] if levels is None else [int(v) for v in levels]
        for v in [severity, *self.levels]:
            if v not in (1, 2, 3, 4, 5):
                raise ValueError(f"severity: must be in 1..5, got {v!r}")
        if domain_order not in ("fixed", "random"):
            raise ValueError(f"domain_order: {domain_order!r} is not 'fixed' or 'random'")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction!r}")
        if samples_per_level is not None:
            self.max_samples_per_segment = samples_per_level
        self.schedule = schedule
        self.severity = severity
        self.samples_per_level = samples_per_level
        self.domain_order = domain_order
        self.test_fraction = test_fraction

    def _load(self) -> SourceData:
        if self.source in ("cifar10_c", "cifar100_c"):
            base = "cifar10" if self.source == "cifar10_c" else "cifar100"
            x, y = load_cifar_c(self.root, dataset=base, corruption=self.corruptions[0],
                                severity=self.severity)
            h = hashlib.sha256(self.source.encode())
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
            return SourceData(self.source, x[:0], y[:0], x, y, 10 if base == "cifar10" else 100,
                              h.hexdigest())
        return super()._load()

    def _domains(self) -> list[tuple[str, int]]:
        names = list(self.corruptions)
        if self.domain_order == "random":
            names = [names[i] for i in rng(self.seed, Purpose.CLASS_ORDER).permutation(len(names))]
        if self.schedule == "gradual":
            return [(c, v) for c in names for v in self.levels]
        return [(c, self.severity) for c in names]

    def _make_segments(self, src: SourceData) -> list[SegmentData]:
        _require_images(self, src)
        n = len(src.y_test)
        perm = rng(self.split_seed, Purpose.SPLIT).permutation(n)
        n_test = max(1, int(round(self.test_fraction * n)))
        test_idx = torch.from_numpy(np.sort(perm[:n_test]))
        pool_idx = torch.from_numpy(np.sort(perm[n_test:]))
        out = []
        for s, (name, sev) in enumerate(self._domains()):
            if self.source in ("cifar10_c", "cifar100_c"):
                x, y = load_cifar_c(self.root, dataset=self.source[:-2], corruption=name,
                                    severity=sev)
                x = _as_float(x)
                xtr, xte = x[pool_idx], x[test_idx]
            else:
                x, y = _as_float(src.x_test), src.y_test
                xtr = corrupt(x[pool_idx], name, sev, seed=self.seed, keys=pool_idx, segment=s)
                xte = corrupt(x[test_idx], name, sev, seed=self.seed, keys=test_idx, segment=s)
            out.append(SegmentData(
                name=f"{name}_{sev}", group=name, params={"corruption": name, "severity": sev},
                x_train=xtr, y_train=y[pool_idx], x_test=xte, y_test=y[test_idx],
            ))
        return out

    def build(self) -> Stream:
        stream = super().build()
        return stream.iid() if self.schedule == "mixed" else stream


def split(**params: Any) -> Stream:
    """Build a class-incremental split stream; parameters as `Split`."""
    return Split(**params).build()


def permuted(**params: Any) -> Stream:
    """Build a permuted stream; parameters as `Permuted`."""
    return Permuted(**params).build()


def rotated(**params: Any) -> Stream:
    """Build a rotated stream; parameters as `Rotated`."""
    return Rotated(**params).build()


def corrupted(**params: Any) -> Stream:
    """Build a corruption (TTA) stream; parameters as `Corrupted`."""
    return Corrupted(**params).build()
