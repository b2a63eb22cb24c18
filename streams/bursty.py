"""Bursty token classification (Chan et al. 2022; Anand et al. 2024; docs/methods/forgetting.md).

Sequences `x1 l1 … xP lP xq`, target `lq`. Items follow a Zipf law; in *bursty* sequences the
query's class appears `burst` times in the context, in *i.i.d.* ones every item is drawn
independently. *Relabelled* sequences give a class a random other label for this sequence
only, which is what makes a context-copying ("binding") solution necessary. Evaluation sets
separate in-context learning (ICL on never-trained holdout items; ICL with conflicting labels)
from in-weights learning (IWL with no support in the context), on head and tail ranks.

Everything is a pure function of seeds (`streams.core.rng`). The training stream is never
materialised: `BurstyTokenStream.build()` returns a `Stream` whose `x` and `y` are
`GeneratedColumn`s; slicing one generates the covering blocks from
(seed, occurrence, block index), so any chunking yields the same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .builders import StreamBuilder
from .core import Purpose, Segment, Stream, rng

HOLDOUT_LABELS = ("random_pair", "fixed_pair")


# ============================================================================ vocabulary


@dataclass(frozen=True)
class BurstyVocab:
    """Id layout: trained items, holdout items, label tokens, then `EOS`, `PAD` (last)."""

    n_items: int
    n_holdout: int
    n_labels: int

    @property
    def holdout_start(self) -> int:
        return self.n_items

    @property
    def label_start(self) -> int:
        return self.n_items + self.n_holdout

    @property
    def eos(self) -> int:
        return self.label_start + self.n_labels

    @property
    def pad(self) -> int:
        return self.eos + 1

    @property
    def size(self) -> int:
        return self.pad + 1

    def groups(self) -> dict[str, list[int]]:
        """Id ranges `[lo, hi)` per role, for logs, masks and the learner's label block."""
        return {
            "items": [0, self.n_items],
            "holdout": [self.holdout_start, self.label_start],
            "labels": [self.label_start, self.eos],
            "specials": [self.eos, self.size],
        }


@dataclass(frozen=True)
class SegmentMaps:
    """One segment's world: which item has which Zipf rank, and which label each class has."""

    rank_to_item: np.ndarray  # (C,) item id of rank r (0-based)
    label_of_item: np.ndarray  # (C + H,) label token of every item

    @classmethod
    def build(
        cls, vocab: BurstyVocab, seed: int, label_permutation_seed: int | None = None,
        rank_permutation_seed: int | None = None,
    ) -> SegmentMaps:
        c, lab = vocab.n_items, vocab.n_labels
        ranks = np.arange(c)
        if rank_permutation_seed is not None:
            ranks = rng(seed, Purpose.ICL_MAP, 0, rank_permutation_seed).permutation(c)
        perm = np.arange(lab)
        if label_permutation_seed is not None:
            perm = rng(seed, Purpose.ICL_MAP, 1, label_permutation_seed).permutation(lab)
        items = np.arange(vocab.label_start)
        return cls(ranks, vocab.label_start + perm[items % lab])


# ============================================================================ the task


