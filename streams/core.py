"""The `Stream`: an ordered, deterministic sequence of samples drawn from segments.

A stream is built once and never changes. The learner only ever sees slices of `x` and `y`;
everything segment-related (`segment_ids`, boundaries, test sets) is for the evaluator.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch

UNLABELED = -100
"""Label given to the learner on unsupervised (TTA) streams: cross-entropy's `ignore_index`,
so an accidental supervised loss is NaN rather than silently right."""


class Purpose(IntEnum):
    """Fixed codes so that every random purpose has its own, stable seed sequence."""

    CLASS_ORDER = 1
    PERMUTATION = 2
    SHUFFLE = 3
    CORRUPTION = 4
    DIRICHLET = 5
    MIXING = 6
    SUBSAMPLE = 7
    SPLIT = 8
    IID = 9
    ICL_TRAIN = 10
    ICL_EVAL = 11
    ICL_MAP = 12
    ICL_TASK = 13


def require_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    """One wording for every size-like option: a positive integer (or None where allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def rng(seed: int, purpose: Purpose, *key: int) -> np.random.Generator:
    """A numpy generator for one purpose and key; never the salted `hash()`, never global."""
    seq = np.random.SeedSequence(int(seed), spawn_key=(int(purpose), *(int(k) for k in key)))
    return np.random.default_rng(seq)


@dataclass(frozen=True)
class Segment:
    """One source of samples in a stream: a task, a domain, a corruption level."""

    id: int
    name: str
    group: str
    params: dict[str, Any]
    n_train: int
    n_test: int

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "group": self.group,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "params": self.params,
        }


@dataclass(frozen=True, eq=False)
class Stream:
    """A built stream: samples in order, plus what only the evaluator may read.

    `x` is `(N, C, H, W)` float32 in [0, 1] or uint8 (converted per chunk by the data module).
    `eval_positions[i]` is the sample count after which row i of the accuracy matrix is
    evaluated; `row_segments[i]` is the segment whose occurrence ends there. `first_rows[j]`
    is the row at which segment `segments[j]` first completed (metrics.md's `first`).
    """

    name: str
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    segment_ids: torch.Tensor
    segments: tuple[Segment, ...]
    test_sets: dict[int, tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    n_classes: int
    eval_positions: tuple[int, ...]
    row_segments: tuple[int, ...]
    first_rows: tuple[int, ...]
    true_shifts: tuple[int, ...]
    seed: int
    split_seed: int
    params: dict[str, Any]
    source_fingerprint: str
    supervised: bool = True
    order_digest: str = ""
    fingerprint: str = field(default="", init=False)

    def __post_init__(self) -> None:
        blob = json.dumps(
            {"params": self.params, "source": self.source_fingerprint, "order": self.order_digest},
            sort_keys=True,
            default=str,
        )
        object.__setattr__(self, "fingerprint", hashlib.sha256(blob.encode()).hexdigest())

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_samples(self) -> int:
        return len(self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def segment_index(self) -> dict[int, int]:
        """Segment id -> column of the accuracy matrix."""
        return {s.id: j for j, s in enumerate(self.segments)}

    def task_local_labels(self) -> bool:
        """Whether every segment labels its classes 0..c-1 (Split `labels: local`, domain
        streams), rather than with global class ids (class-incremental)."""
        for _, y in self.test_sets.values():
            present = torch.unique(y)
            if len(present) and int(present.max()) >= len(present):
                return False
        return True

    def learner_labels(self, y: torch.Tensor) -> torch.Tensor:
        """What the learner receives as labels: the true ones, or UNLABELED on TTA streams."""
        return y if self.supervised else torch.full_like(y, UNLABELED)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary used in metrics.json["stream"] and in hparams."""
        return {
            "name": self.name,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "n_samples": self.n_samples,
            "batch_size": self.batch_size,
            "n_classes": self.n_classes,
            "supervised": self.supervised,
            "seed": self.seed,
            "split_seed": self.split_seed,
            "segments": [s.describe() for s in self.segments],
            "eval_positions": list(self.eval_positions),
            "row_segments": list(self.row_segments),
            "first_rows": list(self.first_rows),
            "true_shifts": list(self.true_shifts),
            "params": self.params,
        }

    def iid(self) -> Stream:
        """The same samples in one seeded i.i.d. order, evaluated once at the end (Joint).

        Every segment counts as learnt at that single row, so forgetting is undefined, and
        `acc_final` is the upper bound a stream learner is compared with.
        """
        perm = torch.from_numpy(rng(self.seed, Purpose.IID).permutation(len(self)))
        return Stream(
            name=f"{self.name}[iid]",
            kind=self.kind,
            x=self.x[perm].contiguous(),
            y=self.y[perm].contiguous(),
            segment_ids=self.segment_ids[perm].contiguous(),
            segments=self.segments,
            test_sets=self.test_sets,
            batch_size=self.batch_size,
            n_classes=self.n_classes,
            eval_positions=(len(self),),
            row_segments=(self.row_segments[-1],),
            first_rows=tuple(0 for _ in self.segments),
            true_shifts=(),
            seed=self.seed,
            split_seed=self.split_seed,
            params={**self.params, "presentation": "iid"},
            source_fingerprint=self.source_fingerprint,
            supervised=self.supervised,
            order_digest=self.order_digest + ":iid",
        )


def digest(*arrays: np.ndarray) -> str:
    """sha256 over the bytes of index arrays (the order part of a fingerprint)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
