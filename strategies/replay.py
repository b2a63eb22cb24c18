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
        self._one_process = True  # no data parallelism: no gather/share of the memory

    def on_train_start(self) -> None:
        super().on_train_start()
        self._one_process = self.trainer.world_size == 1

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        mem = self.memory
        one = self._one_process
        if one and mem.n_seen and x.dtype == mem.x.dtype and y.dtype == mem.y.dtype:
            # [x; draws] in tensors the memory keeps across steps; it also adds x itself.
            inp, tgt = mem.replay_batch(x, y, self.replay_batch_size)
            out = self.model(inp)
            return out[: x.shape[0]], F.cross_entropy(out, tgt), out.shape[0]
        if mem.n_seen:
            # Every process holds the same memory and generator: each takes its share of one
            # replay draw, so data parallelism replays exactly what one process would.
            mx, my = self.local_share(*mem.sample(self.replay_batch_size))
            out = self.model(torch.cat([x, mx]))
            loss = F.cross_entropy(out, torch.cat([y, my]))
        else:
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        mem.add(*self.gather_batch(x, y))
        return out[: len(x)], loss, len(out)