def zipf_probs(n: int, alpha: float) -> np.ndarray:
    """p(r) ∝ r^-alpha over r = 1…n, normalised exactly (no rejection, any alpha >= 0)."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -float(alpha)
    return p / p.sum()


@dataclass(frozen=True)
class EvalSet:
    """A fixed evaluation set: query-position `target`; `alt` is the in-weights answer of
    flipped sets; `choices` (n, 2) restricts the argmax (holdout label pairs)."""

    x: torch.Tensor
    target: torch.Tensor
    alt: torch.Tensor | None = None
    choices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.target)

    def score(self, logits: torch.Tensor, label_block: tuple[int, int]) -> dict[str, float]:
        """Accuracies from query-position logits (n, V): `acc` (and `alt` for flip sets)."""
        if self.choices is not None:
            pick = logits.gather(1, self.choices.to(logits.device)).argmax(1)
            pred = self.choices.to(logits.device).gather(1, pick[:, None])[:, 0]
        else:
            lo, hi = label_block
            pred = logits[:, lo:hi].argmax(1) + lo
        out = {"acc": float((pred == self.target.to(pred.device)).float().mean())}
        if self.alt is not None:
            out["alt"] = float((pred == self.alt.to(pred.device)).float().mean())
        return out


class BurstyTokenTask:
    """The bursty token-classification task (`forgetting.md` §5); sizes default to the CPU row.

    Args:
        n_items: C, trained items (id = Zipf rank - 1 unless a segment permutes ranks).
        n_holdout: H, items never shown in training.
        n_labels: L label tokens (default C); label(i) = label_start + (i mod L).
        context: P (item, label) pairs before the query.
        burst: copies of the query's class and of the other class in a bursty sequence.
        zipf_alpha: Zipf exponent (0 = uniform).
        p_bursty: share of bursty sequences.
        relabel_prob: probability, independently for q and o of a bursty sequence, that the
            class gets a uniform other label in this sequence.
        holdout_labels: `random_pair` (default) or `fixed_pair` (labels of classes 0 and 1).
        band: share of ranks in the head and in the tail bands (10%).
    """

    def __init__(
        self,
        n_items: int = 512,
        n_holdout: int = 64,
        n_labels: int | None = None,
        context: int = 8,
        burst: int = 4,
        zipf_alpha: float = 1.0,
        p_bursty: float = 0.9,
        relabel_prob: float = 0.5,
        holdout_labels: str = "random_pair",
        band: float = 0.1,
    ) -> None:
        n_labels = n_items if n_labels is None else n_labels
        if n_items < 4 or n_holdout < 4 or n_labels < 4:
            raise ValueError(
                f"n_items, n_holdout, n_labels: at least 4 each (the ICL layout needs four "
                f"distinct items and labels), got {n_items}, {n_holdout}, {n_labels}"
            )
        if context < 4 or 2 * burst > context:
            raise ValueError(f"context: must be >= 4 and >= 2 * burst, got {context}, {burst}")
        if not (0 <= p_bursty <= 1 and 0 <= relabel_prob <= 1 and zipf_alpha >= 0):
            raise ValueError("p_bursty, relabel_prob in [0, 1] and zipf_alpha >= 0 required")
        if holdout_labels not in HOLDOUT_LABELS:
            raise ValueError(f"holdout_labels: {holdout_labels!r} is not one of {HOLDOUT_LABELS}")
        if not 0 < band <= 0.5:
            raise ValueError(f"band: must be in (0, 0.5], got {band!r}")
        self.vocab = BurstyVocab(n_items, n_holdout, n_labels)
        self.P, self.burst, self.alpha = context, burst, zipf_alpha
        self.p_bursty, self.relabel_prob = p_bursty, relabel_prob
        self.holdout_labels, self.band = holdout_labels, band
        self.p_rank = zipf_probs(n_items, zipf_alpha)
        self.n_band = max(1, math.ceil(band * n_items))

    def params(self) -> dict[str, Any]:
        v = self.vocab
        return {"n_items": v.n_items, "n_holdout": v.n_holdout, "n_labels": v.n_labels,
                "context": self.P, "burst": self.burst, "zipf_alpha": self.alpha,
                "p_bursty": self.p_bursty, "relabel_prob": self.relabel_prob,
                "holdout_labels": self.holdout_labels, "band": self.band}

    @property
    def seq_len(self) -> int:
        return 2 * self.P + 1

    # -- pieces -------------------------------------------------------------------------------
    def _zipf(self, g: np.random.Generator, size: Any) -> np.ndarray:
        return g.choice(self.vocab.n_items, size=size, p=self.p_rank)

    def _zipf_except(self, g: np.random.Generator, size: Any, *avoid: np.ndarray) -> np.ndarray:
        """Zipf ranks, redrawn wherever they equal the (broadcast) ranks in `avoid`."""
        r = self._zipf(g, size)
        while True:
            bad = np.zeros(r.shape, dtype=bool)
            for a in avoid:
                bad |= r == a
            if not bad.any():
                return r
            r[bad] = self._zipf(g, int(bad.sum()))

    def _other_label(self, g: np.random.Generator, lab: np.ndarray) -> np.ndarray:
        """A uniform label other than `lab`, elementwise."""
        lo, n = self.vocab.label_start, self.vocab.n_labels
        return lo + (lab - lo + g.integers(1, n, size=lab.shape)) % n

    @staticmethod
    def _shuffle_rows(g: np.random.Generator, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
        order = np.argsort(g.random(cols[0].shape), axis=1)
        return tuple(np.take_along_axis(c, order, axis=1) for c in cols)

    def _assemble(self, items: np.ndarray, labels: np.ndarray, query: np.ndarray) -> torch.Tensor:
        n = len(query)
        x = np.empty((n, self.seq_len), dtype=np.int64)
        x[:, 0 : 2 * self.P : 2], x[:, 1 : 2 * self.P : 2], x[:, -1] = items, labels, query
        return torch.from_numpy(x)

    # -- training sequences -------------------------------------------------------------------
    def sample_train(
        self, g: np.random.Generator, n: int, maps: SegmentMaps, kind: str | None = None
    ) -> dict[str, torch.Tensor]:
        """`n` training sequences: `x` (n, 2P+1), `y` (n,) and per-sequence metadata.

        `kind` forces `bursty` or `iid` (held-out loss sets); default mixes by `p_bursty`."""
        P, b = self.P, self.burst
        if kind is None:
            bursty = g.random(n) < self.p_bursty
        else:
            bursty = np.full(n, kind == "bursty")
        q = self._zipf(g, n)
        # bursty: b copies of q and of o != q, any remaining slots i.i.d. (excluding q, o)
        o = self._zipf_except(g, n, q)
        fill = self._zipf_except(g, (n, P - 2 * b), q[:, None], o[:, None])
        ctx_b = np.concatenate([np.repeat(q[:, None], b, 1), np.repeat(o[:, None], b, 1), fill], 1)
        ctx_i = self._zipf(g, (n, P))
        ranks = np.where(bursty[:, None], ctx_b, ctx_i)
        items, q_item, o_item = maps.rank_to_item[ranks], maps.rank_to_item[q], maps.rank_to_item[o]
        labels = maps.label_of_item[items]
        lab_q, lab_o = maps.label_of_item[q_item], maps.label_of_item[o_item]
        rel_q = bursty & (g.random(n) < self.relabel_prob)
        rel_o = bursty & (g.random(n) < self.relabel_prob)
        new_q, new_o = self._other_label(g, lab_q), self._other_label(g, lab_o)
        new_lab_q, new_lab_o = np.where(rel_q, new_q, lab_q), np.where(rel_o, new_o, lab_o)
        clash = bursty & (new_lab_q == new_lab_o) & (rel_q | rel_o)
        while clash.any():  # two classes never share a label within one sequence
            redo_q = clash & rel_q
            new_lab_q[redo_q] = self._other_label(g, lab_q[redo_q])
            redo_o = clash & ~rel_q
            new_lab_o[redo_o] = self._other_label(g, lab_o[redo_o])
            clash = bursty & (new_lab_q == new_lab_o) & (rel_q | rel_o)
        labels = np.where(bursty[:, None] & (items == q_item[:, None]), new_lab_q[:, None], labels)
        labels = np.where(bursty[:, None] & (items == o_item[:, None]), new_lab_o[:, None], labels)
        items, labels = self._shuffle_rows(g, items, labels)
        q_iid = self._zipf(g, n)
        query_rank = np.where(bursty, q, q_iid)
        query_item = maps.rank_to_item[query_rank]
        y = np.where(bursty, new_lab_q, maps.label_of_item[query_item])
        return {
            "x": self._assemble(items, labels, query_item),
            "y": torch.from_numpy(y.astype(np.int64)),
            "is_bursty": torch.from_numpy(bursty),
            "query_rank": torch.from_numpy(query_rank.astype(np.int64)),
            "query_relabelled": torch.from_numpy(rel_q),
        }

    # -- evaluation sets ----------------------------------------------------------------------
    def _icl_layout(
        self, g: np.random.Generator, q: np.ndarray, o: np.ndarray, s: np.ndarray,
        lq: np.ndarray, lo: np.ndarray, ls: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P-2)//2 copies of q and of o, the rest one copy each of s1, s2, …; shuffled."""
        m = (self.P - 2) // 2
        items = np.concatenate([np.repeat(q[:, None], m, 1), np.repeat(o[:, None], m, 1), s], 1)
        labels = np.concatenate([np.repeat(lq[:, None], m, 1), np.repeat(lo[:, None], m, 1),
                                 ls], 1)
        return self._shuffle_rows(g, items, labels)

    def _n_support(self) -> int:
        return self.P - 2 * ((self.P - 2) // 2)

    def _distinct(self, g: np.random.Generator, pool: np.ndarray, n: int, k: int) -> np.ndarray:
        """n rows of k distinct draws from `pool` (uniform)."""
        return pool[np.argsort(g.random((n, len(pool))), axis=1)[:, :k]]

    def _fresh_label(self, g: np.random.Generator, used: np.ndarray) -> np.ndarray:
        """Per row, a uniform label token outside that row of `used` (n, k)."""
        lo = self.vocab.label_start
        score = g.random((len(used), self.vocab.n_labels))
        np.put_along_axis(score, used - lo, np.inf, axis=1)
        return lo + score.argmin(1)

    def _without(
        self, g: np.random.Generator, labels: np.ndarray, banned: np.ndarray
    ) -> np.ndarray:
        """`labels` (n, k) with every entry equal to its row's `banned` label replaced by a
        fresh one (possible only when labels are shared, n_labels < n_items)."""
        labels = labels.copy()
        for j in range(labels.shape[1]):
            hit = labels[:, j] == banned
            if hit.any():
                used = np.concatenate([banned[:, None], labels], 1)[hit]
                labels[hit, j] = self._fresh_label(g, used)
        return labels

    def eval_sets(self, seed: int, n: int, maps: SegmentMaps,
                  key: int = 0) -> dict[str, EvalSet]:
        """The fixed evaluation sets of one segment (§5.3), from `seed` and segment `key`."""
        v, ns = self.vocab, self._n_support()
        out: dict[str, EvalSet] = {}
        # ICL on holdout items, labelled with a pair (random or classes 0/1)
        g = rng(seed, Purpose.ICL_EVAL, key, 0)
        hold = np.arange(v.holdout_start, v.label_start)
        it = self._distinct(g, hold, n, 2 + ns)
        if self.holdout_labels == "random_pair":
            lab = self._distinct(g, np.arange(v.label_start, v.eos), n, 2 + ns)
        else:
            pair = maps.label_of_item[[0, 1]]
            others = np.setdiff1d(np.arange(v.label_start, v.eos), pair)
            lab = np.concatenate([np.tile(pair, (n, 1)), self._distinct(g, others, n, ns)], 1)
        swap = g.random(n) < 0.5
        lq, lo_ = np.where(swap, lab[:, 1], lab[:, 0]), np.where(swap, lab[:, 0], lab[:, 1])
        items, labels = self._icl_layout(g, it[:, 0], it[:, 1], it[:, 2:], lq, lo_, lab[:, 2:])
        out["icl_holdout"] = EvalSet(
            self._assemble(items, labels, it[:, 0]), torch.from_numpy(lq),
            choices=torch.from_numpy(np.stack([lq, lo_], 1)),
        )
        c = v.n_items
        for b, (name, ranks) in enumerate(
            (("head", np.arange(self.n_band)), ("tail", np.arange(c - self.n_band, c))), start=1
        ):
            # ICL with conflicting labels on trained items: q is shown with a label that appears
            # nowhere else in the context, and label(q) appears nowhere at all, so "copy my
            # memorised label when it is in the context" cannot pass for in-weights learning
            g = rng(seed, Purpose.ICL_EVAL, key, b, 0)
            qo = self._distinct(g, ranks, n, 2)
            s = self._zipf_except(g, (n, ns), qo[:, :1], qo[:, 1:])
            if ns > 1:  # distinct supports
                for j in range(1, ns):
                    s[:, j:j + 1] = np.where(
                        (s[:, j:j + 1] == s[:, :j]).any(1, keepdims=True),
                        self._zipf_except(g, (n, 1), qo[:, :1], qo[:, 1:], *[
                            s[:, i:i + 1] for i in range(j)]), s[:, j:j + 1])
            qi, oi, si = (maps.rank_to_item[a] for a in (qo[:, 0], qo[:, 1], s))
            lq = maps.label_of_item[qi]
            shown = self._without(g, maps.label_of_item[np.concatenate([oi[:, None], si], 1)],
                                  lq)
            fresh = self._fresh_label(g, np.concatenate([lq[:, None], shown], 1))
            items, labels = self._icl_layout(g, qi, oi, si, fresh, shown[:, 0], shown[:, 1:])
            out[f"icl_flip_{name}"] = EvalSet(
                self._assemble(items, labels, qi), torch.from_numpy(fresh),
                alt=torch.from_numpy(lq),
            )
            # IWL without support: q from the band, context i.i.d. Zipf items != q
            g = rng(seed, Purpose.ICL_EVAL, key, b, 1)
            q = ranks[g.integers(0, len(ranks), n)]
            ctx = self._zipf_except(g, (n, self.P), q[:, None])
            qi, ci = maps.rank_to_item[q], maps.rank_to_item[ctx]
            out[f"iwl_{name}"] = EvalSet(
                self._assemble(ci, maps.label_of_item[ci], qi),
                torch.from_numpy(maps.label_of_item[qi]),
            )
        for k, kind in enumerate(("bursty", "iid"), start=3):
            s = self.sample_train(rng(seed, Purpose.ICL_EVAL, key, k), n, maps, kind=kind)
            out[f"train_{kind}"] = EvalSet(s["x"], s["y"])
        return out


# ============================================================================ the stream


class GeneratedColumn:
    """A read-only, tensor-like column (`x` or `y`) of a generated stream.

    Slicing `[s:e]` generates the covering blocks (cached, so `x` and `y` of one chunk are
    generated once). It stands in for a tensor where `StreamDataModule` and the evaluator
    slice a stream; the whole column never exists in memory.
    """

    def __init__(self, source: BurstySource, field: str, shape: tuple[int, ...]) -> None:
        self.source, self.field, self.shape = source, field, torch.Size(shape)
        self.dtype = torch.int64
        self.device = torch.device("cpu")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, slice):
            s, e, step = idx.indices(len(self))
            if step != 1:
                raise IndexError("GeneratedColumn: only contiguous slices")
            return self.source.slice(s, e)[self.field]
        pos = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        rows = [self.source.slice(int(p), int(p) + 1)[self.field] for p in pos]
        out = torch.cat(rows)
        return out if np.ndim(idx) else out[0]

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> GeneratedColumn:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(
                "device_cache: a generated in-context stream is produced on the CPU per chunk; "
                "set data.device_cache: false"
            )
        return self

    def element_size(self) -> int:
        return 8

    def nelement(self) -> int:
        return int(np.prod(self.shape))


