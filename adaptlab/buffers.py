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


class ReservoirBuffer(nn.Module):
    """Fixed-capacity uniform memory of `(x, y)` pairs; state lives in the module state_dict."""

    def __init__(self, capacity: int, input_shape: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"memory_size: must be a positive integer, got {capacity!r}")
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
        one-at-a-time insertion would."""
        b = len(x)
        counts = torch.arange(self.n_seen, self.n_seen + b)
        slots = counts.clone()
        full = counts >= self.capacity
        if bool(full.any()):
            draws = torch.rand(b, generator=self.gen)
            slots[full] = (draws[full] * (counts[full] + 1).double()).long()
        keep = slots < self.capacity
        src = torch.nonzero(keep).flatten()
        dst = slots[keep]
        if len(dst) > 1:
            # Keep the last writer of each slot (sequential semantics, deterministic on GPU).
            last = {int(d): i for i, d in enumerate(dst.tolist())}
            order = torch.tensor(sorted(last.values()), dtype=torch.long)
            src, dst = src[order], dst[order]
        if len(dst):
            dev = self.x.device
            self.x[dst.to(dev)] = x[src.to(x.device)].to(self.x.dtype)
            self.y[dst.to(dev)] = y[src.to(y.device)]
        self.n_seen += b

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k items drawn uniformly with replacement from what is stored."""
        idx = torch.randint(0, len(self), (k,), generator=self.gen).to(self.x.device)
        return self.x[idx], self.y[idx]

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_seen": self.n_seen, "gen": self.gen.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.gen.set_state(state["gen"])
