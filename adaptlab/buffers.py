"""`ReservoirBuffer`: uniform sampling of everything seen, in fixed preallocated tensors.

Reservoir sampling (Vitter's algorithm R) keeps each of the n items seen so far with
probability M/n, without knowing n in advance: the task-free way to store a memory.
Its random draws come from its own checkpointed generator, so a resumed run draws the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .streams.core import require_positive


class ReservoirBuffer(nn.Module):
    """Fixed-capacity uniform memory of `(x, y)` pairs; state lives in the module state_dict."""

    def __init__(self, capacity: int, input_shape: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        require_positive("memory_size", capacity)
        self.capacity = capacity
        self.register_buffer("x", torch.zeros(capacity, *input_shape))
        self.register_buffer("y", torch.zeros(capacity, dtype=torch.int64))
        self.n_seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer a batch; item t (0-based count over the stream) takes slot t while the buffer
        fills, then slot j ~ U{0..t} if j < capacity. Later items win a shared slot, exactly as
        one-at-a-time insertion would. A batch is a handful of items, so the slot logic runs
        on Python ints and the tensors see one slice or one indexed copy."""
        b, n, cap = len(x), self.n_seen, self.capacity
        fill = max(0, min(b, cap - n))
        if fill:
            self.x[n : n + fill] = x[:fill]
            self.y[n : n + fill] = y[:fill]
        if fill < b:
            draws = torch.rand(b - fill, generator=self.gen, dtype=torch.float64).tolist()
            winner: dict[int, int] = {}  # slot -> last item index that drew it
            for i, u in enumerate(draws, start=fill):
                j = int(u * (n + i + 1))
                if j < cap:
                    winner[j] = i
            if winner:
                dst = torch.tensor(list(winner), device=self.x.device)
                src = torch.tensor(list(winner.values()), device=x.device)
                self.x[dst] = x[src].to(self.x.dtype)
                self.y[dst] = y[src]
        self.n_seen = n + b

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k items drawn uniformly with replacement from what is stored."""
        idx = torch.randint(0, len(self), (k,), generator=self.gen).to(self.x.device)
        return self.x[idx], self.y[idx]

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_seen": self.n_seen, "gen": self.gen.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.gen.set_state(state["gen"])


class BottomKBuffer(nn.Module):
    """Uniform sample without replacement by bottom-k keys, with optional group quotas.

    Every arriving item gets a key in [0, 1); the buffer keeps the k items with the smallest
    keys, which is a uniform sample of the distinct items seen (TAME spec §5). With
    `keys="content"` the key is a seeded hash of the item's pixels quantised to 1/1024:
    repeats of an item share a key and are stored once, and every rank computes the same
    keys with no random state. `keys="random"` draws a key per arrival instead.

    Each stored item carries a `label` (TAME: the expert that trained on its batch; the
    first label is kept) and a `group` (the label unless given). `balance="group"` gives each
    of the G groups seen so far a quota of floor(capacity / G), trimmed by key when G grows;
    `"none"` keeps one global bottom-k.
    """

    P = 2**31 - 1  # Mersenne prime of the content hash

    def __init__(
        self,
        capacity: int,
        input_shape: Sequence[int],
        keys: str = "content",
        balance: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"buffer capacity: must be a positive integer, got {capacity!r}")
        if keys not in ("content", "random"):
            raise ValueError(f"keys: {keys!r} is not 'content' or 'random'")
        if balance not in ("group", "none"):
            raise ValueError(f"balance: {balance!r} is not 'group' or 'none'")
        self.capacity, self.keys, self.balance = capacity, keys, balance
        self.register_buffer("x", torch.zeros(capacity, *input_shape))
        self.register_buffer("y", torch.zeros(capacity, dtype=torch.int64))
        self.register_buffer("label", torch.zeros(capacity, dtype=torch.int64))
        self.register_buffer("group", torch.zeros(capacity, dtype=torch.int64))
        self.register_buffer("key", torch.full((capacity,), float("inf"), dtype=torch.float64))
        gen = torch.Generator().manual_seed(seed)
        n_in = 1
        for s in input_shape:
            n_in *= int(s)
        self.register_buffer(
            "coef", torch.randint(1, self.P, (n_in,), generator=gen, dtype=torch.int64),
            persistent=False,
        )
        self.gen = gen  # draws `random` keys; checkpointed
        self.n_groups = 1
        self._bar: float | None = None  # when full: no key >= this can enter (a cache)

    def __len__(self) -> int:
        return int(torch.isfinite(self.key).sum())

    def quota(self) -> int:
        return self.capacity // self.n_groups if self.balance == "group" else self.capacity

    def item_keys(self, x: torch.Tensor) -> torch.Tensor:
        """One key in [0, 1) per item (float64, on the buffer's device)."""
        if self.keys == "random":
            keys = torch.rand(len(x), generator=self.gen, dtype=torch.float64)
            return keys.to(self.key.device)
        q = torch.round(x.reshape(len(x), -1).double() * 1024).long().remainder(self.P)
        h = (q * self.coef.to(q.device)).remainder(self.P).sum(1).remainder(self.P)
        return h.to(self.key.device).double() / self.P

    def set_groups(self, n_groups: int) -> None:
        """`balance="group"`: G groups now share the capacity; drop each group's largest
        keys beyond its new quota."""
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
        """Offer a batch; items whose key beats their group's current k-th key are stored.
        `keys` may pass precomputed `item_keys(x)` (content keys of buffers with one seed)."""
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

    def items(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored (x, y, label), in key order (deterministic)."""
        idx = torch.nonzero(torch.isfinite(self.key)).flatten()
        idx = idx[torch.argsort(self.key[idx], stable=True)]
        return self.x[idx], self.y[idx], self.label[idx]

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_groups": self.n_groups, "gen": self.gen.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_groups = int(state["n_groups"])
        self.gen.set_state(state["gen"])
        self._bar = None
