"""Synthetic in-context task streams: the two generators, under their old import path.

- `streams/bursty.py`: bursty token classification (docs/methods/forgetting.md),
  `adaptlab.streams.icl.BurstyTokenStream` in configs.
- `streams/task_families.py`: the one-position-per-example task families of StreamAdapter
  (docs/methods/stream_adapter.md), `adaptlab.streams.icl.ContextStream` in configs.
"""

from __future__ import annotations

from .bursty import (
    HOLDOUT_LABELS,
    BurstySource,
    BurstyTokenStream,
    BurstyTokenTask,
    BurstyVocab,
    EvalSet,
    GeneratedColumn,
    SegmentMaps,
    eval_sets_of,
    label_block_of,
    stream_meta,
    zipf_probs,
)
from .task_families import (
    ALL_FAMILIES,
    CONTEXT_KEY,
    FAMILIES,
    POOL,
    REGRESSION,
    SEEN,
    SIZES,
    UNSEEN,
    ContextStream,
    FamilyVocab,
    episodes,
    family_batch,
    family_skill,
    icl_sequences,
    pack_queries,
    value_dim,
)

__all__ = [
    "ALL_FAMILIES", "CONTEXT_KEY", "FAMILIES", "HOLDOUT_LABELS", "POOL", "REGRESSION", "SEEN",
    "SIZES", "UNSEEN",
    "BurstySource", "BurstyTokenStream", "BurstyTokenTask", "BurstyVocab", "ContextStream",
    "EvalSet", "FamilyVocab", "GeneratedColumn", "SegmentMaps", "episodes", "eval_sets_of",
    "family_batch", "family_skill", "icl_sequences", "label_block_of", "pack_queries",
    "stream_meta", "value_dim", "zipf_probs",
]