class BurstySource:
    """Generates any slice of a bursty stream from (seed, occurrence, block)."""

    def __init__(
        self, task: BurstyTokenTask, maps: list[SegmentMaps], order: list[int],
        sizes: list[int], seed: int, block: int = 1024,
    ) -> None:
        self.task, self.maps, self.order, self.seed, self.block = task, maps, order, seed, block
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _block(self, occ: int, j: int) -> dict[str, torch.Tensor]:
        key = (occ, j)
        if key not in self._cache:
            n_occ = int(self.offsets[occ + 1] - self.offsets[occ])
            n = min(self.block, n_occ - j * self.block)
            seg = self.order[occ]
            g = rng(self.seed, Purpose.ICL_TRAIN, seg, occ, j)
            out = self.task.sample_train(g, n, self.maps[seg])
            out["segment"] = torch.full((n,), seg, dtype=torch.int64)
            self._cache[key] = out
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[key]

    def slice(self, s: int, e: int) -> dict[str, torch.Tensor]:
        """Samples `[s, e)` of the stream, every field."""
        if not 0 <= s <= e <= len(self):
            raise IndexError(f"slice [{s}, {e}) outside the stream of {len(self)}")
        parts: list[dict[str, torch.Tensor]] = []
        p = s
        while p < e:
            occ = bisect_right(self.offsets, p) - 1
            local = p - int(self.offsets[occ])
            j = local // self.block
            blk = self._block(occ, j)
            lo = local - j * self.block
            hi = min(len(blk["y"]), lo + (e - p))
            parts.append({k: v[lo:hi] for k, v in blk.items()})
            p += hi - lo
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return {k: v[:0] for k, v in self._block(0, 0).items()}
        return {k: torch.cat([q[k] for q in parts]) for k in parts[0]}


