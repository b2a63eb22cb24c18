"""`StreamDDPStrategy`: data-parallel training for stream learners, without wrapping the module.

torch's DistributedDataParallel expects one backward per forward of the wrapped module and
cannot sync parameters created after wrapping. Stream learners run several `observe` calls
(each a forward and a backward) per Lightning step, and TAME creates experts at run time. So
this strategy keeps the module unwrapped, broadcasts rank 0's initial state, and learners
average their own gradients with one all-reduce per update (`sync_grads`), weighted by each
rank's share of the global mini-batch so the result equals the single-process gradient.
`adaptlab fit … --trainer.strategy ddp` selects it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from ._lightning_private import sync_module_states


class StreamDDPStrategy(DDPStrategy):
    """DDP for learners that all-reduce their own gradients (see module docstring)."""

    strategy_name = "stream_ddp"

    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper: every rank starts from rank 0's parameters.
        sync_module_states(self.model)

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        # Nothing to prepare: there is no DDP reducer.
        return None

    def sync_grads(self, params: Iterable[torch.nn.Parameter], n_local: int) -> None:
        """Replace each rank's gradients by the sample-weighted mean over ranks.

        One flat all-reduce of `grad * n_local` plus the count: with unequal shards (a short
        last batch) this still equals the gradient of the mean loss over the global batch.
        """
        params = [p for p in params if p.requires_grad]
        if not params or self.world_size < 2:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_ones(1)]) * n_local
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def weighted_mean(self, t: torch.Tensor, n_local: int) -> torch.Tensor:
        """Per-element mean over ranks weighted by each rank's sample count: a rank's mean
        loss over its share becomes the mean over the global mini-batch."""
        if self.world_size < 2:
            return t
        flat = torch.cat([t.reshape(-1).float() * n_local, t.new_full((1,), n_local).float()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return (flat[:-1] / flat[-1]).view_as(t).to(t.dtype)

    def gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        """The global mini-batch from every rank's share, in stream order (ranks hold
        contiguous, ordered parts), so state built from it is identical on every rank."""
        if self.world_size < 2:
            return t
        n = torch.tensor([len(t)], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (the evaluator's online counts)."""
        if self.world_size < 2:
            return t
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @classmethod
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DDP without module wrapping, for stream learners"
        )


if StreamDDPStrategy.strategy_name not in StrategyRegistry:
    StreamDDPStrategy.register_strategies(StrategyRegistry)
