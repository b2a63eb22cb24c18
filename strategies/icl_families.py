"""Stage A of StreamAdapter: a `TinyGPT` trained to learn the task families in context.

`FamilyInContextLearner` (docs/methods/stream_adapter.md, Stage A) trains a TinyGPT from scratch
on `EpisodeDataModule` batches — every family in one batch, `k ~ U{0…W}` demonstrations, then
`q_A` queries with hidden labels — with the loss at the query positions (cross-entropy over the
label block, MSE through the regression head), averaged per family and summed. It logs the ICL
curve (skill vs k) and, at the end, the `icl_check` gate: the adapter of Stage B can only absorb
what the frozen base can use in context. It then exports the base (`export:`), with its task
layout, gate result and a content hash, for Stage B and the benchmark.

The read-out (`family_readout`, `family_loss`, `icl_outputs`) is shared with Stage B and the
ICL baseline of `tools/stream_adapter_bench.py`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adaptlab.episodes import EpisodeDataModule, average_skill, demo_curve
from adaptlab.jsonio import metrics_document, write_json_atomic
from adaptlab.learner import StreamLearner, warmup_cosine
from adaptlab.models import TinyGPT
from adaptlab.seeding import seeded
from adaptlab.streams.icl import ALL_FAMILIES, REGRESSION, SEEN, UNSEEN, FamilyVocab

from .in_context import evaluate_and_log

REG_IDS = tuple(ALL_FAMILIES.index(f) for f in REGRESSION)
BASE_FORMAT = "adaptlab.tinygpt/1"


# ----- read-out and loss (shared by Stage A, Stage B and the ICL baseline) -------------------


def family_readout(
    model: TinyGPT, h: torch.Tensor, vocab: FamilyVocab
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-block logits (…, L) through the tied head, and the regression read-out (…)."""
    lo, hi = vocab.label_start, vocab.xvec
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias[lo:hi]
    return F.linear(h, head.weight[lo:hi], bias), model.regress(h)


