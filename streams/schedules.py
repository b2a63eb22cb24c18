"""Schedules: how segments' training pools become one ordered stream.

`arrange` is the single place where order, recurrence, passes per segment, gradual transitions
and label shift are decided. It works on index arrays only, so every builder shares it and the
result is a pure function of the parameters and the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core import Purpose, require_positive, rng

RECURRENCE = ("reuse", "split", "continue")
EVAL_AT = ("end", "mid", "start")


@dataclass(frozen=True)
class Arrangement:
    """Pool indices in stream order, and the evaluator's view of them."""

    order: np.ndarray
    segment_ids: np.ndarray
    eval_positions: tuple[int, ...]
    row_segments: tuple[int, ...]
    first_rows: tuple[int, ...]
    true_shifts: tuple[int, ...]
    segments_used: tuple[int, ...]


def check_schedule(
    *, batch_size: int, recurrence: str, repeats: int, transition: int, eval_at: str,
    label_shift: Mapping[str, Any] | None,
) -> None:
    """The schedule parameters' own checks, one place for builders (at config time) and
    `arrange`: a clear error naming the parameter."""
    require_positive("batch_size", batch_size)
    require_positive("repeats", repeats)
    if recurrence not in RECURRENCE:
        raise ValueError(f"recurrence: {recurrence!r} is not one of {RECURRENCE}")
    if eval_at not in EVAL_AT:
        raise ValueError(f"eval_at: {eval_at!r} is not one of {EVAL_AT}")
    if not isinstance(transition, int) or isinstance(transition, bool) or transition < 0:
        raise ValueError(f"transition: must be an integer >= 0, got {transition!r}")
    if label_shift is not None and float(label_shift.get("delta", 0.1)) <= 0:
        raise ValueError(f"label_shift.delta: must be > 0, got {label_shift['delta']!r}")


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `total`."""
    raw = weights * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def label_shifted(
    block: np.ndarray, labels: np.ndarray, *, delta: float, slots: int | None, batch_size: int,
    gen: np.random.Generator,
) -> np.ndarray:
    """Temporally correlated labels inside one occurrence (NOTE, Gong et al. 2022).

    The block is cut into S slots; each class spreads its samples over the slots by a
    Dirichlet(delta) draw. Small delta puts each class in few slots (strong correlation).
    """
    n = len(block)
    n_slots = slots if slots is not None else max(1, n // (10 * batch_size))
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    block_labels = labels[block]
    for c in np.unique(block_labels):
        members = block[block_labels == c]
        counts = _largest_remainder(gen.dirichlet(np.full(n_slots, float(delta))), len(members))
        for s, part in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            buckets[s].append(part)
    out = [gen.permutation(np.concatenate(b)) for b in buckets if b]
    return np.concatenate(out)


def _mix(
    seq: np.ndarray, seg: np.ndarray, start: int, width: int, gen: np.random.Generator
) -> None:
    """Gradual transition in place over seq[start:start+width].

    At offset u the sample comes from the incoming queue with probability (u + 0.5) / W.
    Both queues are consumed in order, so nothing is duplicated or lost.
    """
    window = seq[start : start + width].copy()
    wseg = seg[start : start + width].copy()
    boundary = int(np.flatnonzero(wseg != wseg[0])[0]) if (wseg != wseg[0]).any() else width
    out_q, in_q = list(range(boundary)), list(range(boundary, width))
    draws = gen.random(width)
    oi = ii = 0
    for u in range(width):
        take_in = draws[u] < (u + 0.5) / width
        if (take_in and ii < len(in_q)) or oi >= len(out_q):
            k = in_q[ii]
            ii += 1
        else:
            k = out_q[oi]
            oi += 1
        seq[start + u] = window[k]
        seg[start + u] = wseg[k]


def arrange(
    pools: Mapping[int, np.ndarray],
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    order: Sequence[int] | None = None,
    recurrence: str = "reuse",
    repeats: int = 1,
    reshuffle_each_repeat: bool = False,
    shuffle_within_segment: bool = True,
    transition: int = 0,
    eval_at: str = "end",
    label_shift: Mapping[str, Any] | None = None,
    align_batches_to_boundaries: bool = False,
) -> Arrangement:
    """Turn per-segment pools of indices into the stream order.

    `pools[s]` holds the indices (into one shared pool of samples) of segment s's training
    data; `labels[i]` is the label of pool index i (for label shift only).
    """
    seg_ids = sorted(pools)
    order = list(seg_ids) if order is None else [int(s) for s in order]
    if not order:
        raise ValueError("order: must name at least one segment")
    unknown = [s for s in order if s not in pools]
    if unknown:
        raise ValueError(f"order: {unknown} are not segment ids (valid: {seg_ids})")
    check_schedule(batch_size=batch_size, recurrence=recurrence, repeats=repeats,
                   transition=transition, eval_at=eval_at, label_shift=label_shift)

    n_occ = {s: order.count(s) for s in set(order)}
    seen: dict[int, int] = {}
    blocks: list[np.ndarray] = []
    for s in order:
        c = seen.get(s, 0)
        seen[s] = c + 1
        base = np.asarray(pools[s])
        key_c = 0 if recurrence in ("split", "continue") else c
        shuffled = rng(seed, Purpose.SHUFFLE, s, key_c).permutation(base) if (
            shuffle_within_segment
        ) else base
        block = np.array_split(shuffled, n_occ[s])[c] if recurrence == "split" else shuffled
        if len(block) == 0:
            raise ValueError(f"segment {s}: occurrence {c} is empty (recurrence={recurrence!r})")
        if label_shift is not None:
            block = label_shifted(
                block, labels, delta=float(label_shift.get("delta", 0.1)),
                slots=label_shift.get("slots"), batch_size=batch_size,
                gen=rng(seed, Purpose.DIRICHLET, s, c),
            )
        passes = [block]
        for r in range(1, repeats):
            passes.append(
                rng(seed, Purpose.SHUFFLE, s, c, r).permutation(block)
                if reshuffle_each_repeat else block
            )
        blocks.append(np.concatenate(passes))

    seq = np.concatenate(blocks)
    seg = np.concatenate([np.full(len(b), s, dtype=np.int64) for b, s in zip(blocks, order)])
    n = len(seq)
    if batch_size > n:
        raise ValueError(f"batch_size: {batch_size} is larger than the stream ({n} samples)")

    ends = np.cumsum([len(b) for b in blocks])
    half = transition // 2
    evals: list[int] = []
    shifts: list[int] = []
    for k in range(len(blocks) - 1):
        b = int(ends[k])
        if transition:
            for j in (k, k + 1):
                if len(blocks[j]) < transition:
                    raise ValueError(
                        f"transition: {transition} is larger than segment {order[j]}'s "
                        f"occurrence ({len(blocks[j])} samples)"
                    )
            _mix(seq, seg, b - half, transition, rng(seed, Purpose.MIXING, k))
        evals.append({"end": b - half + transition, "mid": b, "start": b - half}[eval_at]
                     if transition else b)
        if order[k] != order[k + 1]:
            shifts.append(b - half if transition else b)
    evals.append(n)
    if not align_batches_to_boundaries:
        evals = [min(n, -(-e // batch_size) * batch_size) for e in evals]
    if any(b <= a for a, b in zip(evals, evals[1:])):
        raise ValueError(
            f"batch_size: {batch_size} leaves two evaluation points in one batch; "
            "some segment occurrence is shorter than a batch"
        )
    used = tuple(sorted(set(order)))
    first_rows = tuple(order.index(s) for s in used)
    return Arrangement(
        order=seq, segment_ids=seg, eval_positions=tuple(int(e) for e in evals),
        row_segments=tuple(order), first_rows=first_rows,
        true_shifts=tuple(int(s) for s in shifts), segments_used=used,
    )