class BurstyTokenStream(StreamBuilder):
    """Config class of a bursty token-classification stream (`data.stream:` in YAML).

    Segments differ in `label_permutation_seed` (the item→label map) and/or
    `rank_permutation_seed` (which items are head); holdout items stay holdout everywhere.

    Args:
        n_items, n_holdout, n_labels, context, burst, zipf_alpha, p_bursty, relabel_prob,
            holdout_labels, band: the task (`BurstyTokenTask`).
        segments: one dict per segment, `{label_permutation_seed, rank_permutation_seed}`
            (default: one segment, identity maps).
        sequences_per_segment: training sequences per occurrence of a segment.
        order: segment occurrences in stream order (default: each segment once); a repeated
            id is a recurring segment (fresh samples, same maps).
        batch_size: sequences per `observe` mini-batch.
        seed: training samples and permutations.
        eval_seed: the fixed evaluation sets.
        n_eval: sequences per evaluation set; `n_test`: per segment test set of the evaluator.
        block: generation block size (samples are identical for any chunking).
    """

    kind = "bursty_tokens"

    def __init__(  # noqa: PLR0913 - a config class: every option is an explicit parameter
        self,
        *,
        n_items: int = 512,
        n_holdout: int = 64,
        n_labels: int | None = None,
        context: int = 8,
        burst: int = 4,
        zipf_alpha: float = 1.0,
        p_bursty: float = 0.9,
        relabel_prob: float = 0.5,
        holdout_labels: str = "random_pair",
        band: float = 0.1,
        segments: list[dict[str, int | None]] | None = None,
        sequences_per_segment: int = 512_000,
        order: list[int] | None = None,
        batch_size: int = 32,
        seed: int | None = None,
        eval_seed: int = 1234,
        n_eval: int = 512,
        n_test: int = 512,
        block: int = 1024,
    ) -> None:
        self.task = BurstyTokenTask(n_items, n_holdout, n_labels, context, burst, zipf_alpha,
                                    p_bursty, relabel_prob, holdout_labels, band)
        self.segment_specs = [dict(s) for s in (segments or [{}])]
        for s in self.segment_specs:
            unknown = set(s) - {"label_permutation_seed", "rank_permutation_seed"}
            if unknown:
                raise ValueError(
                    f"segments: unknown keys {sorted(unknown)}; use label_permutation_seed "
                    "and/or rank_permutation_seed"
                )
        n_seg = len(self.segment_specs)
        self.order = list(range(n_seg)) if order is None else [int(o) for o in order]
        if not self.order or any(not 0 <= o < n_seg for o in self.order):
            raise ValueError(f"order: ids must be in [0, {n_seg}), got {order!r}")
        for name, val in (("sequences_per_segment", sequences_per_segment),
                          ("batch_size", batch_size), ("n_eval", n_eval), ("n_test", n_test),
                          ("block", block)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: must be a positive integer, got {val!r}")
        self.sequences_per_segment, self.batch_size = sequences_per_segment, batch_size
        self.seed = 0 if seed is None else int(seed)  # the CLI fills it from seed_everything
        self.eval_seed, self.n_eval, self.n_test = eval_seed, n_eval, n_test
        self.block = block
        self.maps = [SegmentMaps.build(self.task.vocab, self.seed, s.get("label_permutation_seed"),
                                       s.get("rank_permutation_seed"))
                     for s in self.segment_specs]

    def params(self) -> dict[str, Any]:
        return {"task": self.task.params(), "segments": self.segment_specs, "order": self.order,
                "sequences_per_segment": self.sequences_per_segment,
                "batch_size": self.batch_size, "seed": self.seed, "eval_seed": self.eval_seed,
                "n_eval": self.n_eval, "n_test": self.n_test,
                "vocab": self.task.vocab.groups()}

    def eval_sets(self) -> dict[str, EvalSet]:
        """Every segment's evaluation sets; names get `_seg<j>` when there are several."""
        out: dict[str, EvalSet] = {}
        for j, maps in enumerate(self.maps):
            suffix = f"_seg{j}" if len(self.maps) > 1 else ""
            for name, es in self.task.eval_sets(self.eval_seed, self.n_eval, maps, j).items():
                out[name + suffix] = es
        return out

    def build(self) -> Stream:
        n_occ, per = len(self.order), self.sequences_per_segment
        source = BurstySource(self.task, self.maps, self.order, [per] * n_occ, self.seed,
                              self.block)
        source.builder = self  # the evaluation sets travel with the stream (`eval_sets_of`)
        n = len(source)
        seg_ids = torch.from_numpy(np.repeat(np.asarray(self.order, dtype=np.int64), per))
        ends = tuple(int(e) for e in source.offsets[1:])
        used = tuple(sorted(set(self.order)))
        first_rows = tuple(self.order.index(s) for s in used)
        shifts = tuple(int(source.offsets[i]) for i in range(1, n_occ)
                       if self.order[i] != self.order[i - 1])
        test_sets = {}
        for s in used:
            t = self.task.sample_train(rng(self.eval_seed, Purpose.ICL_EVAL, s, 99), self.n_test,
                                       self.maps[s])
            test_sets[s] = (t["x"], t["y"])
        segments = tuple(
            Segment(s, f"seg{s}", "bursty", dict(self.segment_specs[s]), per * self.order.count(s),
                    self.n_test)
            for s in used
        )
        params = self.params()
        return Stream(
            name="bursty_tokens", kind=self.kind,
            x=GeneratedColumn(source, "x", (n, self.task.seq_len)),  # type: ignore[arg-type]
            y=GeneratedColumn(source, "y", (n,)),  # type: ignore[arg-type]
            segment_ids=seg_ids, segments=segments, test_sets=test_sets,
            batch_size=self.batch_size, n_classes=self.task.vocab.size, eval_positions=ends,
            row_segments=tuple(self.order), first_rows=first_rows, true_shifts=shifts,
            seed=self.seed, split_seed=self.eval_seed, params=params,
            source_fingerprint="generated:" + hashlib.sha256(
                json.dumps(params, sort_keys=True, default=str).encode()).hexdigest(),
            order_digest="",
        )


def eval_sets_of(stream: Stream) -> dict[str, EvalSet]:
    """The in-context evaluation sets of a generated stream (empty for other streams)."""
    builder = getattr(getattr(stream.x, "source", None), "builder", None)
    return builder.eval_sets() if builder is not None else {}


def label_block_of(stream: Stream) -> tuple[int, int] | None:
    """`[lo, hi)` of the label tokens of a generated stream (None for other streams)."""
    vocab = stream.params.get("vocab") if isinstance(stream.params, dict) else None
    labels = vocab.get("labels") if vocab else None
    return tuple(labels) if labels else None  # type: ignore[return-value]


def stream_meta(stream: Stream, start: int, end: int) -> dict[str, torch.Tensor]:
    """Per-sequence metadata of `[start, end)` (`is_bursty`, `query_rank`,
    `query_relabelled`, `segment`), for callbacks and logs only, never the learner."""
    source = getattr(stream.x, "source", None)
    if source is None:
        return {}
    sl = source.slice(start, end)
    return {k: v for k, v in sl.items() if k not in ("x", "y")}


# ============================================================================ task families
