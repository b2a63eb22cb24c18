"""`ReservoirBuffer`: uniform sampling of everything seen, in fixed preallocated tensors.

Reservoir sampling (Vitter's algorithm R) keeps each of the n items seen so far with
probability M/n, without knowing n in advance: the task-free way to store a memory.
Its random draws come from its own checkpointed generators, so a resumed run draws the same.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .streams.core import require_positive

INF = float("inf")


class ReservoirBuffer(nn.Module):
    """Fixed-capacity uniform memory of `(x, y)` pairs; state lives in the module state_dict.

    Algorithm R's decisions (item t, 0-based, enters with probability M/(t+1), into a
    uniform slot) are drawn by skipping ahead: one uniform gives the index of the next item
    that enters (Vitter 1985, Algorithm X), so a batch in which nothing enters, nearly every
    batch once the stream is long, costs one integer comparison and no random draw. The
    decisions come from a Python `random.Random` (a scalar draw costs ~50 ns, a torch draw
    ~4 µs); the replay draws from a `torch.Generator`. Both states are checkpointed.

    `replay_batch` serves a replay learner's step ([batch; k memory draws], then the batch
    offered) at a cost that does not grow with the memory's bookkeeping: see there.
    """

    BLOCK_ROWS = 1024
    """Rows of [batch; draws] that `replay_batch` prepares at once (at most 32 steps)."""

    def __init__(self, capacity: int, input_shape: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        require_positive("memory_size", capacity)
        self.capacity = capacity
        self.register_buffer("x", torch.zeros(capacity, *input_shape))
        self.register_buffer("y", torch.zeros(capacity, dtype=torch.int64))
        self.n_seen = 0
        self.gen = torch.Generator().manual_seed(seed)  # replay draws
        self.rng = random.Random(seed)  # reservoir decisions
        self.next_entry = 0  # stream index of the next item to enter (= n_seen while filling)
        self._idx: torch.Tensor | None = None  # `sample_into`'s index buffer
        self._fill_buf: tuple[torch.Tensor, ...] | None = None  # `replay_batch` while filling
        self._block: _ReplayBlock | None = None  # `replay_batch` once full
        self._resume: dict[str, Any] | None = None  # a loaded block's draws and step

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def _skip(self, t: int) -> int:
        """The index of the first item at or after item `t` (t >= capacity) that enters.
        Items enter independently, item i with probability M/(i+1), so P(none of t..m
        enters) = prod_{i=t..m} (i+1-M)/(i+1); the first m where that falls below one
        uniform is the answer (inversion by sequential search: a float multiply per skipped
        item)."""
        u = 1.0 - self.rng.random()  # in (0, 1]
        k = self.capacity
        q = (t + 1 - k) / (t + 1)
        while q >= u:
            t += 1
            q *= (t + 1 - k) / (t + 1)
        return t

    def _entries(self, b: int) -> dict[int, int]:
        """Reservoir decisions for the next `b` items, counted as seen: slot -> the batch
        row that ends up there (a later item wins a slot shared within the batch). Rows that
        fill an empty slot are not in it: `add` copies them as one slice."""
        n, cap = self.n_seen, self.capacity
        end = n + b
        state = self.__dict__  # plain ints: nn.Module.__setattr__ costs ~1.5 µs a call
        state["n_seen"] = end
        t = state["next_entry"]
        if t >= end:  # nothing in this batch enters
            return {}
        if t < cap:  # filling: rows t-n.. take slots t..; decisions start at the capacity
            t = self._skip(cap) if end >= cap else end
        winner: dict[int, int] = {}
        rand = self.rng.random
        while t < end:
            winner[int(rand() * cap)] = t - n
            t = self._skip(t + 1)
        state["next_entry"] = t
        return winner

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer a batch; item t (0-based count over the stream) takes slot t while the buffer
        fills, then, if it enters, a uniform slot. Later items win a shared slot, exactly as
        one-at-a-time insertion would. The tensors see one slice or one indexed copy."""
        self.flush()
        n = self.n_seen
        fill = max(0, min(x.shape[0], self.capacity - n))
        winner = self._entries(x.shape[0])
        if fill:
            self.x[n : n + fill] = x[:fill]
            self.y[n : n + fill] = y[:fill]
        if winner:
            self._store(winner, x, y)

    def _store(self, rows: dict[int, int], x: torch.Tensor, y: torch.Tensor) -> None:
        """Memory slot <- row of (x, y) for each entry of `rows`: one indexed copy each."""
        mx, my = self.x, self.y
        dst = torch.tensor(list(rows), device=mx.device)
        src = torch.tensor(list(rows.values()), device=x.device)
        mx.index_copy_(0, dst, x.index_select(0, src).to(mx.device, mx.dtype))
        my.index_copy_(0, dst, y.index_select(0, src).to(my.device, my.dtype))

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k items drawn uniformly with replacement from what is stored."""
        self.flush()
        idx = torch.randint(0, len(self), (k,), generator=self.gen).to(self.x.device)
        return self.x[idx], self.y[idx]

    def sample_into(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """`sample(len(x))` written into preallocated `x`, `y` (the same draws from the same
        generator): a replay batch without new tensors per step."""
        self.flush()
        k = x.shape[0]
        idx = self._idx
        if idx is None or idx.shape[0] != k:
            idx = self._idx = torch.empty(k, dtype=torch.int64)
        torch.randint(0, len(self), (k,), generator=self.gen, out=idx)
        mx, my = self.x, self.y
        if mx.device.type != "cpu":
            idx = idx.to(mx.device)
        torch.index_select(mx, 0, idx, out=x)
        torch.index_select(my, 0, idx, out=y)

    # -- a replay learner's step ---------------------------------------------------------------
    def replay_batch(
        self, x: torch.Tensor, y: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[x; k items drawn uniformly with replacement from the memory] and [y; their
        labels], then `add(x, y)`: one step of experience replay. The draws see the memory as
        it was before this batch, exactly as `sample_into` then `add` would (the memory must
        hold something). The two tensors are reused: valid until the next call.

        While the memory fills, that is what runs. Once it is full the draws of up to 32
        steps (`BLOCK_ROWS`) are made and gathered at once into a block holding each step's
        [batch; draws]; a step then copies its batch in and returns the block's row. An item
        that enters the memory is written into the block's later rows that drew its slot
        (so every draw sees the memory of its own step), and into the memory itself when
        the block is used up (`flush`; `state_dict`, `add` and `sample` flush first). A step
        thus costs two copies, plus an indexed copy on the few steps whose items enter and
        were drawn later in the block, instead of a draw, two gathers and two writes."""
        n = x.shape[0]
        if self.n_seen < self.capacity:
            return self._replay_filling(x, y, k)
        blk = self._block
        if blk is None or blk.s == blk.steps or not blk.fits(x, y, k):
            blk = self._new_block(x, y, k)
        s = blk.s
        inp, tgt, bx, by = blk.views[s]
        bx.copy_(x)
        by.copy_(y)
        blk.s = s + 1
        winner = self._entries(n)
        if winner:
            row, first = s * (n + k), (s + 1) * k  # the batch's rows; later steps' draws
            dst: list[int] = []
            src: list[int] = []
            for slot, i in winner.items():
                blk.pending[slot] = row + i
                for p in blk.where.get(slot, ()):
                    if p >= first:
                        dst.append(p // k * (n + k) + n + p % k)
                        src.append(row + i)
            if dst:
                d = torch.tensor(dst).to(blk.x.device)
                r = torch.tensor(src).to(blk.x.device)
                blk.flat_x.index_copy_(0, d, blk.flat_x.index_select(0, r))
                blk.flat_y.index_copy_(0, d, blk.flat_y.index_select(0, r))
        return inp, tgt

    def _replay_filling(
        self, x: torch.Tensor, y: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        buf = self._fill_buf
        if buf is None or buf[2].shape != x.shape or buf[1].shape[0] != n + k \
                or buf[0].dtype != x.dtype or buf[0].device != x.device:
            inp = torch.empty(n + k, *x.shape[1:], dtype=x.dtype, device=x.device)
            tgt = torch.empty(n + k, dtype=y.dtype, device=y.device)
            buf = self._fill_buf = (inp, tgt, inp[:n], tgt[:n], inp[n:], tgt[n:])
        inp, tgt, bx, by, mx, my = buf
        bx.copy_(x)
        by.copy_(y)
        self.sample_into(mx, my)
        self.add(x, y)
        return inp, tgt

    def _new_block(self, x: torch.Tensor, y: torch.Tensor, k: int) -> _ReplayBlock:
        """Flush the last block; draw the next block's indices (or take a loaded block's)
        and gather its draws from the memory."""
        self.flush()
        n = x.shape[0]
        blk = self._block
        if blk is None or not blk.fits(x, y, k):
            steps = max(1, min(32, self.BLOCK_ROWS // (n + k)))
            blk = self._block = _ReplayBlock(x, y, k, steps)
        resume, self._resume = self._resume, None
        if resume is not None and (resume["n"], resume["k"]) == (n, k):
            draws, blk.s = list(resume["draws"]), int(resume["step"])
        else:
            draws = torch.randint(0, self.capacity, (blk.steps * k,),
                                  generator=self.gen).tolist()
            blk.s = 0
        blk.set_draws(draws)
        first = blk.s * k
        idx = torch.tensor(draws[first:], device=self.x.device)
        mx = self.x.index_select(0, idx).to(blk.x.device, blk.x.dtype)
        my = self.y.index_select(0, idx).to(blk.y.device, blk.y.dtype)
        blk.x[blk.s :, n:].copy_(mx.view(blk.steps - blk.s, k, *mx.shape[1:]))
        blk.y[blk.s :, n:].copy_(my.view(blk.steps - blk.s, k))
        return blk

    def flush(self) -> None:
        """Write the entries `replay_batch` holds back into the memory tensors."""
        blk = self._block
        if blk is None or not blk.pending:
            return
        self._store(blk.pending, blk.flat_x, blk.flat_y)
        blk.pending = {}

    # -- state ---------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        self.flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def get_extra_state(self) -> dict[str, Any]:
        version, mt, gauss = self.rng.getstate()
        state = {"n_seen": self.n_seen, "gen": self.gen.get_state(),
                 "next_entry": self.next_entry, "rng": [version, list(mt), gauss]}
        blk = self._block
        if blk is not None and blk.s < blk.steps:  # the block's remaining draws
            state["block"] = {"draws": blk.draws, "step": blk.s, "n": blk.n, "k": blk.k}
        elif self._resume is not None:
            state["block"] = self._resume
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.gen.set_state(state["gen"])
        self._block, self._resume = None, None
        if "rng" in state:
            version, mt, gauss = state["rng"]
            self.rng.setstate((version, tuple(mt), gauss))
            self.next_entry = int(state["next_entry"])
        else:  # written before the skip-ahead: decisions go on from this generator's state
            n = self.n_seen
            self.next_entry = n if n < self.capacity else self._skip(n)
        self._resume = state.get("block")


class _ReplayBlock:
    """`ReservoirBuffer.replay_batch`'s prepared steps: `x[s]` = [batch s; its k draws]."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int, steps: int) -> None:
        n = x.shape[0]
        self.n, self.k, self.steps, self.s = n, k, steps, 0
        self.x = torch.empty(steps, n + k, *x.shape[1:], dtype=x.dtype, device=x.device)
        self.y = torch.empty(steps, n + k, dtype=y.dtype, device=y.device)
        self.flat_x = self.x.view(steps * (n + k), *x.shape[1:])
        self.flat_y = self.y.view(-1)
        self.views = [(self.x[s], self.y[s], self.x[s, :n], self.y[s, :n]) for s in range(steps)]
        self.draws: list[int] = []
        self.where: dict[int, list[int]] = {}  # slot -> positions in `draws` that drew it
        self.pending: dict[int, int] = {}  # slot -> row of `flat_x` to write there

    def fits(self, x: torch.Tensor, y: torch.Tensor, k: int) -> bool:
        bx = self.views[0][2]
        return (k == self.k and bx.shape == x.shape and bx.dtype == x.dtype
                and bx.device == x.device and self.y.dtype == y.dtype)

    def set_draws(self, draws: list[int]) -> None:
        self.draws = draws
        self.where = {}
        for p, slot in enumerate(draws):
            self.where.setdefault(slot, []).append(p)


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

    The decisions run on a host copy of the keys and groups (Python floats and ints, rebuilt
    from the tensors after a load): an offer that changes nothing, the common case once a
    group is full, costs a few set look-ups and no device work; one that stores items writes
    the tensors with one indexed copy each. `offer` takes keys already on the host, so a
    caller can bring a whole chunk's keys over in one transfer (TAME does).
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
        self.register_buffer("key", torch.full((capacity,), INF, dtype=torch.float64))
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
        self._host: _HostIndex | None = None  # the host copy; None: rebuild from the tensors

    def __len__(self) -> int:
        return len(self._index().stored)

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

    # -- the host copy ------------------------------------------------------------------------
    def _index(self) -> _HostIndex:
        if self._host is None:
            self._host = _HostIndex(self.key.tolist(), self.group.tolist(),
                                    self.balance == "group")
        return self._host

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._host = None

    def _write(self, slots: list[int], x: torch.Tensor | None = None,
               y: torch.Tensor | None = None, rows: list[int] | None = None,
               labels: list[int] | None = None, group: list[int] | None = None) -> None:
        """Copy the host keys of `slots` (and, for filled slots, the items) to the tensors."""
        h = self._index()
        dev = self.key.device
        idx = torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True)
        self.key[idx] = torch.tensor([h.keys[s] for s in slots],
                                     dtype=torch.float64).to(dev, non_blocking=True)
        if rows:
            src = torch.tensor(rows, dtype=torch.long)
            self.x[idx] = x[src.to(x.device)].to(self.x.device, self.x.dtype)
            self.y[idx] = y[src.to(y.device)].to(self.y.device)
            self.label[idx] = torch.tensor(labels, dtype=torch.int64).to(dev)
            self.group[idx] = torch.tensor(group, dtype=torch.int64).to(dev)

    def set_groups(self, n_groups: int) -> None:
        """`balance="group"`: G groups now share the capacity; drop each group's largest
        keys beyond its new quota (ties: the later slot goes)."""
        self.n_groups = max(self.n_groups, int(n_groups))
        if self.balance != "group":
            return
        h, q = self._index(), self.quota()
        evicted = []
        for g in sorted(h.members):
            slots = h.slots(g)
            if len(slots) > q:
                for s in sorted(slots, key=h.keys.__getitem__)[q:]:
                    h.evict(s)
                    evicted.append(s)
        h.settle()
        if evicted:
            self._write(sorted(evicted))

    def add(
        self, x: torch.Tensor, y: torch.Tensor, label: int | torch.Tensor = 0,
        group: int | torch.Tensor | None = None, keys: torch.Tensor | None = None,
    ) -> None:
        """Offer a batch; items whose key beats their group's current k-th key are stored.
        `keys` may pass precomputed `item_keys(x)` (content keys of buffers with one seed)."""
        keys = self.item_keys(x) if keys is None else keys
        self.offer(x, y, keys.tolist(), label, group)

    def admits(self, keys: list[float], groups: list[int] | None = None) -> bool:
        """Could any of these items (host keys; their groups under `balance="group"`) enter
        now? False when every key is stored already or cannot beat its group's k-th key:
        offering them would change nothing, so a caller may skip a whole run of offers."""
        if not keys:
            return False
        h, q = self._index(), self.quota()
        if self.balance != "group":
            n, top = h.count.get(0, 0), h.top.get(0, -INF)
            return not all(k in h.stored or (n == q and k >= top) for k in keys)
        if groups is None or max(groups) + 1 > self.n_groups:
            return True  # a new group changes the quotas
        stored, count, top = h.stored, h.count, h.top
        return not all(k in stored or (count.get(g, 0) == q and k >= top.get(g, -INF))
                       for k, g in zip(keys, groups, strict=True))

    def offer(
        self, x: torch.Tensor, y: torch.Tensor, keys: list[float],
        label: int | torch.Tensor | list[int] = 0,
        group: int | torch.Tensor | list[int] | None = None,
    ) -> None:
        """`add` with the batch's keys already on the host (Python floats). Repeats (within
        the batch, or of a stored item) are stored once, with the first label."""
        b, h = len(keys), self._index()
        labels = _ints(label, b)
        groups = labels if group is None else _ints(group, b)
        grouped = self.balance == "group"
        if grouped and max(groups) + 1 > self.n_groups:
            self.set_groups(max(groups) + 1)
        q = self.quota()
        stored = h.stored
        if not self.admits(keys, groups):  # the common case
            return
        first: dict[float, int] = {}
        for i, k in enumerate(keys):
            if k not in first and k not in stored:
                first[k] = i
        order = sorted(first)  # new distinct keys, ascending
        fills: dict[int, int] = {}  # slot -> batch row
        evicted: list[int] = []
        for g in sorted({groups[first[k]] if grouped else 0 for k in order}):
            new = [first[k] for k in order if (groups[first[k]] if grouped else 0) == g]
            held = h.slots(g)
            merged = [h.keys[s] for s in held] + [keys[r] for r in new]
            if len(held) == q and keys[new[0]] >= max(merged[: len(held)]):
                continue  # nothing beats the group's current k-th key
            keep = sorted(range(len(merged)), key=merged.__getitem__)[:q]  # stable
            kept = set(keep)
            for j, s in enumerate(held):
                if j not in kept:
                    h.evict(s)
                    evicted.append(s)
            rows = [new[j - len(held)] for j in keep if j >= len(held)]
            for s, r in zip(h.free(len(rows)), rows, strict=True):
                h.store(s, keys[r], g)
                fills[s] = r
        h.settle()
        if not fills and not evicted:
            return
        slots = sorted(set(evicted) | set(fills))
        filled = [s for s in slots if s in fills]
        self._write([s for s in slots if s not in fills])
        if filled:
            rows = [fills[s] for s in filled]
            self._write(filled, x, y, rows, [labels[r] for r in rows],
                        [h.groups[s] for s in filled])

    def items(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored (x, y, label), in key order (deterministic)."""
        h = self._index()
        slots = sorted((s for m in h.members.values() for s in m), key=lambda s: (h.keys[s], s))
        idx = torch.tensor(slots, dtype=torch.long).to(self.x.device)
        return self.x[idx], self.y[idx], self.label[idx]

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_groups": self.n_groups, "gen": self.gen.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_groups = int(state["n_groups"])
        self.gen.set_state(state["gen"])
        self._host = None


def _ints(v: int | torch.Tensor | list[int], n: int) -> list[int]:
    """`v` as n Python ints (a scalar repeated)."""
    if isinstance(v, list):
        return v
    if isinstance(v, torch.Tensor):
        return v.expand(n).tolist() if v.dim() == 0 else v.tolist()
    return [int(v)] * n


class _HostIndex:
    """`BottomKBuffer`'s keys and groups per slot as Python values, with what an offer needs:
    the set of stored keys, each group's slots, and per group its item count and largest
    key (`balance="none"`: one group, 0)."""

    def __init__(self, keys: list[float], groups: list[int], grouped: bool) -> None:
        self.keys, self.groups, self.grouped = keys, groups, grouped
        self.stored = {k for k in keys if k != INF}
        self.members: dict[int, set[int]] = {}
        for s, k in enumerate(keys):
            if k != INF:
                self.members.setdefault(self._g(s), set()).add(s)
        self.empty = [s for s, k in enumerate(keys) if k == INF]  # a min-heap of free slots
        self.count: dict[int, int] = {}
        self.top: dict[int, float] = {}
        self.dirty = set(self.members)
        self.settle()

    def _g(self, s: int) -> int:
        return self.groups[s] if self.grouped else 0

    def settle(self) -> None:
        """Recount the groups that `evict` / `store` touched."""
        for g in self.dirty:
            mine = self.members.get(g, ())
            self.count[g] = len(mine)
            self.top[g] = max((self.keys[s] for s in mine), default=-INF)
        self.dirty = set()

    def slots(self, g: int) -> list[int]:
        """Group g's occupied slots, ascending."""
        return sorted(self.members.get(g, ()))

    def free(self, n: int) -> list[int]:
        """Take the n lowest empty slots, ascending."""
        return [heapq.heappop(self.empty) for _ in range(n)]

    def evict(self, s: int) -> None:
        g = self._g(s)
        self.stored.discard(self.keys[s])
        self.keys[s] = INF
        self.members[g].discard(s)
        heapq.heappush(self.empty, s)
        self.dirty.add(g)

    def store(self, s: int, key: float, g: int) -> None:
        self.keys[s], self.groups[s] = key, g
        self.stored.add(key)
        g = self._g(s)
        self.members.setdefault(g, set()).add(s)
        self.dirty.add(g)
