"""In-context task families with one position per example (docs/methods/stream_adapter.md).

`linreg`, `sparse_linreg`, `logreg`, `tokcls4/8`, `bool_conj/disj`: each example is one
position carrying a `token`, a `label_token` and a real-valued `value` vector (the `[x; y]`
tokens of von Oswald et al.). Builders, all pure functions of seeds (`streams.core.rng`):
`icl_sequences` (Stage A), `episodes` / `family_batch` (Stage B and the benchmark) and
`ContextStream` (a stream whose segments are tasks, for the test-time learner).
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

FAMILIES = ("linreg", "sparse_linreg", "logreg", "tokcls4", "tokcls8", "bool_conj", "bool_disj")
SEEN = ("linreg", "logreg", "tokcls4", "bool_conj")
UNSEEN = ("sparse_linreg", "tokcls8", "bool_disj")
# The pretraining pool (issue 18: the paper's base never saw the evaluation tasks): families
# of the same kinds — regression, linear classification, token maps, boolean functions — that
# are none of the seen or unseen ones, for a Stage A that excludes all of FAMILIES.
POOL = ("pool_tanhreg", "pool_quadreg", "pool_linclass3", "pool_tokcls3", "pool_tokcls6",
        "pool_tokmany", "pool_bool_maj3", "pool_bool_parity2")
ALL_FAMILIES = FAMILIES + POOL  # family ids index this (the first seven keep their ids)
REGRESSION = ("linreg", "sparse_linreg", "pool_tanhreg", "pool_quadreg")
TANH_SD = 0.7969  # sd of tanh(2z), z ~ N(0, 1): pool_tanhreg has Var y = 1 as the others
SIZES = {"tiny": {"d": 4, "n_bits": 6, "nnz": 1}, "small": {"d": 8, "n_bits": 10, "nnz": 2}}


@dataclass(frozen=True)
class FamilyVocab:
    """Items, then labels, then specials `XVEC`, `NONE`, `PAD` (last, as in the bursty task)."""

    n_items: int = 64
    n_labels: int = 16

    @property
    def label_start(self) -> int:
        return self.n_items

    @property
    def xvec(self) -> int:
        return self.n_items + self.n_labels

    @property
    def none(self) -> int:
        return self.xvec + 1

    @property
    def pad(self) -> int:
        return self.xvec + 2

    @property
    def size(self) -> int:
        return self.xvec + 3


def value_dim(size: str = "tiny") -> int:
    """Width of the `value` vector: `[x` zero-padded to max(d, n_bits); `y` or 0; `has_y]`."""
    s = SIZES[size]
    return max(s["d"], s["n_bits"]) + 2


def icl_sequences(
    family: str, n: int, k: int, seed: int, size: str = "tiny", vocab: FamilyVocab | None = None,
    key: int = 0,
) -> dict[str, torch.Tensor]:
    """`n` sequences `d1 … dk q` of one fresh task each (`stream_adapter.md` §4); k >= 0.

    Returns `token`, `label_token` (NONE at the query), `value` (n, k+1, value_dim), and the
    query's answer: `target` (a label id; for regression the real `y`), plus `is_regression`.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {ALL_FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {tuple(SIZES)}")
    if k < 0 or n < 1:
        raise ValueError(f"n must be >= 1 and k >= 0, got {n}, {k}")
    v = vocab or FamilyVocab()
    g = rng(seed, Purpose.ICL_TASK, ALL_FAMILIES.index(family), key)
    s = SIZES[size]
    m = k + 1
    dv = value_dim(size)
    value = np.zeros((n, m, dv), dtype=np.float32)
    token = np.full((n, m), v.xvec, dtype=np.int64)
    if family in POOL:
        token, label, f = _pool_sequences(family, g, n, m, k, s, v, value)
    elif family in REGRESSION or family == "logreg":
        d = s["d"]
        x = g.standard_normal((n, m, d))
        w = g.standard_normal((n, d))
        if family == "sparse_linreg":
            keep = np.argsort(g.random((n, d)), axis=1)[:, : s["nnz"]]
            mask = np.zeros((n, d))
            np.put_along_axis(mask, keep, 1.0, axis=1)
            w, scale = w * mask, math.sqrt(s["nnz"])
        else:
            scale = math.sqrt(d)
        f = np.einsum("nmd,nd->nm", x, w) / scale
        value[:, :, :d] = x
        if family == "logreg":
            yb = (g.random((n, m)) < 1 / (1 + np.exp(-3 * f))).astype(np.int64)
            label = v.label_start + yb
        else:
            value[:, :k, dv - 2] = f[:, :k]
            label = np.full((n, m), v.none, dtype=np.int64)
    elif family.startswith("tokcls"):
        c = 4 if family == "tokcls4" else 8
        items = np.argsort(g.random((n, v.n_items)), 1)[:, :c]
        labs = v.label_start + np.argsort(g.random((n, v.n_labels)), 1)[:, :c]
        pick = g.integers(0, c, (n, m))
        token = np.take_along_axis(items, pick, 1)
        label = np.take_along_axis(labs, pick, 1)
    else:  # boolean conjunction / disjunction of 1-3 literals
        nb = s["n_bits"]
        x = g.choice([-1.0, 1.0], size=(n, m, nb))
        n_lit = g.integers(1, 4, n)
        idx = np.argsort(g.random((n, nb)), 1)[:, :3]
        sign = g.choice([-1.0, 1.0], size=(n, 3))
        active = np.arange(3)[None, :] < n_lit[:, None]
        force = g.random((n, m)) < 0.5
        target_val = 1.0 if family == "bool_conj" else -1.0  # satisfy (AND) / falsify (OR)
        for j in range(3):
            cols = idx[:, j]
            cur = np.take_along_axis(x, np.broadcast_to(cols[:, None, None], (n, m, 1)), 2)[..., 0]
            new = np.where(force & active[:, j:j + 1], target_val * sign[:, j:j + 1], cur)
            np.put_along_axis(x, np.broadcast_to(cols[:, None, None], (n, m, 1)), new[..., None],
                              2)
        lit = np.stack([np.take_along_axis(x, np.broadcast_to(idx[:, j][:, None, None], (n, m, 1)),
                                           2)[..., 0] * sign[:, j:j + 1] > 0 for j in range(3)], -1)
        lit = np.where(active[:, None, :], lit, family == "bool_conj")
        yb = (lit.all(-1) if family == "bool_conj" else lit.any(-1)).astype(np.int64)
        value[:, :, :nb] = x
        label = v.label_start + yb
    value[:, :k, dv - 1] = 1.0
    if family in REGRESSION:
        target = torch.from_numpy(f[:, k].astype(np.float32))
    else:
        target = torch.from_numpy(label[:, k].copy())
    label = label.copy()
    label[:, k] = v.none
    return {"token": torch.from_numpy(token), "label_token": torch.from_numpy(label),
            "value": torch.from_numpy(value), "target": target,
            "is_regression": torch.tensor(family in REGRESSION)}


