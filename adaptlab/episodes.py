"""`EpisodeDataModule`: generated in-context episodes of the task families, one batch a step.

Stage A (the base learns in context) and Stage B (the adapter is meta-trained) of
`stream_adapter.md` §5 do not train on a stream but on fresh tasks: each batch holds
`per_family` episodes of every listed family, with one demonstration count `k` per batch (so
no padding), drawn `uniform` on {0…k_max} (Stage A) or `loguniform` on {1…k_max} (Stage B).
Batch `i` is a pure function of (seed, i): a resumed run sees the same batches as an
uninterrupted one. The learner's `input_shape` is linked as (positions, value width).
`demo_curve` scores any predictor on fixed evaluation episodes, per family and `k`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from .streams.core import Purpose, require_positive, rng
from .streams.icl import (
    ALL_FAMILIES,
    FAMILIES,
    REGRESSION,
    SIZES,
    FamilyVocab,
    family_batch,
    family_skill,
    value_dim,
)

K_DISTS = ("uniform", "loguniform")
REG_IDS = tuple(ALL_FAMILIES.index(f) for f in REGRESSION)


def draw_k(seed: int, step: int, k_dist: str, k_min: int, k_max: int) -> int:
    """The batch's demonstration count (`uniform` or `loguniform` on {k_min…k_max})."""
    g = rng(seed, Purpose.ICL_TASK, 1000, step)
    if k_dist == "uniform":
        return int(g.integers(k_min, k_max + 1))
    lo, hi = math.log(max(1, k_min)), math.log(k_max + 1)
    return min(k_max, max(k_min, int(math.exp(g.uniform(lo, hi)))))


