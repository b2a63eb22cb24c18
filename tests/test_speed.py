"""Speed work (issue 19) that must not change results: the bottom-k buffer's host-side
decisions against the tensor algorithm they replaced, the detector's Python counters through
a checkpoint, TAME's chunk-batched memory offers against per-batch offers, and Replay's
preallocated replay batch against the plain draw."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptlab.buffers import BottomKBuffer
from adaptlab.detect import ShiftDetector


class ReferenceBottomK(BottomKBuffer):
    """The tensor-only `add` / `set_groups` that `BottomKBuffer` had before its decisions
    moved to the host (commit 10398ad), kept verbatim as the reference."""

    _bar: float | None = None

    def __len__(self) -> int:
        return int(torch.isfinite(self.key).sum())

    def set_groups(self, n_groups: int) -> None:
        self.n_groups = max(self.n_groups, int(n_groups))
        self._bar = None
        if self.balance != "group":
            return
        q = self.quota()
        for g in torch.unique(self.group[torch.isfinite(self.key)]).tolist():
            slots = torch.nonzero((self.group == g) & torch.isfinite(self.key)).flatten()
            if len(slots) > q:
                order = torch.argsort(self.key[slots], stable=True)
                self.key[slots[order[q:]]] = float("inf")

    def add(
        self, x: torch.Tensor, y: torch.Tensor, label: int | torch.Tensor = 0,
        group: int | torch.Tensor | None = None, keys: torch.Tensor | None = None,
    ) -> None:
        keys = self.item_keys(x) if keys is None else keys
        if self._bar is not None and float(keys.min()) >= self._bar:
            return  # the common case once full: one host sync, nothing to store
        labels = torch.as_tensor(label, dtype=torch.int64).expand(len(x)).cpu()
        groups = labels if group is None else (
            torch.as_tensor(group, dtype=torch.int64).expand(len(x)).cpu())
        if self.balance == "group":
            new = int(groups.max()) + 1
            if new > self.n_groups:
                self.set_groups(new)
        # Repeats (within the batch, or of a stored item) are stored once: first label kept.
        uniq, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full_like(uniq, len(keys), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(keys), device=keys.device), "amin")
        first = first[~torch.isin(uniq, self.key)].cpu()
        groups = groups[first] if self.balance == "group" else torch.zeros_like(first)
        q = self.quota()
        for g in torch.unique(groups).tolist():
            new = first[groups == g].to(keys.device)  # batch rows, in key order
            held = torch.nonzero(torch.isfinite(self.key) & (
                (self.group == g) if self.balance == "group" else True)).flatten()
            merged = torch.cat([self.key[held], keys[new]])
            if len(held) == q and keys[new].min() >= merged[
                    : len(held)].max():
                continue  # nothing beats the group's current k-th key
            keep = torch.sort(merged, stable=True).indices[:q]
            evict = torch.ones(len(held), dtype=torch.bool, device=keys.device)
            evict[keep[keep < len(held)]] = False
            self.key[held[evict]] = float("inf")
            rows = new[keep[keep >= len(held)] - len(held)]
            if not len(rows):
                continue
            slots = torch.nonzero(~torch.isfinite(self.key)).flatten()[: len(rows)]
            dev = self.x.device
            self.key[slots] = keys[rows]
            self.x[slots.to(dev)] = x[rows.to(x.device)].to(dev, self.x.dtype)
            self.y[slots.to(self.y.device)] = y[rows.to(y.device)].to(self.y.device)
            self.label[slots] = labels[rows.cpu()].to(self.label.device)
            self.group[slots] = g
        # Full means every group is at its quota, so nothing at or above the max key enters.
        full = bool(torch.isfinite(self.key).all())
        self._bar = float(self.key.max()) if full else None


def _state(buf: BottomKBuffer) -> list[torch.Tensor]:
    return [buf.key, buf.x, buf.y, buf.label, buf.group]


@pytest.mark.parametrize("balance", ["group", "none"])
@pytest.mark.parametrize("grid", [None, 64])  # 64: coarse keys, so ties and repeats abound
def test_bottom_k_host_decisions_match_the_tensor_algorithm(balance: str, grid) -> None:
    g = torch.Generator().manual_seed(3)
    new, ref = (cls(40, (3,), balance=balance, seed=1) for cls in (BottomKBuffer,
                                                                     ReferenceBottomK))
    pool = torch.rand(300, 3, generator=g)
    for step in range(400):
        idx = torch.randint(0, 300, (int(torch.randint(1, 12, (1,), generator=g)),),
                            generator=g)
        x, y = pool[idx], idx % 7
        keys = new.item_keys(x) if grid is None else (idx % grid).double() / grid
        label = int(step // 60)  # a new group every 60 offers: quotas shrink
        group = y if step % 3 == 0 else None
        for buf in (new, ref):
            buf.add(x, y, label=label, group=group, keys=keys)
        for a, b in zip(_state(new), _state(ref), strict=True):
            assert torch.equal(a, b), step
        assert len(new) == len(ref)
    for a, b in zip(new.items(), ref.items(), strict=True):
        assert torch.equal(a, b)
    assert len(new) == (new.quota() * new.n_groups if balance == "group" else new.capacity)


def test_bottom_k_host_copy_is_rebuilt_after_a_load() -> None:
    a = BottomKBuffer(20, (3,), balance="group")
    x = torch.rand(50, 3)
    a.add(x[:30], torch.zeros(30, dtype=torch.long), label=0)
    b = BottomKBuffer(20, (3,), balance="group")
    assert len(b) == 0  # builds b's (empty) host copy
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert len(b) == len(a) == 20
    for buf in (a, b):
        buf.add(x[30:], torch.ones(20, dtype=torch.long), label=1)
    for s, t in zip(_state(a), _state(b), strict=True):
        assert torch.equal(s, t)


def test_detector_counters_survive_a_checkpoint_and_old_checkpoints_load() -> None:
    det = ShiftDetector(window=5, grace=2)
    det.add_channel(0.7)
    det.add_channel(0.5)
    for v in (0.4, 0.3, 0.35, 0.2, 0.25, 0.3, 0.31):
        det.refresh_threshold(1)
        det.commit(1, v)
    sd = det.state_dict()
    assert sd["steps"].tolist() == [0, 7] and sd["count"].tolist() == [1, 5]
    assert sd["head"].tolist() == [1, (1 + 7) % 5]
    fresh = ShiftDetector(window=5, grace=2)
    fresh.load_state_dict(copy.deepcopy(sd))
    assert (fresh.steps, fresh.count, fresh.head) == (det.steps, det.count, det.head)
    for d in (det, fresh):
        d.refresh_threshold(1)
    assert torch.equal(fresh.tau, det.tau) and torch.equal(fresh._entries(1), det._entries(1))
    with pytest.raises(RuntimeError, match="Missing key"):
        ShiftDetector(window=5).load_state_dict({k: v for k, v in sd.items() if k != "steps"})
