"""The masked part-of-speech task of Anand et al. 2024 (*Dual Process Learning*, §4).

Seven-token sentences over nouns and adjectives with a copula, the last three masked:

    COP  ADJ  NOUN  | t4 MASK MASK MASK        or      NOUN COP ADJ | t4 MASK MASK MASK

where `t4 t5 t6 t7` is `adj adj adj adj` or `noun adj noun noun` (each half of the time). Only
`t4` is shown, so the targets `t5 t6 t7` need to know whether `t4` is the sentence's adjective.
Two strategies solve it:

- **structural in-context learning**: the adjective is the token after `COP`, whatever the
  token is (works for never-seen tokens);
- **in-weights learning**: memorise each token's part of speech (nouns and adjectives are
  disjoint vocabularies).

With probability ε (`switch_prob`) a training slot takes a token of the other part of speech,
so memorisation is never quite right. Evaluation sets (`forgetting.md` §5.4): `val` (the
training distribution without switches), `switch` (every noun slot holds an adjective and vice
versa: structure and memory disagree), `tail` and `tail_switch` (the rarest 10% of tokens),
`holdout` (tokens never trained). The score is **hard accuracy**: all three masked tokens
right. Switched sets also score the in-weights answer (`alt`).

A stream sample is a sentence packed with its answer, `[7 input tokens | 3 targets]`, and its
label is 1, "solved": `InContextLearner(n_targets=3)` splits the targets off before the model
sees the sentence and answers 1 exactly when all three are right, so the evaluator's online
and test accuracies are the hard accuracy, with one label per sample as streams require.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .builders import StreamBuilder
from .core import Purpose, Segment, Stream, rng
from .icl import BurstySource, GeneratedColumn, zipf_probs

N_TARGETS = 3
SEQ_LEN = 7
EVAL_SETS = ("val", "switch", "tail", "tail_switch", "holdout")


@dataclass(frozen=True)
class POSVocab:
    """Nouns, adjectives, held-out tokens, then `COP`, `MASK`, `PAD` (last)."""

    n_tokens: int
    n_holdout: int

    @property
    def n_nouns(self) -> int:
        return self.n_tokens // 2

    @property
    def cop(self) -> int:
        return self.n_tokens + self.n_holdout

    @property
    def mask(self) -> int:
        return self.cop + 1

    @property
    def pad(self) -> int:
        return self.cop + 2

    @property
    def size(self) -> int:
        return self.cop + 3

    def groups(self) -> dict[str, list[int]]:
        """Id ranges `[lo, hi)` per role (`items` are the trained tokens)."""
        return {"items": [0, self.n_tokens], "holdout": [self.n_tokens, self.cop],
                "specials": [self.cop, self.size]}


@dataclass(frozen=True)
class MaskedEvalSet:
    """A fixed set of masked sentences: `targets` (n, 3), `alt` the in-weights answer."""

    x: torch.Tensor
    targets: torch.Tensor
    alt: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def target(self) -> torch.Tensor:
        return self.targets

    def score(self, logits: torch.Tensor, label_block: tuple[int, int]) -> dict[str, float]:
        """Hard accuracy from logits (n, 3, V): every masked position right."""
        lo, hi = label_block
        pred = logits[..., lo:hi].argmax(-1) + lo
        out = {"acc": float((pred == self.targets.to(pred.device)).all(1).float().mean())}
        if self.alt is not None:
            out["alt"] = float((pred == self.alt.to(pred.device)).all(1).float().mean())
        return out


class POSMaskedTask:
    """Sentence generation and evaluation sets of the masked part-of-speech task.

    Args:
        n_tokens: v, the trained vocabulary (half nouns, half adjectives; the paper's v = 10000,
            the reference code's default 100).
        n_holdout: tokens never trained (default v / 10, as the reference).
        zipf_alpha: Zipf exponent over each part of speech (the reference's 1.5; 0 = uniform).
        switch_prob: ε, per slot, the probability of a token of the other part of speech.
        band: share of each part of speech in the tail band (10%).
    """

    def __init__(self, n_tokens: int = 1000, n_holdout: int | None = None,
                 zipf_alpha: float = 1.5, switch_prob: float = 0.1, band: float = 0.1) -> None:
        if n_tokens < 8 or n_tokens % 2:
            raise ValueError(f"n_tokens: an even number >= 8, got {n_tokens!r}")
        n_holdout = max(2, n_tokens // 10) if n_holdout is None else n_holdout
        if n_holdout < 2:
            raise ValueError(f"n_holdout: at least 2, got {n_holdout!r}")
        if not (0 <= switch_prob <= 1 and zipf_alpha >= 0 and 0 < band <= 0.5):
            raise ValueError("switch_prob in [0, 1], zipf_alpha >= 0, band in (0, 0.5] required")
        self.vocab = POSVocab(n_tokens, n_holdout)
        self.alpha, self.switch_prob, self.band = zipf_alpha, switch_prob, band
        self.p = zipf_probs(self.vocab.n_nouns, zipf_alpha)
        self.n_band = max(1, math.ceil(band * self.vocab.n_nouns))

    def params(self) -> dict[str, Any]:
        return {"n_tokens": self.vocab.n_tokens, "n_holdout": self.vocab.n_holdout,
                "zipf_alpha": self.alpha, "switch_prob": self.switch_prob, "band": self.band}

    # -- sentences ----------------------------------------------------------------------------
    def _draw(self, g: np.random.Generator, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """`n` distinct (noun-slot, adjective-slot) token pairs for a set `kind`."""
        v, m = self.vocab, self.vocab.n_nouns
        if kind == "holdout":
            pair = v.n_tokens + np.argsort(g.random((n, v.n_holdout)), 1)[:, :2]
            return pair[:, 0], pair[:, 1]
        if kind.startswith("tail"):
            r = m - self.n_band + g.integers(0, self.n_band, (n, 2))
        else:
            r = g.choice(m, size=(n, 2), p=self.p)
        noun, adj = r[:, 0], m + r[:, 1]
        if kind.endswith("switch"):
            noun, adj = adj, noun
        elif kind == "train" and self.switch_prob > 0:
            r2 = g.choice(m, size=(n, 2), p=self.p)
            sw = g.random((n, 2)) < self.switch_prob
            noun = np.where(sw[:, 0], m + r2[:, 0], noun)
            adj = np.where(sw[:, 1], r2[:, 1], adj)
        same = noun == adj  # a switch drew the other slot's token: redraw it, same class
        while same.any():
            r = g.choice(m, size=int(same.sum()), p=self.p)
            adj[same] = np.where(adj[same] >= m, m + r, r)
            same = noun == adj
        return noun, adj

    def sentences(self, g: np.random.Generator, noun: np.ndarray,
                  adj: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked inputs (n, 7), structural targets (n, 3), in-weights targets (n, 3).

        The in-weights answer treats `t4` as the part of speech its token was trained as
        (the answer of a model that memorised the vocabulary instead of reading the COP)."""
        n, v = len(noun), self.vocab
        cop = np.full(n, v.cop)
        form_a = g.random(n) < 0.5  # COP ADJ NOUN, else NOUN COP ADJ
        head = np.where(form_a[:, None], np.stack([cop, adj, noun], 1),
                        np.stack([noun, cop, adj], 1))
        adj_first = g.random(n) < 0.5  # t4..t7 = adj adj adj adj, else noun adj noun noun
        t4 = np.where(adj_first, adj, noun)
        tgt = np.where(adj_first[:, None], np.stack([adj, adj, adj], 1),
                       np.stack([adj, noun, noun], 1))
        # in weights: t4 is an adjective iff its token is in the adjective vocabulary
        t4_is_adj = (t4 >= v.n_nouns) & (t4 < v.n_tokens)
        other = np.where(adj_first, noun, adj)
        alt = np.where(t4_is_adj[:, None], np.stack([t4, t4, t4], 1),
                       np.stack([other, t4, t4], 1))
        x = np.concatenate([head, t4[:, None], np.full((n, N_TARGETS), v.mask)], 1)
        return (torch.from_numpy(x.astype(np.int64)), torch.from_numpy(tgt.astype(np.int64)),
                torch.from_numpy(alt.astype(np.int64)))

    def sample_train(self, g: np.random.Generator, n: int, maps: Any = None
                     ) -> dict[str, torch.Tensor]:
        """`n` training sentences: `x` (n, 10) inputs and targets, `y` (n,) = 1, meta."""
        noun, adj = self._draw(g, n, "train")
        x, tgt, _ = self.sentences(g, noun, adj)
        m = self.vocab.n_nouns
        switched = torch.from_numpy((noun >= m) | (adj < m))
        return {"x": torch.cat([x, tgt], 1), "y": torch.ones(n, dtype=torch.int64),
                "switched": switched}

    def eval_sets(self, seed: int, n: int) -> dict[str, MaskedEvalSet]:
        """`pos_<set>` for every set of `EVAL_SETS` (inputs only); switched sets carry `alt`."""
        out = {}
        for i, kind in enumerate(EVAL_SETS):
            g = rng(seed, Purpose.ICL_EVAL, 1000 + i)
            x, tgt, alt = self.sentences(g, *self._draw(g, n, kind))
            out[f"pos_{kind}"] = MaskedEvalSet(x, tgt, alt if kind.endswith("switch") else None)
        return out


class POSMaskedStream(StreamBuilder):
    """Config class of a masked part-of-speech stream (`data.stream:` in YAML).

    Args:
        n_tokens, n_holdout, zipf_alpha, switch_prob, band: the task (`POSMaskedTask`).
        sequences: training sentences; `batch_size`: sentences per `observe`.
        seed: training samples; `eval_seed`: the fixed evaluation sets (`n_eval` each).
        n_test: the evaluator's test set; `block`: generation block (any chunking, same data).
    """

    kind = "pos_masked"

    def __init__(self, *, n_tokens: int = 1000, n_holdout: int | None = None,
                 zipf_alpha: float = 1.5, switch_prob: float = 0.1, band: float = 0.1,
                 sequences: int = 1_000_000, batch_size: int = 128, seed: int | None = None,
                 eval_seed: int = 1234, n_eval: int = 1000, n_test: int = 512,
                 block: int = 4096) -> None:
        self.task = POSMaskedTask(n_tokens, n_holdout, zipf_alpha, switch_prob, band)
        for name, val in (("sequences", sequences), ("batch_size", batch_size),
                          ("n_eval", n_eval), ("n_test", n_test), ("block", block)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: must be a positive integer, got {val!r}")
        self.sequences, self.batch_size, self.block = sequences, batch_size, block
        self.seed = 0 if seed is None else int(seed)  # the CLI fills it from seed_everything
        self.eval_seed, self.n_eval, self.n_test = eval_seed, n_eval, n_test

    def params(self) -> dict[str, Any]:
        return {"task": self.task.params(), "sequences": self.sequences,
                "batch_size": self.batch_size, "seed": self.seed, "eval_seed": self.eval_seed,
                "n_eval": self.n_eval, "n_test": self.n_test, "vocab": self.task.vocab.groups(),
                "n_targets": N_TARGETS}

    def eval_sets(self) -> dict[str, MaskedEvalSet]:
        return self.task.eval_sets(self.eval_seed, self.n_eval)

    def build(self) -> Stream:
        n = self.sequences
        source = BurstySource(self.task, [None], [0], [n], self.seed,  # type: ignore[list-item]
                              self.block)
        source.builder = self  # the evaluation sets travel with the stream (`eval_sets_of`)
        t = self.task.sample_train(rng(self.eval_seed, Purpose.ICL_EVAL, 999), self.n_test)
        params = self.params()
        return Stream(
            name="pos_masked", kind=self.kind,
            x=GeneratedColumn(source, "x", (n, SEQ_LEN + N_TARGETS)),  # type: ignore[arg-type]
            y=GeneratedColumn(source, "y", (n,)),  # type: ignore[arg-type]
            segment_ids=torch.zeros(n, dtype=torch.int64),
            segments=(Segment(0, "seg0", "pos", {}, n, self.n_test),),
            test_sets={0: (t["x"], t["y"])}, batch_size=self.batch_size,
            n_classes=self.task.vocab.size,  # the vocabulary (labels are 0/1, "solved")
            eval_positions=(n,), row_segments=(0,),
            first_rows=(0,), true_shifts=(), seed=self.seed, split_seed=self.eval_seed,
            params=params,
            source_fingerprint="generated:" + hashlib.sha256(
                json.dumps(params, sort_keys=True, default=str).encode()).hexdigest(),
            order_digest="",
        )


__all__ = ["POSMaskedTask", "POSMaskedStream", "POSVocab", "MaskedEvalSet", "EVAL_SETS",
           "N_TARGETS"]