class EpisodeLoader:
    """Batches `first … steps−1`. Its length is the whole epoch (as `data.StreamLoader`):
    after a mid-epoch resume Lightning expects exactly the remaining batches."""

    def __init__(self, dm: EpisodeDataModule, first: int) -> None:
        self.dm, self.first = dm, first

    def __len__(self) -> int:
        return self.dm.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.first, self.dm.steps):
            yield self.dm.batch(i)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position is the data module's `batches_done`

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EpisodeDataModule(pl.LightningDataModule):
    """Episodes of fresh tasks from `streams.icl` families (`docs/methods/stream_adapter.md`).

    Args:
        families: which families (default the seven of `FAMILIES`; `POOL` holds the
            pretraining pool that excludes them); Stage B lists the seen ones.
        size: `tiny` or `small` (input widths, `streams.icl.SIZES`).
        n_items, n_labels: the family vocabulary (`FamilyVocab`).
        window: W, the base's context window in demonstrations.
        n_query: queries per episode (`q_A` in Stage A, `q` in Stage B).
        per_family: episodes of each family per batch.
        k_dist: `uniform` on {k_min…k_max} or `loguniform` on {k_min…k_max}.
        k_min, k_max: demonstration counts (default k_max: W).
        steps: batches in the one epoch of a run (set it to `trainer.max_steps`).
        seed: the batches; `eval_seed` belongs to the learners' evaluation episodes.
    """

    def __init__(
        self, *, families: Sequence[str] = FAMILIES, size: str = "tiny", n_items: int = 64,
        n_labels: int = 16, window: int = 16, n_query: int = 4, per_family: int = 32,
        k_dist: str = "uniform", k_min: int = 0, k_max: int | None = None, steps: int = 2000,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        families = tuple(families)
        bad = [f for f in families if f not in ALL_FAMILIES]
        if bad or not families:
            raise ValueError(f"families: unknown {bad or families!r}; choose from "
                             f"{ALL_FAMILIES}")
        if size not in SIZES:
            raise ValueError(f"size: {size!r} is not one of {tuple(SIZES)}")
        if k_dist not in K_DISTS:
            raise ValueError(f"k_dist: {k_dist!r} is not one of {K_DISTS}")
        for name, val in (("window", window), ("n_query", n_query), ("per_family", per_family),
                          ("steps", steps), ("n_items", n_items), ("n_labels", n_labels)):
            require_positive(name, val)
        k_max = window if k_max is None else k_max
        if not 0 <= k_min <= k_max or (k_dist == "loguniform" and k_min < 1 and k_max < 1):
            raise ValueError(f"k_min, k_max: need 0 <= k_min <= k_max, got {k_min}, {k_max}")
        if n_labels < 8 or n_items < 8:
            raise ValueError("n_items and n_labels: at least 8 each (tokcls8 draws 8 of each)")
        self.families, self.size = families, size
        self.vocab = FamilyVocab(n_items, n_labels)
        self.window, self.n_query, self.per_family = window, n_query, per_family
        self.k_dist, self.k_min, self.k_max = k_dist, k_min, k_max
        self.steps, self.seed = steps, 0 if seed is None else int(seed)
        self.batches_done = 0

    # what the CLI links into the learner
    @property
    def input_shape(self) -> tuple[int, int]:
        """(positions of one ICL sequence `W + q`, value width)."""
        return (self.window + self.n_query, value_dim(self.size))

    @property
    def n_classes(self) -> int:
        return self.vocab.size

    @property
    def batch_size(self) -> int:
        return self.per_family * len(self.families)

    def task_info(self) -> dict[str, Any]:
        """What a checkpoint must remember to rebuild episodes and read-outs later."""
        return {"families": list(self.families), "size": self.size,
                "n_items": self.vocab.n_items, "n_labels": self.vocab.n_labels,
                "window": self.window, "n_query": self.n_query}

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        """Batch `i`: every family's episodes with one shared `k`."""
        k = draw_k(self.seed, i, self.k_dist, self.k_min, self.k_max)
        return family_batch(self.families, self.per_family, k, self.n_query, self.seed,
                            self.size, self.vocab, key=i)

    def train_dataloader(self) -> EpisodeLoader:
        return EpisodeLoader(self, self.batches_done)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # counted here, not in the loader: Lightning fetches one batch ahead
        if self.trainer is not None and self.trainer.training:
            self.batches_done += 1
        return batch

    def fingerprint(self) -> str:
        return json.dumps({**self.task_info(), "per_family": self.per_family, "seed": self.seed,
                           "k": [self.k_dist, self.k_min, self.k_max]}, sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():
            raise ValueError("checkpoint: it was written for other episodes (families, sizes, "
                             "seed or k); resume with the config that wrote it")
        self.batches_done = int(state.get("batches_done", 0))


Predictor = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""Maps a `family_batch` to query outputs: label-block logits (B, q, L) and reals (B, q)."""


def predictions(
    logits: torch.Tensor, reg: torch.Tensor, family: torch.Tensor, vocab: FamilyVocab
) -> torch.Tensor:
    """Per query: the predicted label id (label families) or the real prediction (regression).

    `logits` (B, q, L) over the label block, `reg` (B, q), `family` (B,) indices into
    ALL_FAMILIES.
    """
    label = (logits.argmax(-1) + vocab.label_start).float()  # ids exceed bf16's exact range
    is_reg = torch.isin(family, torch.tensor(REG_IDS, device=family.device))
    return torch.where(is_reg[:, None], reg.float(), label)


@torch.no_grad()
def demo_curve(
    predict: Predictor, families: Sequence[str], ks: Sequence[int], *, episodes: int,
    n_query: int, seed: int, size: str = "tiny", vocab: FamilyVocab | None = None,
    batch: int = 256, device: torch.device | str = "cpu",
) -> dict[str, dict[int, dict[str, float]]]:
    """Skill of `predict` per family and demonstration count `k` (spec §7), on fixed episodes.

    Episode sets depend only on (seed, family, k), so methods are compared on the same tasks.
    Per (family, k): `skill` (accuracy, or max(0, 1 − nMSE)), its standard error `se` over
    episodes, and `nmse` for regression families.
    """
    vocab = vocab or FamilyVocab()
    out: dict[str, dict[int, dict[str, float]]] = {}
    for fam in families:
        out[fam] = {}
        for k in ks:
            per_ep = []
            for lo in range(0, episodes, batch):
                n = min(batch, episodes - lo)
                b = family_batch([fam], n, k, n_query, seed, size, vocab,
                                 key=1_000_003 * (k + 1) + lo)
                b = {f: t.to(device) for f, t in b.items()}
                logits, reg = predict(b)
                pred = predictions(logits, reg, b["family"], vocab)
                per_ep.append(family_skill(fam, pred, b["target"]).mean(1).cpu())
            s = torch.cat(per_ep).double()
            se = float(s.std() / math.sqrt(len(s))) if len(s) > 1 else float("nan")
            row = {"skill": max(0.0, float(s.mean())), "se": se}
            if fam in REGRESSION:
                row["nmse"] = 1.0 - float(s.mean())
            out[fam][k] = row
    return out


def average_skill(curve: dict[str, dict[int, dict[str, float]]], families: Sequence[str],
                  k: int) -> float:
    """Mean skill over `families` at `k` (families missing `k` are skipped)."""
    vals = [curve[f][k]["skill"] for f in families if f in curve and k in curve[f]]
    return sum(vals) / len(vals) if vals else float("nan")