def _per_family_sum(per_row: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
    """Mean of `per_row` within each family present, summed over families (no host sync)."""
    sums = per_row.new_zeros(len(ALL_FAMILIES)).index_add(0, family, per_row)
    counts = torch.bincount(family, minlength=len(ALL_FAMILIES)).to(per_row.dtype)
    return (sums / counts.clamp(min=1)).sum()


def family_loss(
    logits: torch.Tensor, reg: torch.Tensor, target: torch.Tensor, family: torch.Tensor,
    vocab: FamilyVocab,
) -> torch.Tensor:
    """Per family: cross-entropy over the label block or MSE; averaged per family, summed."""
    is_reg = torch.isin(family, torch.tensor(REG_IDS, device=family.device))
    n_lab = logits.shape[-1]
    lab = (target - vocab.label_start).long().clamp(0, n_lab - 1)  # regression rows: unused
    ce = F.cross_entropy(logits.flatten(0, 1).float(), lab.flatten(), reduction="none")
    mse = (reg.float() - target.float()) ** 2
    per_row = torch.where(is_reg, mse.mean(1), ce.view_as(mse).mean(1))
    return _per_family_sum(per_row, family)


def distill_loss(
    logits: torch.Tensor, reg: torch.Tensor, t_logits: torch.Tensor, t_reg: torch.Tensor,
    family: torch.Tensor,
) -> torch.Tensor:
    """`KL(teacher ‖ student)` over the label block, or the squared gap of the regression
    read-outs (the KL of unit-variance Gaussians, up to ½); averaged per family, summed."""
    is_reg = torch.isin(family, torch.tensor(REG_IDS, device=family.device))
    student = logits.float().log_softmax(-1)
    teacher = t_logits.float().log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    gap = (reg.float() - t_reg.float()) ** 2
    per_row = torch.where(is_reg, gap.mean(1), kl.mean(1))
    return _per_family_sum(per_row, family)


def zero_shot_outputs(
    model: TinyGPT, batch: dict[str, torch.Tensor], vocab: FamilyVocab
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base on each query alone at position 0, no context: what an empty state answers."""
    b, q = batch["q_token"].shape
    h, _ = model.hidden(batch["q_token"].reshape(b * q, 1),
                        label_tokens=batch["q_label"].reshape(b * q, 1),
                        values=batch["q_value"].reshape(b * q, 1, -1))
    return family_readout(model, h.reshape(b, q, -1), vocab)


def icl_outputs(
    model: TinyGPT, batch: dict[str, torch.Tensor], vocab: FamilyVocab,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context learning: `d1 … dk q1 … qq` in the window, read at the query positions.

    `window` truncates the context to its last `window` demonstrations (truncated ICL).
    """
    ct, cl, cv = batch["ctx_token"], batch["ctx_label"], batch["ctx_value"]
    if window is not None and ct.shape[1] > window:
        ct, cl, cv = ct[:, -window:], cl[:, -window:], cv[:, -window:]
    k = ct.shape[1]
    tokens = torch.cat([ct, batch["q_token"]], 1)
    labels = torch.cat([cl, batch["q_label"]], 1)
    values = torch.cat([cv, batch["q_value"]], 1)
    h, _ = model.hidden(tokens, label_tokens=labels, values=values)
    return family_readout(model, h[:, k:], vocab)


def icl_check(
    curve: dict[str, dict[int, dict[str, float]]], window: int, min_gain: float = 0.15,
    max_nmse: float = 0.6,
) -> dict[str, Any]:
    """Stage A gate (§5): at k = W every family must clearly beat k = 0 — label families gain
    `min_gain` accuracy, regression reaches nMSE ≤ `max_nmse`. `failing` names the others."""
    failing, rows = [], {}
    for fam, by_k in curve.items():
        if 0 not in by_k or window not in by_k:
            continue
        if fam in REGRESSION:
            ok = by_k[window]["nmse"] <= max_nmse
            rows[fam] = {"nmse_W": by_k[window]["nmse"], "pass": ok}
        else:
            gain = by_k[window]["skill"] - by_k[0]["skill"]
            ok = gain >= min_gain
            rows[fam] = {"gain_W": gain, "pass": ok}
        if not ok:
            failing.append(fam)
    return {"passed": not failing and bool(rows), "failing": failing, "families": rows,
            "min_gain": min_gain, "max_nmse": max_nmse, "window": window}


# ----- the exported base ---------------------------------------------------------------------


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes, dtypes and bytes; 0-d tensors included)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_atomic(obj: Any, path: str) -> None:
    """`torch.save` to `<path>.tmp`, then rename: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_export(path: str, option: str, fmt: str, missing: str, hint: str = "") -> dict[str, Any]:
    """An export record (`torch.load`, weights only) whose `format` is `fmt`; every failure is
    one line naming the config `option` (`missing`, `hint`: the no-file message)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option}: {missing} at {path!r}{hint}")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{option}: {path!r} is not readable ({type(err).__name__})") from None
    if not isinstance(rec, dict) or rec.get("format") != fmt:
        raise ValueError(f"{option}: {path!r} is not a {fmt} export")
    return rec


def load_base(path: str) -> tuple[TinyGPT, dict[str, Any]]:
    """The Stage A export: the TinyGPT (weights loaded) and its record (task, gate, hash)."""
    rec = read_export(path, "base", BASE_FORMAT, "no Stage A export", "; run `adaptlab fit "
                      "--config configs/icl/pretrain_tinygpt.yaml` first")
    model = TinyGPT(**rec["arch"])
    model.load_state_dict(rec["state_dict"])
    return model, rec


# ----- Stage A -------------------------------------------------------------------------------


