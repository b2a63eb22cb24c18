"""The segment-change oracle (`adaptlab.oracle`) that oracle callbacks share."""

from __future__ import annotations

import torch

from adaptlab.oracle import SegmentChange, segment_span


class _DM:
    def __init__(self, ids: list[int] | None) -> None:
        self.ids = ids

    def batch_meta(self) -> dict:
        return {} if self.ids is None else {"segment_ids": torch.tensor(self.ids)}


def test_a_change_is_reported_once_at_the_first_chunk_of_the_new_segment() -> None:
    oracle = SegmentChange()
    seen = [oracle.update_from(_DM(ids)) for ids in ([0, 0], [0, 0], [1, 1], [1, 1], [0, 0])]
    assert seen == [False, False, True, False, True]


def test_remember_first_or_last_of_a_chunk_that_straddles_a_change() -> None:
    # [0, 1] then [1]: remembering the last sees no change; remembering the first sees it late
    last, first = SegmentChange(), SegmentChange()
    assert [last.update_from(_DM(i)) for i in ([0, 1], [1])] == [False, False]
    assert [first.update_from(_DM(i), remember="first") for i in ([0, 1], [1])] == [False, True]


def test_no_segment_ids_means_no_change_and_no_memory() -> None:
    oracle = SegmentChange()
    oracle.update(3)
    assert segment_span(_DM(None)) is None and segment_span(object()) is None
    assert not oracle.update_from(_DM(None))
    assert oracle.last == 3
    state = oracle.state_dict()
    fresh = SegmentChange()
    fresh.load_state_dict(state)
    assert fresh.update(4) is True