def _pool_sequences(
    family: str, g: np.random.Generator, n: int, m: int, k: int, s: dict[str, int],
    v: FamilyVocab, value: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tokens, labels and (regression) targets of the pretraining-pool families; fills the
    inputs into `value` in place. One fresh task per sequence, as every family."""
    dv = value.shape[-1]
    token = np.full((n, m), v.xvec, dtype=np.int64)
    f = None
    if family in ("pool_tanhreg", "pool_quadreg", "pool_linclass3"):
        d = s["d"]
        x = g.standard_normal((n, m, d))
        value[:, :, :d] = x
        if family == "pool_linclass3":  # argmax of 3 random linear scores
            w = g.standard_normal((n, 3, d))
            label = v.label_start + np.einsum("nmd,ncd->nmc", x, w).argmax(-1)
            return token, label, None
        w = g.standard_normal((n, d))
        z = np.einsum("nmd,nd->nm", x, w / np.linalg.norm(w, axis=1, keepdims=True))  # N(0, 1)
        f = np.tanh(2 * z) / TANH_SD if family == "pool_tanhreg" else (z ** 2 - 1) / math.sqrt(2)
        value[:, :k, dv - 2] = f[:, :k]
        return token, np.full((n, m), v.none, dtype=np.int64), f
    if family in ("pool_tokcls3", "pool_tokcls6", "pool_tokmany"):
        c, n_lab = {"pool_tokcls3": (3, 3), "pool_tokcls6": (6, 6), "pool_tokmany": (6, 2)}[
            family]
        items = np.argsort(g.random((n, v.n_items)), 1)[:, :c]
        labs = v.label_start + np.argsort(g.random((n, v.n_labels)), 1)[:, :n_lab]
        if n_lab < c:  # many items to few labels: a random surjection
            labs = np.take_along_axis(labs, np.stack([g.permutation(np.arange(c) % n_lab)
                                                      for _ in range(n)]), 1)
        pick = g.integers(0, c, (n, m))
        return (np.take_along_axis(items, pick, 1), np.take_along_axis(labs, pick, 1), None)
    nb = s["n_bits"]  # boolean: majority of 3 literals, parity of 2 bits
    x = g.choice([-1.0, 1.0], size=(n, m, nb))
    value[:, :, :nb] = x
    r = 3 if family == "pool_bool_maj3" else 2
    idx = np.argsort(g.random((n, nb)), 1)[:, :r]
    bits = np.take_along_axis(x, np.broadcast_to(idx[:, None, :], (n, m, r)), 2)
    if family == "pool_bool_maj3":
        sign = g.choice([-1.0, 1.0], size=(n, 1, r))
        yb = ((bits * sign).sum(-1) > 0).astype(np.int64)
    else:
        yb = (bits.prod(-1) > 0).astype(np.int64)
    return token, v.label_start + yb, None


def episodes(
    family: str, n: int, k: int, n_query: int, seed: int, size: str = "tiny",
    vocab: FamilyVocab | None = None, key: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """`n` episodes of one task each: a `context` of k demonstrations and `n_query` queries
    of the same task (StreamAdapter: the context is absorbed, queries run alone)."""
    if n_query < 1:
        raise ValueError(f"n_query: must be >= 1, got {n_query}")
    seqs = icl_sequences(family, n, k + n_query - 1, seed, size, vocab, key)
    m = k + n_query  # positions: k demos, then n_query queries (the last is the ICL query)
    ctx = {f: seqs[f][:, :k] for f in ("token", "label_token", "value")}
    # queries: the last n_query examples; their answers are read before the labels are hidden
    if family in REGRESSION:
        answers = torch.cat([seqs["value"][:, k:m - 1, -2], seqs["target"][:, None]], 1)
    else:
        answers = torch.cat([seqs["label_token"][:, k:m - 1], seqs["target"][:, None]], 1)
    q = {"token": seqs["token"][:, k:], "value": seqs["value"][:, k:].clone(),
         "label_token": torch.full_like(seqs["token"][:, k:], (vocab or FamilyVocab()).none),
         "target": answers}
    q["value"][..., -2:] = 0.0
    return {"context": ctx, "queries": q}


def family_batch(
    families: tuple[str, ...] | list[str], per_family: int, k: int, n_query: int, seed: int,
    size: str = "tiny", vocab: FamilyVocab | None = None, key: int = 0,
) -> dict[str, torch.Tensor]:
    """Episodes of several families in one batch, all with the same `k` (no padding).

    Flat fields: `ctx_token`, `ctx_label`, `ctx_value` (B, k[, dv]) — the demonstrations;
    `q_token`, `q_label` (NONE), `q_value` (B, q[, dv]) — the queries, labels hidden;
    `target` (B, q) float (label ids for label families, `y` for regression); `family` (B,)
    the index into `ALL_FAMILIES`. `per_family` episodes of each family, in `families` order.
    """
    parts = [episodes(f, per_family, k, n_query, seed, size, vocab, key) for f in families]
    out = {
        "ctx_token": torch.cat([p["context"]["token"] for p in parts]),
        "ctx_label": torch.cat([p["context"]["label_token"] for p in parts]),
        "ctx_value": torch.cat([p["context"]["value"] for p in parts]),
        "q_token": torch.cat([p["queries"]["token"] for p in parts]),
        "q_label": torch.cat([p["queries"]["label_token"] for p in parts]),
        "q_value": torch.cat([p["queries"]["value"] for p in parts]),
        "target": torch.cat([p["queries"]["target"].float() for p in parts]),
    }
    out["family"] = torch.cat([torch.full((per_family,), ALL_FAMILIES.index(f),
                                          dtype=torch.long) for f in families])
    return out


def family_skill(family: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-query skill: accuracy (0/1) for label families, `1 − (ŷ − y)²` for regression.

    Regression targets have Var y = 1 by construction, so the mean of `(ŷ − y)²` *is* the
    nMSE, and the spec's skill `max(0, 1 − nMSE)` is `max(0, mean of this)`; `pred` is the
    predicted label id (label families) or the real prediction (regression).
    """
    if family in REGRESSION:
        return 1.0 - (pred.float() - target.float()) ** 2
    return (pred.long() == target.long()).float()


# ============================================================================ context streams


def pack_queries(token: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Examples as stream samples (n, 2 + dv) float: `[token, NONE-slot, value]`, labels hidden.

    The label slot is a placeholder (the learner fills `label_token` from `y` when it absorbs a
    labelled example); `value`'s `y` and `has_y` entries must already be zero.
    """
    n = token.shape[0]
    return torch.cat([token.float()[:, None], torch.zeros(n, 1), value.float()], 1)


CONTEXT_KEY = 1 << 40
"""Key offset of context-stream tasks: never the key of a training batch or episode."""


class ContextStream(StreamBuilder):
    """A test-time context stream (`stream_adapter.md` §4, §6): each segment is one task of a
    label family; its labelled examples arrive in mini-batches, nobody says when the task
    changes. `order` may repeat a task (recurring: fresh examples, same task).

    Samples are packed `[token, label slot, value]` rows (`pack_queries`), `y` the label id;
    each segment has `n_test` held-out queries of its task for the accuracy matrix.

    Args:
        family: a label family (`logreg`, `tokcls4`, `tokcls8`, `bool_conj`, `bool_disj`).
        n_tasks: distinct tasks (segments); `order`: their occurrences (default each once).
        examples_per_segment: labelled examples per occurrence.
        batch_size: examples per `observe`.
        size, n_items, n_labels: as the base's `EpisodeDataModule`.
        n_test: held-out queries per task. `seed`: tasks and examples.
    """

    kind = "context"

    def __init__(
        self, *, family: str = "tokcls4", n_tasks: int = 4, order: list[int] | None = None,
        examples_per_segment: int = 64, batch_size: int = 4, size: str = "tiny",
        n_items: int = 64, n_labels: int = 16, n_test: int = 256, seed: int | None = None,
    ) -> None:
        if family not in FAMILIES or family in REGRESSION:
            raise ValueError(f"family: a context stream needs a label family, one of "
                             f"{tuple(f for f in FAMILIES if f not in REGRESSION)}; got {family!r}")
        if size not in SIZES:
            raise ValueError(f"size: {size!r} is not one of {tuple(SIZES)}")
        for name, val in (("n_tasks", n_tasks), ("examples_per_segment", examples_per_segment),
                          ("batch_size", batch_size), ("n_test", n_test)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: must be a positive integer, got {val!r}")
        if n_items < 8 or n_labels < 8:
            raise ValueError(f"n_items and n_labels: at least 8 each, got {n_items}, {n_labels}")
        self.order = list(range(n_tasks)) if order is None else [int(o) for o in order]
        if not self.order or any(not 0 <= o < n_tasks for o in self.order):
            raise ValueError(f"order: task ids must be in [0, {n_tasks}), got {order!r}")
        self.family, self.n_tasks, self.per = family, n_tasks, examples_per_segment
        self.batch_size, self.size, self.n_test = batch_size, size, n_test
        self.seed = 0 if seed is None else int(seed)  # the CLI fills it from seed_everything
        self.vocab = FamilyVocab(n_items, n_labels)

    def params(self) -> dict[str, Any]:
        return {"family": self.family, "n_tasks": self.n_tasks, "order": self.order,
                "examples_per_segment": self.per, "batch_size": self.batch_size,
                "size": self.size, "n_items": self.vocab.n_items, "n_labels": self.vocab.n_labels,
                "n_test": self.n_test, "seed": self.seed}

    def build(self) -> Stream:
        counts = {t: self.order.count(t) for t in set(self.order)}
        xs, ys, tests = {}, {}, {}
        for t, c in counts.items():
            # one task per id: all its occurrences and its test queries from one draw
            m = c * self.per + self.n_test
            s = icl_sequences(self.family, 1, m - 1, self.seed, self.size, self.vocab,
                              key=CONTEXT_KEY + t)
            label = s["label_token"][0].clone()
            label[-1] = s["target"][0]
            value = s["value"][0].clone()
            value[:, -2:] = 0.0
            x = pack_queries(s["token"][0], value)
            xs[t], ys[t] = x[: c * self.per], label[: c * self.per]
            tests[t] = (x[c * self.per:], label[c * self.per:])
        seen: dict[int, int] = {}
        x_parts, y_parts = [], []
        for t in self.order:
            j = seen.get(t, 0)
            seen[t] = j + 1
            x_parts.append(xs[t][j * self.per:(j + 1) * self.per])
            y_parts.append(ys[t][j * self.per:(j + 1) * self.per])
        n_occ = len(self.order)
        ends = tuple(self.per * (i + 1) for i in range(n_occ))
        used = tuple(sorted(counts))
        segments = tuple(Segment(t, f"task{t}", self.family, {"task": t},
                                 self.per * counts[t], self.n_test) for t in used)
        shifts = tuple(self.per * i for i in range(1, n_occ) if self.order[i] != self.order[i - 1])
        params = self.params()
        return Stream(
            name=f"context_{self.family}", kind=self.kind, x=torch.cat(x_parts),
            y=torch.cat(y_parts).long(),
            segment_ids=torch.from_numpy(np.repeat(np.asarray(self.order, np.int64), self.per)),
            segments=segments, test_sets=tests, batch_size=self.batch_size,
            n_classes=self.vocab.size, eval_positions=ends, row_segments=tuple(self.order),
            first_rows=tuple(self.order.index(t) for t in used), true_shifts=shifts,
            seed=self.seed, split_seed=self.seed, params=params,
            source_fingerprint="generated:" + hashlib.sha256(
                json.dumps(params, sort_keys=True).encode()).hexdigest(),
            order_digest="",
        )