class EpisodicTraining:
    """What Stage A and Stage B share: one AdamW step per episode batch (warm-up, cosine decay
    to 0 at `trainer.max_steps`, gradient clip), the loss log, and the demo curve evaluated
    every `eval_every` steps on fixed episodes and logged as `<curve_prefix>/<family>/k<k>`.

    A `StreamLearner` subclass mixes it in and provides `episode_loss(batch)`, `predict_batch`
    (a `demo_curve` predictor), `curve_families`, `curve_ks`, `curve_prefix`, `task`, `vocab`
    and the optimiser settings (`lr`, `warmup_steps`, `clip`, `eval_*`).
    """

    curve_prefix = "curve"

    def episodic_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        factor = warmup_cosine(self.update_steps, self.warmup_steps, self.trainer.max_steps)
        for g in opt.optimizer.param_groups:
            g["lr"] = self.lr * factor
        loss = self.episode_loss(batch)
        self._check_finite(loss.detach()[None])
        self.update(opt, loss, clip=self.clip)
        self.samples_seen += len(batch["family"])
        if self.logger is not None and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.logger.log_metrics(
                {"train/loss": float(loss.detach()), "train/lr": self.lr * factor,
                 "train/k": float(batch["ctx_token"].shape[1])}, step=self.update_steps)
        if self.eval_every and self.update_steps % self.eval_every == 0:
            self.evaluate_and_log()
        return loss

    def curve(self, families: Sequence[str] | None = None, episodes: int | None = None,
              ks: Sequence[int] | None = None) -> dict[str, dict[int, dict[str, float]]]:
        """Skill per family and k of `predict_batch` on the fixed evaluation episodes."""
        was = self.training
        self.eval()
        try:
            return demo_curve(
                self.predict_batch, families or self.curve_families, ks or self.curve_ks,
                episodes=episodes or self.eval_episodes, n_query=self.task["n_query"],
                seed=self.eval_seed, size=self.task["size"], vocab=self.vocab,
                device=self.device)
        finally:
            self.train(was)

    def evaluate_and_log(self) -> dict[str, dict[int, dict[str, float]]]:
        """Evaluate once per optimizer step (at most), keep the curve, log its scalars."""
        return evaluate_and_log(self, self.curve, self.curve_scalars, field="curve")["curve"]

    def curve_scalars(self, curve: dict[str, dict[int, dict[str, float]]]) -> dict[str, float]:
        """`<prefix>/<family>/k<k>` skills and the seen/unseen averages at k = W."""
        vals = {f"{self.curve_prefix}/{f}/k{k}": row["skill"]
                for f, by_k in curve.items() for k, row in by_k.items()}
        w = self.task["window"]
        for name, fams in (("seen", SEEN), ("unseen", UNSEEN)):
            if any(f in curve and w in curve[f] for f in fams):
                vals[f"{self.curve_prefix}/{name}/kW"] = average_skill(curve, fams, w)
        return vals

    def log_curve_figure(self, tag: str, curves: dict[str, Any], title: str) -> None:
        """A `demo_curve_figure` of `curves` (method -> curve) in TensorBoard."""
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_figure"):
            return
        from adaptlab.figures import demo_curve_figure, plt

        fig = demo_curve_figure(curves, title=title, window=self.task["window"])
        exp.add_figure(tag, fig, global_step=self.update_steps)
        plt.close(fig)


