"""`Replay`: experience replay from a task-free reservoir memory (Chaudhry et al. 2019, ER)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adaptlab.buffers import ReservoirBuffer
from adaptlab.streams.core import require_positive

from .finetune import Finetune


class Replay(Finetune):
    """Each step trains on the incoming batch plus as many samples drawn from a reservoir
    memory, then offers the batch to the memory. No boundary is needed, so it is task-free.

    Args:
        memory_size: samples the reservoir holds (equal-memory comparisons count these).
        replay_batch_size: memory samples per step (default: the stream's batch size).
    """

    def __init__(
        self, *, memory_size: int = 500, replay_batch_size: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        require_positive("replay_batch_size", replay_batch_size, allow_none=True)
        self.replay_batch_size = replay_batch_size or self.batch_size
        self.memory = ReservoirBuffer(memory_size, self.input_shape, seed=self.seed)
        self._replay_buf: tuple[torch.Tensor, torch.Tensor] | None = None

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = len(x)
        trainer = self.host_trainer
        mem = self.memory
        if len(mem) and (trainer is None or trainer.world_size == 1) \
                and x.dtype == mem.x.dtype and y.dtype == mem.y.dtype:
            inp, tgt = self._replay_batch(x, y)
            out = self.model(inp)
            loss = F.cross_entropy(out, tgt)
        elif len(self.memory):
            # Every process holds the same memory and generator: each takes its share of one
            # replay draw, so data parallelism replays exactly what one process would.
            mx, my = self.local_share(*self.memory.sample(self.replay_batch_size))
            out = self.model(torch.cat([x, mx]))
            loss = F.cross_entropy(out, torch.cat([y, my]))
        else:
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        self.memory.add(*self.gather_batch(x, y))
        return out[:n], loss, len(out)

    def _replay_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[x; memory draw] and [y; its labels] in two tensors kept across steps: one
        forward over the concatenated batch, no allocation per step (the draw is the same
        as `memory.sample`'s). Safe to overwrite: the previous step's backward is done."""
        n, r = len(x), self.replay_batch_size
        buf = self._replay_buf
        if buf is None or len(buf[0]) != n + r or buf[0].device != x.device \
                or buf[0].dtype != x.dtype:
            buf = (torch.empty(n + r, *x.shape[1:], dtype=x.dtype, device=x.device),
                   torch.empty(n + r, dtype=y.dtype, device=y.device))
            self._replay_buf = buf
        inp, tgt = buf
        inp[:n].copy_(x)
        tgt[:n].copy_(y)
        self.memory.sample_into(inp[n:], tgt[n:])
        return inp, tgt
