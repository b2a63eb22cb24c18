"""Forgetting regimes: reset the token embeddings on a schedule (`docs/methods/forgetting.md`).

- **active** (Chen et al. 2023): reset every k optimizer steps, for the whole run;
- **temporary** (Anand et al. 2024): reset at k, 2k, … < N, then train normally — the model
  keeps the in-context circuit that resets forced and re-learns in-weights solutions;
- **probabilistic** (Anand et al., fine-tuning): while step < N, each token id of a batch is,
  with probability p, replaced by a random vector for that one step, and the table is frozen;
- **re-armed** (adaptlab extension): after a stream shift at t0, resets again at t0 + jk,
  while < t0 + N_rearm; the shift is a known segment change or one found by `ShiftDetector`.

The schedule and the reset live once in `ForgettingCore`, the per-token replacement in
`TokenReplacement` (torch only, no Lightning); `EmbeddingForgetting` and
`ProbabilisticEmbeddingForgetting` are thin Lightning callbacks around them, and an Avalanche
plugin can drive the same cores (`pending`/`reset`/`episode_factor`/`rearm`;
`before_forward`/`after_backward`/`before_optimizer_step`/`restore`).

Resets write fresh values *into* the existing tensor: the optimizer and a tied head hold
references to it, so a new `Parameter` would silently detach them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from adaptlab.detect import ShiftDetector
from adaptlab.oracle import SegmentChange, segment_span

REGIMES = ("none", "active", "temporary")
INITS = ("init_std", "module_default", "matched")
OPTIMIZER_STATE = ("embedding", "all", "none")
LR_SCHEDULES = ("constant", "episode")
REARM_ON = ("none", "segment", "detected")
SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def find_model(module: nn.Module) -> nn.Module:
    """The (sub)module exposing `get_input_embeddings()`: the learner itself or its model."""
    for m in module.modules():
        if callable(getattr(m, "get_input_embeddings", None)):
            return m
    raise ValueError(
        f"forgetting: {type(module).__name__} has no module with get_input_embeddings(); "
        "forgetting regimes reset a token embedding (use a TinyGPT-based learner)"
    )


def _raw_optimizer(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)


def _group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, Any] | None:
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    return None


class ForgettingCore:
    """The regime logic, framework-free: when to reset, and the in-place reset.

    Args:
        regime: `none`, `active` or `temporary`.
        every_k: k, optimizer steps between resets.
        stop_after: N; resets only at steps < N (`temporary`: None means 12000; N must
            exceed k; `active` requires None).
        init: `init_std` (N(0, σ²), σ = `init_std` or the model's `initializer_range`),
            `module_default` (N(0, 1), what `nn.Embedding.reset_parameters` draws) or
            `matched` (N(mean, std) of the rows before the reset).
        init_std: σ for `init_std` (default: the model's `initializer_range`, else 0.02).
        reset_output_head: for an untied head, redraw its weight too (its bias never).
        keep_ids: rows left untouched; the padding row is always re-zeroed.
        optimizer_state: after a reset clear the `embedding`'s state (default), `all`, or `none`.
        emb_lr_schedule: `constant`, or `episode` (the embedding group's lr warms up over
            `episode_warmup` of each episode and decays linearly to 0 at the next reset).
        episode_warmup: share of an episode spent warming up under `episode`.
        rearm_on: `none`, `segment` (a known segment change) or `detected` (`ShiftDetector`).
        rearm_stop_after: N_rearm, the window after a shift (default: N, else 10 k).
        seed: seeds the reset draws (fp32 on the CPU, so every device and rank agrees).
    """

    def __init__(
        self,
        regime: str = "temporary",
        every_k: int = 1000,
        stop_after: int | None = None,
        init: str = "init_std",
        init_std: float | None = None,
        reset_output_head: bool = True,
        keep_ids: Sequence[int] = (),
        optimizer_state: str = "embedding",
        emb_lr_schedule: str = "constant",
        episode_warmup: float = 0.1,
        rearm_on: str = "none",
        rearm_stop_after: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, val, allowed in (("regime", regime, REGIMES), ("init", init, INITS),
                                   ("optimizer_state", optimizer_state, OPTIMIZER_STATE),
                                   ("emb_lr_schedule", emb_lr_schedule, LR_SCHEDULES),
                                   ("rearm_on", rearm_on, REARM_ON)):
            if val not in allowed:
                raise ValueError(f"forgetting.{name}: {val!r} is not one of {allowed}")
        if not isinstance(every_k, int) or every_k < 1:
            raise ValueError(f"forgetting.every_k: must be a positive integer, got {every_k!r}")
        if stop_after is None and regime == "temporary":
            stop_after = 12000
        if regime == "active" and stop_after is not None:
            raise ValueError("forgetting.stop_after: must be null under regime 'active' "
                             "(use regime 'temporary' for a window)")
        if regime == "temporary" and (stop_after is None or stop_after <= every_k):
            raise ValueError(
                f"forgetting.stop_after: regime 'temporary' resets at k, 2k, … < N, so N must "
                f"exceed k = {every_k}; got N = {stop_after!r}"
            )
        if not 0 <= episode_warmup < 1:
            raise ValueError(f"forgetting.episode_warmup: must be in [0, 1), got {episode_warmup}")
        self.regime, self.k, self.N = regime, every_k, stop_after
        self.init, self.init_std = init, init_std
        self.reset_output_head, self.keep_ids = reset_output_head, [int(i) for i in keep_ids]
        self.optimizer_state, self.emb_lr_schedule = optimizer_state, emb_lr_schedule
        self.episode_warmup = episode_warmup
        self.rearm_on = rearm_on
        self.N_rearm = rearm_stop_after or stop_after or 10 * every_k
        self.seed = seed
        self.generator = torch.Generator().manual_seed(int(seed))
        self.reset_steps: list[int] = []
        self.rearm_steps: list[int] = []
        self.last_checked = 0
        self.model: nn.Module | None = None
        self.emb: nn.Embedding | None = None
        self.head: nn.Module | None = None
        self.tied = False
        self._warned_default = False

    # -- the schedule -------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """Is a reset due after `step` completed optimizer steps?"""
        if step <= 0:
            return False
        due = False
        if self.regime == "active":
            due = step % self.k == 0
        elif self.regime == "temporary":
            due = step % self.k == 0 and step < self.N
        for t0 in self.rearm_steps:
            if step > t0 and (step - t0) % self.k == 0 and step < t0 + self.N_rearm:
                due = True
        return due

    def pending(self, step: int) -> int | None:
        """The latest due step in (last checked, step] not applied yet (one reset covers all)."""
        due = None
        for s in range(max(self.last_checked + 1, 1), step + 1):
            if self.is_due(s) and s not in self.reset_steps:
                due = s
        self.last_checked = max(self.last_checked, step)
        return due

    def window(self) -> int | None:
        """N, the end of the forgetting window (temporary), else None."""
        return self.N if self.regime == "temporary" else None

    def episode_factor(self, step: int) -> float:
        """The embedding lr factor under `episode` (1 under `constant`, or between episodes)."""
        if self.emb_lr_schedule == "constant":
            return 1.0
        start = max([s for s in self.reset_steps if s <= step], default=0)
        # the episode [start, start + k) is scheduled only if it ends in a reset
        if not self.is_due(start + self.k) and not (start == 0 and self.is_due(self.k)):
            return 1.0
        progress = (step - start) / self.k
        if progress < self.episode_warmup:
            return (progress + 1.0 / self.k) / self.episode_warmup
        return max(0.0, (1.0 - progress) / (1.0 - self.episode_warmup))

    def rearm(self, step: int) -> None:
        """Open a new forgetting window at `step` (a shift)."""
        if self.rearm_on != "none" and step not in self.rearm_steps:
            self.rearm_steps.append(int(step))

    # -- binding and the reset ----------------------------------------------------------------
    def bind(self, model: nn.Module, optimizer: Any | None = None) -> None:
        """Find and check the token table (and head); check the optimizer if given."""
        emb = model.get_input_embeddings()
        pos_fn = getattr(model, "get_position_embeddings", None)
        if callable(pos_fn) and emb is pos_fn():
            raise ValueError("forgetting: the target is the positional table; positions are "
                             "never reset (get_input_embeddings must return the token table)")
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"forgetting: the token table must be an nn.Embedding, got "
                             f"{type(emb).__name__}")
        head_fn = getattr(model, "get_output_embeddings", None)
        head = head_fn() if callable(head_fn) else None
        vocab = getattr(model, "vocab_size", None) or (
            head.weight.shape[0] if head is not None else emb.num_embeddings)
        if emb.num_embeddings != vocab:
            raise ValueError(f"forgetting: the token table has {emb.num_embeddings} rows, not the "
                             f"vocabulary size {vocab}")
        self.model, self.emb, self.head = model, emb, head
        self.tied = head is not None and head.weight is emb.weight
        if optimizer is not None:
            self.check_optimizer(optimizer)

    def check_optimizer(self, optimizer: Any) -> None:
        opt = _raw_optimizer(optimizer)
        if not isinstance(opt, SUPPORTED_OPTIMIZERS):
            raise ValueError(f"forgetting: optimizer {type(opt).__name__} is not supported "
                             f"(use Adam, AdamW or SGD: their state can be cleared per parameter)")
        group = _group_of(opt, self.emb.weight)
        if group is None:
            raise ValueError("forgetting: the token embedding is not in the optimizer's "
                             "param_groups (it would never be trained after a reset)")
        if self.emb_lr_schedule == "episode" and len(group["params"]) > 1:
            raise ValueError("forgetting.emb_lr_schedule 'episode' needs the token table in its "
                             "own optimizer param group (the learner's `embedding` group); it "
                             "shares one with other parameters")

    def sigma(self) -> float:
        if self.init_std is not None:
            return float(self.init_std)
        return float(getattr(self.model, "initializer_range", 0.02))

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape)
        z = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        if self.init == "init_std":
            return z * self.sigma()
        if self.init == "module_default":
            if not self._warned_default:
                warnings.warn("forgetting.init 'module_default' draws N(0, 1), 50x the 0.02 "
                              "init of GPT-style models", stacklevel=2)
                self._warned_default = True
            return z
        rows = like.detach().float().cpu()
        keep = torch.ones(len(rows), dtype=torch.bool)
        pad = getattr(self.emb, "padding_idx", None)
        if pad is not None:
            keep[pad] = False
        return rows[keep].mean() + rows[keep].std() * z

    @torch.no_grad()
    def reset(self, step: int, optimizer: Any | None = None) -> dict[str, float]:
        """Redraw the token table in place (tied head follows); clear optimizer state."""
        if self.emb is None:
            raise RuntimeError("ForgettingCore.reset: call bind(model) first")
        w = self.emb.weight
        before = float(w.detach().float().norm(dim=1).mean())
        new = self._draw(w)
        keep = [i for i in self.keep_ids if 0 <= i < len(w)]
        if keep:
            new[keep] = w[keep].detach().float().cpu()
        w.copy_(new.to(device=w.device, dtype=w.dtype))
        pad = self.emb.padding_idx
        if pad is not None:
            w[pad].zero_()
        reset_head = (self.head is not None and not self.tied and self.reset_output_head)
        if reset_head:
            hw = self.head.weight
            hw.copy_(self._draw(hw).to(device=hw.device, dtype=hw.dtype))
        if optimizer is not None:
            opt = _raw_optimizer(optimizer)
            targets = [w] + ([self.head.weight] if reset_head else [])
            if self.optimizer_state == "all":
                targets = [p for g in opt.param_groups for p in g["params"]]
            if self.optimizer_state != "none":
                for p in targets:
                    opt.state.pop(p, None)
            if _group_of(opt, w) is None:
                raise RuntimeError("forgetting: the token table left the optimizer after a reset")
        if self.tied and self.head.weight is not w:
            raise RuntimeError("forgetting: the head is no longer tied to the token table")
        self.reset_steps.append(int(step))
        return {"emb_norm_before": before,
                "emb_norm_after": float(w.detach().float().norm(dim=1).mean())}

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reset_steps": list(self.reset_steps), "rearm_steps": list(self.rearm_steps),
                "last_checked": self.last_checked, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_steps = [int(s) for s in state["reset_steps"]]
        self.rearm_steps = [int(s) for s in state["rearm_steps"]]
        self.last_checked = int(state["last_checked"])
        self.generator.set_state(state["generator"])


def _step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """Completed optimizer steps: a StreamLearner's own count, else the trainer's."""
    steps = getattr(pl_module, "update_steps", None)
    return int(steps) if isinstance(steps, int) else int(trainer.global_step)


def _vocab_groups(trainer: pl.Trainer) -> dict[str, list[int]]:
    stream = getattr(getattr(trainer, "datamodule", None), "stream", None)
    params = getattr(stream, "params", None)
    return dict(params.get("vocab") or {}) if isinstance(params, dict) else {}


def _log(trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
    if trainer.logger is not None and trainer.is_global_zero:
        trainer.logger.log_metrics(values, step=step)


LogFn = Callable[[dict[str, float], int], None]
"""`log(values, step)`: where a regime's scalars go (a Trainer's logger, Avalanche's
evaluation plugin)."""


def _log_fn(trainer: pl.Trainer) -> LogFn:
    return lambda values, step: _log(trainer, values, step)


class EmbeddingForgetting(pl.Callback):
    """Reset the token embeddings under a regime (`none` / `active` / `temporary`).

    The reset due after step s is applied before the next forward pass: through the
    learner's observe hook (`StreamLearner.add_observe_hook`), so it lands exactly at s
    whatever `batches_per_step` is; for other modules in `on_train_batch_start`. Options are
    those of `ForgettingCore`, plus:

    Args:
        log_every: optimizer steps between `forgetting/emb_norm/*` logs (and at each reset).
        detector: the `ShiftDetector` options for `rearm_on: detected`.
        detector_cooldown: steps after a reset during which the detector is not fed (the
            loss spike of a reset must never re-arm).
    """

    def __init__(
        self,
        regime: str = "temporary",
        every_k: int = 1000,
        stop_after: int | None = None,
        init: str = "init_std",
        init_std: float | None = None,
        reset_output_head: bool = True,
        keep_ids: list[int] | None = None,
        optimizer_state: str = "embedding",
        emb_lr_schedule: str = "constant",
        episode_warmup: float = 0.1,
        rearm_on: str = "none",
        rearm_stop_after: int | None = None,
        seed: int = 0,
        log_every: int = 100,
        detector: dict[str, Any] | None = None,
        detector_cooldown: int | None = None,
    ) -> None:
        self.core = ForgettingCore(regime, every_k, stop_after, init, init_std, reset_output_head,
                                   keep_ids or (), optimizer_state, emb_lr_schedule,
                                   episode_warmup, rearm_on, rearm_stop_after, seed)
        self.log_every = log_every
        self.detector = ShiftDetector(**(detector or {})) if rearm_on == "detected" else None
        self.detector_cooldown = every_k // 2 if detector_cooldown is None else detector_cooldown
        self._segment = SegmentChange()
        self._restart_detector = False
        self._groups: dict[str, list[int]] = {}
        self._hooked_module: pl.LightningModule | None = None
        self._last_norm_log = -1

    # public views for figures and tests
    @property
    def reset_steps(self) -> list[int]:
        return self.core.reset_steps

    @property
    def rearm_steps(self) -> list[int]:
        return self.core.rearm_steps

    def window(self) -> int | None:
        return self.core.window()

    def name(self) -> str:
        """`<regime>-k<k>-N<N>` for run names."""
        return f"{self.core.regime}-k{self.core.k}-N{self.core.N}"

    per_token = False
    """Driven per step (`ForgettingCore`), not per token: what the Avalanche plugin reads."""

    def bind_without_trainer(self, model: nn.Module, optimizer: Any | None) -> None:
        """Bind to the embedding inside `model` when no Trainer runs (the Avalanche plugin)."""
        self.core.bind(find_model(model), optimizer)

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.core.bind(find_model(pl_module))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.bind(find_model(pl_module), trainer.optimizers[0] if trainer.optimizers
                       else None)
        if len(trainer.optimizers) > 1:
            raise ValueError("forgetting: one optimizer expected")
        self._groups = _vocab_groups(trainer)
        if callable(getattr(pl_module, "add_observe_hook", None)):
            if self._hooked_module is not pl_module:
                pl_module.add_observe_hook(lambda step: self._before_step(trainer, step))
                self._hooked_module = pl_module
        per_chunk = getattr(getattr(trainer, "datamodule", None), "batches_per_step", 1)
        if self.core.regime != "none" and per_chunk > 1 and self._hooked_module is None:
            warnings.warn(f"forgetting: data.batches_per_step is {per_chunk}, so a reset waits "
                          "for the next chunk (up to that many steps late); set it to 1 for "
                          "resets exactly at k, 2k, …", stacklevel=2)
        for cb in trainer.callbacks:
            if "swa" in type(cb).__name__.lower() or "ema" in type(cb).__name__.lower():
                warnings.warn(f"forgetting: {type(cb).__name__} keeps averaged copies of the "
                              "embedding that resets do not touch", stacklevel=2)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = _step(trainer, pl_module)
        if self.core.rearm_on == "segment":
            span = segment_span(getattr(trainer, "datamodule", None))
            self.check_segment(step, None if span is None else span[0], _log_fn(trainer))
        if self._hooked_module is not pl_module:  # else the observe hook applies it
            self._before_step(trainer, step)

    def _before_step(self, trainer: pl.Trainer, step: int) -> None:
        self.apply_due(step, trainer.optimizers[0] if trainer.optimizers else None,
                       _log_fn(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.detector is None:
            return
        loss = getattr(pl_module, "last_loss", None)
        if loss is None and isinstance(outputs, dict):
            loss = outputs.get("loss")
        self.observe_loss(_step(trainer, pl_module), loss, _log_fn(trainer))

    # -- the regime without a Trainer (the hooks above and the Avalanche plugin call these) ---
    def apply_due(self, step: int, optimizer: Any | None, log: LogFn) -> None:
        """Apply the reset due at `step` (before the forward pass) and the episode lr."""
        due = self.core.pending(step)
        if due is not None:
            norms = self.core.reset(due, optimizer)
            if self.detector is not None and self.detector.n_channels:
                self.detector.reset_channel(0)
            log({"forgetting/reset": 1.0,
                 "forgetting/emb_norm_before_reset": norms["emb_norm_before"]}, step)
            self._log_norms(log, step)
        elif self.log_every and step % self.log_every == 0 and step != self._last_norm_log:
            self._log_norms(log, step)
        if self.core.emb_lr_schedule == "episode" and optimizer is not None:
            group = _group_of(_raw_optimizer(optimizer), self.core.emb.weight)
            factor = self.core.episode_factor(step)
            if group.get("managed_lr"):
                group["lr_factor"] = factor  # the learner multiplies it in before each update
            else:
                group["lr"] = group.setdefault("forgetting_base_lr", group["lr"]) * factor

    def observe_loss(self, step: int, loss: torch.Tensor | None, log: LogFn) -> None:
        """Feed step `step`'s training loss to the detector (`rearm_on: detected`); a firing
        re-arms the schedule. Losses within `detector_cooldown` steps of a reset are not fed."""
        if self.detector is None:
            return
        last = max(self.core.reset_steps, default=-10**9)
        if step - last < self.detector_cooldown:
            self._restart_detector = True
            return
        if loss is None:
            return
        if self._restart_detector and self.detector.n_channels:
            # the window must not hold pre-reset losses: the post-reset level is the baseline
            self.detector.reset_channel(0, float(loss))
        self._restart_detector = False
        if self.detector.update(loss.detach().float().cpu()):
            self.core.rearm(step)
            log({"forgetting/rearm": 1.0}, step)

    def check_segment(self, step: int, segment: int | None, log: LogFn) -> None:
        """`rearm_on: segment` (an oracle): re-arm when the true segment of the chunk's first
        sample differs from the previous chunk's (`adaptlab.oracle.SegmentChange`)."""
        if segment is not None and self._segment.update(segment):
            self.core.rearm(step)
            log({"forgetting/rearm": 1.0}, step)

    @torch.no_grad()
    def _log_norms(self, log: LogFn, step: int) -> None:
        self._last_norm_log = step
        w = self.core.emb.weight.detach().float()
        norms = w.norm(dim=1)
        vals = {"forgetting/emb_norm/all": float(norms.mean())}
        for name in ("items", "holdout", "labels"):
            lo_hi = self._groups.get(name)
            if lo_hi:
                vals[f"forgetting/emb_norm/{name}"] = float(norms[lo_hi[0]:lo_hi[1]].mean())
        log(vals, step)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"core": self.core.state_dict(), "segment": self._segment.last,
                 "restart_detector": self._restart_detector}
        if self.detector is not None:
            state["detector"] = self.detector.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict["core"])
        self._segment.last = state_dict.get("segment")
        self._restart_detector = bool(state_dict.get("restart_detector", False))
        if self.detector is not None and "detector" in state_dict:
            self.detector.load_state_dict(state_dict["detector"])


