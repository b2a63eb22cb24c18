"""`StreamLearner`: the LightningModule base whose unit of work is `observe(x, y)`.

Contract (`docs/architecture.md`, "Contracts a learner implements"):
- `observe(x, y) -> (logits, loss)` on one mini-batch, test-then-train: the logits are the
  pre-update predictions, both detached; every backward through `manual_backward`.
- `training_step` only splits a chunk into mini-batches, calls `observe` on each and returns
  the chunk's pre-update predictions (the evaluator scores online accuracy from them).
- `batch_position` is the stream position of the first sample of the batch being observed
  (a count of samples seen, nothing more): what `shift_events()` report;
- `forward(x)` is the evaluation forward; `before_evaluation(final)` runs before each
  evaluation point; `shift_events()` and `expert_ids()` feed the evaluator's metrics.
The learner never sees segment ids or boundaries: task-free means task-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from . import metrics
from ._lightning_private import attached_trainer, count_optimizer_step, optimizer_step_hooks
from .models import build_model
from .seeding import seeded
from .streams.core import require_positive

UpdateHook = Callable[[int], None]
TestSet = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss: stopping beats silently corrupting the weights."""


class StreamLearner(pl.LightningModule):
    """Base class for learners on task-free streams.

    Args:
        input_shape: one sample's shape (C, H, W); the CLI links it from the stream.
        n_classes: output classes; linked from the stream.
        batch_size: mini-batch size B of `observe`; linked from the stream.
        backbone: a name from `adaptlab.models.MODELS` (`mlp`, `lenet`, `resnet18`).
        backbone_args: keyword arguments of that backbone (e.g. `{"hidden": [256]}`).
        seed: seeds the learner's own initialisation and random draws (None: 0; the CLI
            fills it from `seed_everything`).
        nonfinite: what a NaN/inf training loss does: `"raise"` (stop with a clear error,
            checked once per Lightning step) or `"skip"` (skip that update and count it in
            `skipped_updates`; costs one host sync per update).
    """

    presentation = "stream"
    """How the data module should present the stream: in order, or `"iid"` (Joint)."""

    fast_update = True
    """Allow `update` to bypass Lightning's hook dispatch when it would do nothing."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int] | None = None,
        n_classes: int | None = None,
        batch_size: int = 10,
        backbone: str = "mlp",
        backbone_args: dict[str, Any] | None = None,
        seed: int | None = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite: {nonfinite!r} is not 'raise' or 'skip'")
        if input_shape is None or n_classes is None:
            raise ValueError(
                "input_shape and n_classes: required (the CLI links them from the stream; "
                "in Python pass e.g. input_shape=stream.input_shape, n_classes=stream.n_classes)"
            )
        require_positive("batch_size", batch_size)
        self.automatic_optimization = False
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_classes = int(n_classes)
        self.batch_size = batch_size
        self.backbone = backbone
        self.backbone_args = dict(backbone_args or {})
        self.seed = 0 if seed is None else int(seed)
        self.nonfinite = nonfinite
        self.skipped_updates = 0
        self.observe_steps = 0
        self.samples_seen = 0
        self.batch_position = 0
        self.update_steps = 0
        self._update_hooks: list[UpdateHook] = []
        self._observe_hooks: list[UpdateHook] = []
        self._fast_update = False
        self._local_batch = batch_size

    # -- building blocks for subclasses -------------------------------------------------------
    @property
    def host_trainer(self) -> pl.Trainer | None:
        """The Trainer running this learner, or None (plain Python, or inside the Avalanche
        bridge's Fabric), where `self.trainer` would raise or give Fabric's shim."""
        return attached_trainer(self)

    def build_backbone(self, index: int = 0, n_classes: int | None = None) -> nn.Module:
        """A fresh backbone, initialised from (seed, index) without touching global RNGs."""
        with seeded(self.seed * 1_000_003 + index):
            return build_model(
                self.backbone, self.input_shape, n_classes or self.n_classes, **self.backbone_args
            )

    def update(
        self, optimizer: Any, loss: torch.Tensor, n: int = 1, clip: float | None = None
    ) -> None:
        """One optimizer update: zero, backward, update hooks, step.

        Goes through Lightning (`manual_backward`, `LightningOptimizer.step`) whenever that
        path could do something: another strategy or precision, or a callback or the learner
        overriding a backward/step hook. Otherwise (one device, fp32 or bf16 autocast, no
        such hooks) it calls the same operations directly: identical arithmetic without
        Lightning's per-call hook dispatch, which dominates on tiny online batches. Either
        way every update counts toward `trainer.global_step`. Under `StreamDDPStrategy`
        the gradients are averaged over processes, weighted by `n`, this process's number
        of samples in the loss. `clip` bounds the global gradient norm before the step.
        """
        if self.nonfinite == "skip" and not bool(torch.isfinite(loss)):
            self.skipped_updates += 1
            return
        if self._fast_update:
            _grads_to_none(optimizer)
            loss.backward()
            if clip is not None:
                _clip(optimizer, clip)
            for hook in self._update_hooks:
                hook(self.update_steps)
            if isinstance(optimizer, LightningOptimizer):
                before, after = optimizer_step_hooks(optimizer)
                before()
                optimizer.optimizer.step()
                after()
            else:
                optimizer.step()
                self._count_step()
        else:
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            trainer = self.host_trainer
            sync = getattr(trainer.strategy, "sync_grads", None) if trainer else None
            if sync is not None:
                sync([p for group in optimizer.param_groups for p in group["params"]], n)
            if clip is not None:
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None:  # fp16 AMP: clip the true gradients, not scaled ones
                    scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
                _clip(optimizer, clip)
            for hook in self._update_hooks:
                hook(self.update_steps)
            optimizer.step()
            if not isinstance(optimizer, LightningOptimizer):
                self._count_step()
        self.__dict__["update_steps"] += 1  # a plain int: see training_step

    def _count_step(self) -> None:
        """Count an update of an optimizer Lightning does not manage (e.g. created at run
        time) toward `global_step`, so step-based checkpointing works for every learner."""
        trainer = self.host_trainer
        if trainer is not None:
            count_optimizer_step(trainer)

    def _can_bypass_lightning(self) -> bool:
        """True when Lightning's backward/step path would add nothing but overhead."""
        from pytorch_lightning.plugins.precision import MixedPrecision, Precision
        from pytorch_lightning.profilers import PassThroughProfiler
        from pytorch_lightning.strategies import SingleDeviceStrategy
        from pytorch_lightning.utilities.model_helpers import is_overridden

        trainer = self.host_trainer
        if trainer is None or not self.fast_update:
            return False
        precision = trainer.precision_plugin
        plain_precision = type(precision) is Precision or (
            type(precision) is MixedPrecision and precision.scaler is None
        )
        hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
        hooked = any(
            is_overridden(h, cb, parent=pl.Callback) for cb in trainer.callbacks for h in hooks
        ) or any(is_overridden(h, self, parent=pl.LightningModule) for h in (*hooks, "backward"))
        return (
            type(trainer.strategy) is SingleDeviceStrategy
            and plain_precision
            and not hooked
            and isinstance(trainer.profiler, PassThroughProfiler)
        )

    def on_train_start(self) -> None:
        self._fast_update = self._can_bypass_lightning()
        # Under data parallelism each process observes its share of every mini-batch.
        self._local_batch = self.batch_size // max(1, self.trainer.world_size)

    # -- the contract -------------------------------------------------------------------------
    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Test-then-train on one mini-batch; returns detached pre-update logits and loss."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def before_evaluation(self, final: bool) -> None:
        """Called by the evaluator before each evaluation point (no training state change,
        except at `final=True`, after which no training follows)."""

    def shift_events(self) -> list[int]:
        """Stream positions where this learner's detectors fired (none by default)."""
        return []

    def expert_ids(self, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """Expert routing for expert learners; `None` for learners without experts."""
        return None

    def expert_logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of expert `k` alone, routing bypassed (expert learners override it)."""
        raise NotImplementedError(f"{type(self).__name__} has no experts")

    def check_labels(self, task_local: bool) -> None:
        """Expert learners (TAME) are built for task-local labels; say so once, in one line,
        when the stream's labels are global (class-incremental)."""
        if self.has_experts and not task_local:
            rank_zero_warn(
                f"{type(self).__name__} learns one expert per task and is meant for task-local "
                "labels (Split `labels: local`, its paper's protocol); with global labels every "
                "expert must also reject classes it never saw (Split-Digits: class-IL 0.59 vs "
                "0.95); its acc_class_il is the number to compare"
            )

    @property
    def has_experts(self) -> bool:
        """Whether this learner routes inputs to experts (it overrides `expert_ids`)."""
        return type(self).expert_ids is not StreamLearner.expert_ids

    def add_update_hook(self, fn: UpdateHook) -> None:
        """Register `fn(step)`, called before every optimizer update inside `observe`."""
        self._update_hooks.append(fn)

    def add_observe_hook(self, fn: UpdateHook) -> None:
        """Register `fn(step)`, called before every `observe` (before its forward pass) with
        the completed optimizer steps, so per-step interventions stay on time however many
        mini-batches a Lightning step carries."""
        self._observe_hooks.append(fn)

    def model_size_modules(self) -> list[nn.Module]:
        """What counts toward model size (default: the whole learner)."""
        return [self]

    def learner_summary(
        self, segments: Sequence[int], test_set: TestSet, events: metrics.OnlineEvents
    ) -> dict[str, Any]:
        """This learner's own end-of-run metrics, `final.learner` in `metrics.json`
        (`metrics.EXPERT_METRICS`); all null for learners without experts.

        The evaluator knows no method: a learner that routes to experts (it overrides
        `expert_ids`) gets task-inferred, task-oracle, class-IL and selector accuracy here. An
        expert "belongs" to the segment it was active on most during training, and a
        segment's own expert is the one most active on it; test inputs are routed as
        `forward` routes them (`expert_ids(x)`). `test_set(id)` gives a segment's held-out
        `(x, y)`; `events` are the run's online events, in stream order.
        """
        out: dict[str, Any] = dict.fromkeys(metrics.EXPERT_METRICS)
        active = self.expert_ids()
        if active is None or len(events) == 0:
            return out
        active = np.asarray(active.cpu() if torch.is_tensor(active) else active)[: len(events)]
        segment_of, expert_of = {}, {}
        for k in np.unique(active):
            segs, counts = np.unique(events.seg[active == k], return_counts=True)
            segment_of[int(k)] = int(segs[np.argmax(counts)])
        for s in np.unique(events.seg):
            ks, counts = np.unique(active[events.seg == s], return_counts=True)
            expert_of[int(s)] = int(ks[np.argmax(counts)])
        inferred, oracle, class_il, selector = [], [], [], []
        was = self.training
        self.eval()
        with torch.no_grad():
            for seg in segments:
                x, y = test_set(seg)
                x, y = x.to(self.device), y.to(self.device)
                routed = self.expert_ids(x).cpu().numpy()
                ok = (self(x).argmax(-1) == y).cpu().numpy()
                right_expert = np.array([segment_of.get(int(r), -1) == seg for r in routed])
                own = self.expert_logits(x, expert_of[seg]) if seg in expert_of else None
                inferred.append(ok.mean())
                oracle.append(float("nan") if own is None else
                              (own.argmax(-1) == y).float().mean().item())
                selector.append(right_expert.mean())
                class_il.append((ok & right_expert).mean())
        self.train(was)
        out.update(acc_task_inferred=float(np.mean(inferred)),
                   acc_task_oracle=None if np.isnan(oracle).any() else float(np.mean(oracle)),
                   acc_class_il=float(np.mean(class_il)), selector_acc=float(np.mean(selector)),
                   n_experts=len(np.unique(active)))
        return out

    # -- Lightning plumbing -------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict:
        x, y = batch
        b = self._local_batch
        pairs = [(x, y)] if len(x) <= b else list(zip(x.split(b), y.split(b)))
        sizes = self._global_sizes([len(xb) for xb, _ in pairs])
        outs, losses = [], []
        for (xb, yb), n in zip(pairs, sizes):
            logits, loss = self.observe_counted(xb, yb, n)
            outs.append(logits)
            if loss is not None:
                losses.append(loss)
        self.check_losses(losses)
        logits = outs[0] if len(outs) == 1 else torch.cat(outs)
        return {"preds": logits.argmax(-1)}

    def observe_counted(
        self, x: torch.Tensor, y: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One `observe` with its bookkeeping: `batch_position`, the observe hooks, then
        `samples_seen += n` (stream samples in the batch, all processes) and `observe_steps`.
        Every loop that drives a learner (Lightning's `training_step`, the Avalanche
        bridge) goes through here, so the counters cannot differ by loop."""
        # Counters are plain ints in the instance dict: nn.Module.__setattr__ costs ~1.5 µs a
        # call, a measurable share of an online step on a tiny model.
        state = self.__dict__
        state["batch_position"] = state["samples_seen"]
        for hook in self._observe_hooks:
            hook(state["update_steps"])
        logits, loss = self.observe(x, y)
        state["samples_seen"] += n
        state["observe_steps"] += 1
        return logits, loss

    def check_losses(self, losses: list[torch.Tensor]) -> None:
        """Raise `NonFiniteLossError` if any of these `observe` losses is NaN or infinite
        (with `nonfinite: raise`); one host sync for the lot, so loops call it per chunk."""
        if losses and self.nonfinite == "raise":
            self._check_finite(losses[0] if len(losses) == 1 else torch.stack(losses))

    def global_mean(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """`t` (a mean over this process's `n` samples) as the mean over the whole
        mini-batch under data parallelism; unchanged in one process."""
        trainer = self.host_trainer
        strategy = trainer.strategy if trainer is not None else None
        fn = getattr(strategy, "weighted_mean", None)
        return t if fn is None else fn(t, n)

    def gather_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The whole mini-batch on every process (for state every rank must hold alike, such
        as memories); unchanged in one process."""
        trainer = self.host_trainer
        strategy = trainer.strategy if trainer is not None else None
        fn = getattr(strategy, "gather_batch", None)
        return tensors if fn is None else tuple(fn(t) for t in tensors)

    def local_share(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This process's contiguous part of tensors every process holds alike (the inverse
        of `gather_batch`); unchanged in one process."""
        trainer = self.host_trainer
        if trainer is None or trainer.world_size == 1:
            return tensors
        world, rank = trainer.world_size, trainer.global_rank
        return tuple(t.tensor_split(world)[rank] for t in tensors)

    def _global_sizes(self, local: list[int]) -> list[int]:
        """Mini-batch sizes over all processes (under DDP each holds a share of a batch), so
        `batch_position` counts stream samples: what task-free detectors report against."""
        trainer = self.host_trainer
        if trainer is None or trainer.world_size == 1:
            return local
        total = trainer.strategy.all_sum(torch.tensor(local, device=self.device))
        return [int(v) for v in total.tolist()]

    def _check_finite(self, losses: torch.Tensor) -> None:
        # One check per Lightning step (not per observe): a host sync per chunk at most.
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteLossError(
                f"training loss became {losses[~torch.isfinite(losses)][0].item()} at observe "
                f"step {self.observe_steps}: lower the learning rate, or set "
                "`nonfinite: skip` to skip such updates; on an unlabelled (TTA) stream use a "
                "learner that does not need labels"
            )

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int,
                   stage: str) -> None:
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log(f"{stage}/acc_exp{dataloader_idx:03d}", acc, add_dataloader_idx=False,
                 batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Predicted classes (and, for expert learners, the expert each input is routed to)
        with the true labels, for one batch of a segment's test set."""
        x, y = batch
        out = {"preds": self(x).argmax(-1), "labels": y}
        experts = self.expert_ids(x)
        if experts is not None:
            out["experts"] = experts
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["adaptlab_learner"] = {
            "class": type(self).__qualname__,
            "observe_steps": self.observe_steps,
            "update_steps": self.update_steps,
            "samples_seen": self.samples_seen,
            "skipped_updates": self.skipped_updates,
            **self.extra_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("adaptlab_learner")
        if state is None:
            raise ValueError("checkpoint: not written by an adaptlab StreamLearner")
        if state["class"] != type(self).__qualname__:
            raise ValueError(
                f"checkpoint: written by learner {state['class']}, not {type(self).__qualname__}; "
                "resume with the config that wrote it"
            )
        self.observe_steps = int(state["observe_steps"])
        self.update_steps = int(state["update_steps"])
        self.samples_seen = int(state.get("samples_seen", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor learner state for the checkpoint (counters, RNG states)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""


def _grads_to_none(optimizer: Any) -> None:
    """`optimizer.zero_grad(set_to_none=True)`: for a torch optimizer that keeps the base
    `zero_grad`, the same loop without its profiler record and dynamo guard (~8 µs a call, a
    visible share of an online step on a tiny model)."""
    opt = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    if type(opt).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _clip(optimizer: Any, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def warmup_cosine(step: int, warmup: int, total: int | None) -> float:
    """The lr factor at optimizer step `step`: linear warm-up, then cosine decay to 0 at
    `total` (constant after warm-up when `total` is None or not after `warmup`)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not total or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * frac))


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(
    name: str, params: Any, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """The optimizers configs may name; a clear error for anything else."""
    if lr <= 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}; choose one of {OPTIMIZERS}")