class FamilyInContextLearner(EpisodicTraining, StreamLearner):
    """Stage A: a TinyGPT learns every task family in context (spec §5).

    Args:
        n_layer, d_model, n_head, d_mlp, initializer_range: the TinyGPT (its vocabulary,
            positions and value width are linked from the data module).
        lr, betas, weight_decay, warmup_steps, clip: AdamW with linear warm-up and cosine
            decay to 0 at `trainer.max_steps`; decay on matrices only; gradient-norm clip.
        eval_every: optimizer steps between ICL-curve evaluations (0: only at the end).
        eval_episodes: episodes per (family, k) in an evaluation.
        eval_ks: demonstration counts of the curve (default 0, 1, 2, 4, 8, W).
        eval_seed: the fixed evaluation episodes.
        gate_min_gain, gate_max_nmse: the `icl_check` thresholds.
        export: where to write the trained base for Stage B (None: not exported).
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    def __init__(
        self, *, n_layer: int = 3, d_model: int = 64, n_head: int = 4, d_mlp: int = 256,
        initializer_range: float = 0.02, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.98),
        weight_decay: float = 0.01, warmup_steps: int = 200, clip: float | None = 1.0,
        eval_every: int = 500, eval_episodes: int = 256, eval_ks: Sequence[int] | None = None,
        eval_seed: int = 4321, gate_min_gain: float = 0.15, gate_max_nmse: float = 0.6,
        export: str | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if len(self.input_shape) != 2:
            raise ValueError(
                f"input_shape: (positions, value width) from an EpisodeDataModule, got "
                f"{self.input_shape}; use data.class_path: adaptlab.episodes.EpisodeDataModule"
            )
        if lr <= 0 or warmup_steps < 0 or eval_every < 0 or eval_episodes < 2:
            raise ValueError("lr > 0, warmup_steps >= 0, eval_every >= 0, eval_episodes >= 2")
        n_pos, d_value = self.input_shape
        self.arch = {"vocab_size": self.n_classes, "n_positions": n_pos, "n_layer": n_layer,
                     "d_model": d_model, "n_head": n_head, "d_mlp": d_mlp,
                     "pad_id": self.n_classes - 1, "d_value": d_value, "reg_head": True,
                     "initializer_range": initializer_range}
        with seeded(self.seed):
            self.model = TinyGPT(**self.arch)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.clip = warmup_steps, clip
        self.eval_every, self.eval_episodes, self.eval_seed = eval_every, eval_episodes, eval_seed
        self.eval_ks = None if eval_ks is None else sorted({int(k) for k in eval_ks})
        self.gate = (gate_min_gain, gate_max_nmse)
        self.export = export
        self.task: dict[str, Any] = {}
        self.curves: list[dict[str, Any]] = []
        self.check: dict[str, Any] | None = None

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.host_trainer is not None else None
        if not isinstance(dm, EpisodeDataModule):
            raise ValueError("FamilyInContextLearner: trains on adaptlab.episodes."
                             "EpisodeDataModule (data.class_path), not on a stream")
        if dm.vocab.size != self.n_classes:
            raise ValueError(f"data: vocabulary {dm.vocab.size} != the model's {self.n_classes}")
        self.task = dm.task_info()
        if self.eval_ks is not None and not {0, self.task["window"]} <= set(self.eval_ks):
            raise ValueError(f"eval_ks: must include 0 and W = {self.task['window']} (the "
                             f"icl_check gate compares them), got {self.eval_ks}")

    @property
    def vocab(self) -> FamilyVocab:
        return FamilyVocab(self.task["n_items"], self.task["n_labels"])

    @property
    def ks(self) -> list[int]:
        w = self.task["window"]
        return self.eval_ks or sorted(k for k in {0, 1, 2, 4, 8, w} if k <= w)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            big = p.ndim >= 2 and not name.startswith(("wte", "wpe"))
            (decay if big else no_decay).append(p)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas)

    # -- training -----------------------------------------------------------------------------
    curve_prefix = "icl"

    def episode_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, reg = icl_outputs(self.model, batch, self.vocab)
        return family_loss(logits, reg, batch["target"], batch["family"], self.vocab)

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return icl_outputs(self.model, batch, self.vocab)

    @property
    def curve_families(self) -> list[str]:
        return list(self.task["families"])

    @property
    def curve_ks(self) -> list[int]:
        return self.ks

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.episodic_step(batch, batch_idx)

    def on_train_end(self) -> None:
        curve = self.evaluate_and_log()
        self.check = icl_check(curve, self.task["window"], *self.gate)
        if not self.trainer.is_global_zero:
            return
        log_dir = self.trainer.log_dir
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            write_json_atomic(os.path.join(log_dir, "metrics.json"), metrics_document(
                "completed", final={"icl_check_passed": self.check["passed"],
                                    "update_steps": self.update_steps},
                stage_a={"icl_check": self.check, "icl_curve": curve, "task": self.task,
                         "curves": self.curves, "steps": self.update_steps}))
            self.log_curve_figure("icl_curve", {"ICL": curve},
                                  "Stage A: ICL skill vs demonstrations")
        if self.export:
            save_atomic(self.base_record(), self.export)

    def base_record(self) -> dict[str, Any]:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"format": BASE_FORMAT, "arch": self.arch, "state_dict": state,
                "sha256": state_hash(state), "task": self.task, "icl_check": self.check,
                "steps": self.update_steps, "seed": self.seed}

    # -- checkpoint ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"curves": self.curves, "task": self.task}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.curves = list(state.get("curves", []))
        self.task = dict(state.get("task", {}))