class TokenReplacement:
    """Probabilistic forgetting, framework-free (Anand et al., spec §4).

    While step < N, each distinct input id (excluded ids aside) is, with probability p,
    replaced in place by a N(0, σ²) row for one step (`before_forward`); `after_backward`
    restores the rows and, with `freeze`, drops the table's gradient (`grad = None`: AdamW
    then skips it, neither decay nor stale moments, where a zero gradient would still apply
    both). Tied head rows follow the table; an untied head gets the same replacement with
    `also_output_head`. Restores are idempotent.
    """

    def __init__(self, p: float = 0.1, stop_after: int = 2000, sigma: float | None = None,
                 exclude_ids: Sequence[int] = (), freeze: bool = True,
                 also_output_head: bool = False, seed: int = 0) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"forgetting.p: must be in [0, 1], got {p!r}")
        if not isinstance(stop_after, int) or stop_after < 0:
            raise ValueError(f"forgetting.stop_after: must be an integer >= 0, got {stop_after!r}")
        self.p, self.N, self.sigma = p, stop_after, sigma
        self.exclude = torch.tensor(sorted({int(i) for i in exclude_ids}), dtype=torch.long)
        self.freeze, self.also_output_head = freeze, also_output_head
        self.generator = torch.Generator().manual_seed(int(seed))
        self.emb: nn.Embedding | None = None
        self.head: nn.Module | None = None
        self.tied = False
        self.in_window = False
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def bind(self, model: nn.Module, optimizer: Any | None = None) -> None:
        core = ForgettingCore("none")
        core.bind(model, optimizer)
        self.emb, self.head, self.tied = core.emb, core.head, core.tied
        if self.sigma is None:
            self.sigma = float(getattr(model, "initializer_range", 0.02))

    @property
    def pending(self) -> bool:
        return bool(self._saved)

    @torch.no_grad()
    def before_forward(self, step: int, input_ids: torch.Tensor) -> float:
        """Replace the sampled rows; returns the replaced share of the vocabulary."""
        self.restore()
        self.in_window = step < self.N
        if not self.in_window or self.p == 0:
            return 0.0
        ids = torch.unique(input_ids.detach().cpu())
        ids = ids[~torch.isin(ids, self.exclude)]
        pick = ids[torch.rand(len(ids), generator=self.generator) < self.p]
        if len(pick):
            targets = [self.emb.weight]
            if self.also_output_head and self.head is not None and not self.tied:
                targets.append(self.head.weight)
            for w in targets:
                idx = pick.to(w.device)
                new = torch.randn(len(pick), w.shape[1], generator=self.generator) * self.sigma
                self._saved.append((w, idx, w[idx].clone()))
                w[idx] = new.to(device=w.device, dtype=w.dtype)
        return len(pick) / self.emb.num_embeddings

    @torch.no_grad()
    def restore(self) -> None:
        """Put the replaced rows back (idempotent)."""
        for w, idx, rows in reversed(self._saved):
            w[idx] = rows
        self._saved = []

    def after_backward(self) -> None:
        swapped = [(w, idx) for w, idx, _ in self._saved]
        self.restore()
        if not self.in_window:
            return
        if self.freeze:
            self.emb.weight.grad = None
        else:  # weaker: only the swapped rows' gradients
            for w, idx in swapped:
                if w.grad is not None:
                    w.grad[idx] = 0

    def before_optimizer_step(self) -> None:
        if self.in_window and self.freeze:
            self.emb.weight.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class ProbabilisticEmbeddingForgetting(pl.Callback):
    """Per-step, per-token forgetting for fine-tuning: `TokenReplacement` as a callback.

    Args:
        p: replacement probability per distinct id and step.
        stop_after: N.
        sigma: std of the replacement rows (default: the model's `initializer_range`).
        exclude_ids: ids never replaced (default: the stream's specials, else the pad row).
        freeze_embeddings: drop the table's gradient in the window (else only the swapped
            rows' gradient is zeroed, which is weaker).
        also_output_head: an untied head gets the same row replacement.
        seed: the Bernoulli draws and replacement values.
    """

    def __init__(
        self,
        p: float = 0.1,
        stop_after: int = 2000,
        sigma: float | None = None,
        exclude_ids: list[int] | None = None,
        freeze_embeddings: bool = True,
        also_output_head: bool = False,
        seed: int = 0,
    ) -> None:
        self.core = TokenReplacement(p, stop_after, sigma, exclude_ids or (), freeze_embeddings,
                                     also_output_head, seed)
        self.exclude_ids = exclude_ids
        self._hooked = False

    per_token = True
    """Driven per token (`TokenReplacement`): what the Avalanche plugin reads."""

    def bind_without_trainer(self, model: nn.Module, optimizer: Any | None) -> None:
        """Bind to the embedding inside `model` when no Trainer runs (the Avalanche plugin):
        without a stream's vocabulary groups, only the pad row is never replaced."""
        self.core.bind(find_model(model), optimizer)
        if self.exclude_ids is None:
            pad = self.core.emb.padding_idx
            self.core.exclude = torch.tensor([] if pad is None else [pad], dtype=torch.long)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.bind(find_model(pl_module), trainer.optimizers[0] if trainer.optimizers
                       else None)
        if self.exclude_ids is None:
            specials = _vocab_groups(trainer).get("specials")
            exclude = list(range(*specials)) if specials else []
            if self.core.emb.padding_idx is not None:
                exclude.append(self.core.emb.padding_idx)
            self.core.exclude = torch.tensor(sorted(set(exclude)), dtype=torch.long)
        dm = getattr(trainer, "datamodule", None)
        if getattr(dm, "batches_per_step", 1) != 1:
            raise ValueError("ProbabilisticEmbeddingForgetting: data.batches_per_step must be 1 "
                             "(rows are replaced per optimizer step)")
        if hasattr(pl_module, "add_update_hook") and not self._hooked:
            pl_module.add_update_hook(lambda step: self.core.after_backward())
            self._hooked = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        step = _step(trainer, pl_module)
        share = self.core.before_forward(step, x)
        if self.core.in_window:
            _log(trainer, {"forgetting/replaced_fraction": share}, step)

    # automatic-optimization modules (no update hook): the same two moments
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._hooked:
            self.core.after_backward()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if not self._hooked:
            self.core.before_optimizer_step()

    def on_train_batch_end(self, *args: Any) -> None:
        self.core.restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.core.restore()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core.pending:
            raise RuntimeError("forgetting: replaced embedding rows still pending at validation")

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)


def default_run_name(cb: EmbeddingForgetting | None, seed: int) -> str:
    """`<regime>-k<k>-N<N>-s<seed>` (spec §8); `none-s<seed>` without a regime."""
    if cb is None or cb.core.regime == "none":
        return f"none-s{seed}"
    return f"{cb.name()}-s{seed}"


__all__ = ["ForgettingCore", "TokenReplacement", "EmbeddingForgetting",
           "ProbabilisticEmbeddingForgetting", "find_model", "default_run_name"]
