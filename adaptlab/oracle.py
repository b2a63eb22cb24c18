"""The segment-change oracle: callbacks that may read the truth (an upper bound, never a
task-free learner) ask here whether the true segment changed since the last chunk.

The truth comes from `datamodule.batch_meta()["segment_ids"]` (the Lightning data module,
or the Avalanche bridge's stand-in built from the current experience).
"""

from __future__ import annotations

from typing import Any


def segment_span(datamodule: Any) -> tuple[int, int] | None:
    """The true segment of the current chunk's first and last sample; None when the data
    module gives no segment ids."""
    meta = datamodule.batch_meta() if callable(getattr(datamodule, "batch_meta", None)) else {}
    seg = meta.get("segment_ids")
    if seg is None or len(seg) == 0:
        return None
    return int(seg[0]), int(seg[-1])


class SegmentChange:
    """Whether the true segment changed between chunks.

    `update(first, last)` is True when the chunk's first segment differs from the segment
    remembered from the previous chunk, then remembers `last` (pass `last=first` to
    remember the first). A change inside a chunk is seen at the next chunk at best: run
    with `data.batches_per_step: 1` where the moment matters.
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def update(self, first: int, last: int | None = None) -> bool:
        changed = self.last is not None and first != self.last
        self.last = first if last is None else last
        return changed

    def update_from(self, datamodule: Any, *, remember: str = "last") -> bool:
        """`update` with the current chunk of `datamodule` (False without segment ids)."""
        span = segment_span(datamodule)
        if span is None:
            return False
        return self.update(span[0], span[1] if remember == "last" else span[0])

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state.get("last")
