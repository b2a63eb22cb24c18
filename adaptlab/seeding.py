"""Seeded draws that leave the global random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pytorch_lightning.utilities.seed import isolate_rng


@contextmanager
def seeded(seed: int, cuda: bool = False) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by `seed`, then restore every global
    generator (torch, numpy, Python; Lightning's `isolate_rng`). For initialisations that
    must depend on their own seed only, not on what ran before. `cuda`: seed (and restore)
    every CUDA generator too, for blocks that draw on the GPU (`torch.randn_like` of a CUDA
    tensor)."""
    with isolate_rng(include_cuda=cuda):
        torch.random.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.manual_seed_all(int(seed))
        yield
