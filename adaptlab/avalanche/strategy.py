"""`StreamLearnerStrategy`: any adaptlab `StreamLearner` as an Avalanche `SupervisedTemplate`,
hosted in a Lightning `Fabric` (no Trainer), one Avalanche iteration per `observe`."""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from torch import nn

from .._lightning_private import fabric_optimizers
from ..jsonio import to_jsonable
from ..learner import StreamLearner
from .metrics import SegmentMatrixMetrics, segment_matrix_metrics


class IncompatiblePluginError(ValueError):
    """A plugin that would leak experience boundaries to a task-free learner, or that reads
    `mb_output` as a training output the learner does not produce."""



class _ClockLogger(FabricTensorBoardLogger):
    """Fabric gives `self.log` no step: stamp Avalanche's `clock.train_iterations` (which
    equals the learner's `observe_steps`), so curves overlay the Lightning ones."""

    def __init__(self, log_dir: str, clock: Any) -> None:
        super().__init__(root_dir=log_dir, name="", version="", default_hp_metric=False)
        self._clock = clock

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        clock = self._clock()
        super().log_metrics(metrics, step=step if step is not None or clock is None
                            else int(clock.train_iterations))


def _learner_optimizers(learner: StreamLearner) -> list[torch.optim.Optimizer]:
    """The optimizers `configure_optimizers` returns (none for learners that build their own
    at run time, like TAME's per-expert ones)."""
    conf = learner.configure_optimizers()
    if conf is None:
        return []
    if isinstance(conf, torch.optim.Optimizer):
        return [conf]
    if isinstance(conf, dict):
        conf = [conf]
    out = []
    for item in conf:
        opt = item.get("optimizer") if isinstance(item, dict) else item
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"StreamLearnerStrategy: configure_optimizers returned "
                            f"{type(opt).__name__}, not a torch optimizer (schedulers: step "
                            "them in the learner; there is no Trainer to do it)")
        out.append(opt)
    return out


def _is_last(exp: Any) -> bool:
    """Is this the stream's last training experience (so the next evaluation is final)?"""
    last = getattr(exp, "adaptlab_last", None)
    if last is not None:
        return bool(last)
    logged = exp.logging() if hasattr(exp, "logging") else exp
    try:
        origin = getattr(logged, "origin_experience", None)
        if origin is not None:
            return bool(logged.is_last_subexp) and (
                origin.current_experience == len(origin.origin_stream) - 1)
        if hasattr(logged, "is_last_subexp"):
            return bool(logged.is_last_subexp)
        return logged.current_experience == len(logged.origin_stream) - 1
    except (TypeError, AttributeError):  # a lazy stream of unknown length
        return False


class _TensorBatches:
    """Mini-batches sliced straight from a `stream_to_avalanche` experience's tensors (no
    per-sample indexing or collation), `(x, y)`; the task label is added on unpacking."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.b = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.b)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for s in range(0, len(self.y), self.b):
            yield [self.x[s:s + self.b], self.y[s:s + self.b]]


class StreamLearnerStrategy(SupervisedTemplate):
    """Any adaptlab `StreamLearner` as an Avalanche strategy.

    One training iteration is one `observe(x, y)`; `mb_output` holds its pre-update logits,
    so Avalanche's train accuracy is online accuracy. The learner is hosted in a Lightning
    `Fabric`, so `self.optimizers()`, `self.manual_backward()` and `self.log()` work without a
    Trainer. Experience boundaries never reach the learner: it sees its own fit/epoch hooks
    once, and per-iteration hooks exactly as under a Trainer.

    Args:
        learner: the StreamLearner (manual optimisation).
        train_mb_size: the stream's mini-batch size B.
        eval_mb_size: evaluation batch size (use the native run's for bit-equal accuracies).
        precision: Fabric precision (`32-true`, `bf16-mixed`, …).
        plugins: evaluation metrics, loggers and adaptlab plugins; others raise
            `IncompatiblePluginError` unless `allow_unsafe_plugins=True`.
        evaluator: an `EvaluationPlugin` (default: accuracy per experience and stream,
            `segment_matrix_metrics()`, TensorBoard in `log_dir`).
        log_dir: TensorBoard, `metrics.json` and the learner's own logs.
        labels_to_learner: `False` hides labels (−100) from the learner; `None` follows the
            experience (`stream_to_avalanche` marks unsupervised streams).
        adapt_in_eval: run `observe` (with gradients) instead of `forward` in evaluation.
    """

    def __init__(
        self,
        *,
        learner: StreamLearner,
        train_mb_size: int = 10,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        precision: str = "32-true",
        plugins: Sequence[Any] | None = None,
        evaluator: EvaluationPlugin | None = None,
        log_dir: str | None = None,
        eval_every: int = -1,
        peval_mode: str = "experience",
        labels_to_learner: bool | None = None,
        adapt_in_eval: bool = False,
        allow_unsafe_plugins: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(learner, StreamLearner):
            raise TypeError(f"StreamLearnerStrategy: learner must be an adaptlab StreamLearner "
                            f"(observe(x, y) -> (logits, loss)), got {type(learner).__name__}")
        if learner.automatic_optimization:
            raise TypeError(f"StreamLearnerStrategy: {type(learner).__name__} uses automatic "
                            "optimisation; a StreamLearner optimises manually inside observe "
                            "(automatic_optimization = False, backward via manual_backward)")
        if base_kwargs.get("train_epochs", 1) != 1:
            raise ValueError("train_epochs: must be 1; repetition belongs to the Stream "
                             "(its `repeats`), not to the training loop")
        for key in ("model", "optimizer", "criterion"):
            if key in base_kwargs:
                raise TypeError(f"StreamLearnerStrategy: {key} comes from the learner; "
                                "do not pass it")
        for p in plugins or ():
            safe = isinstance(p, (EvaluationPlugin, PluginMetric)) or getattr(
                p, "adaptlab_safe", False)
            if not safe and not allow_unsafe_plugins:
                raise IncompatiblePluginError(
                    f"plugin {type(p).__name__}: only evaluation metrics, loggers and adaptlab "
                    "plugins are allowed; boundary-aware plugins (Replay, EWC, LwF, …) leak "
                    "experience boundaries to a task-free learner or read mb_output as a "
                    "training output. Pass allow_unsafe_plugins=True to use it anyway"
                )
        self.learner = learner
        self.log_dir = log_dir or os.path.join(
            "lightning_logs", f"avalanche_{type(learner).__name__}")
        dev = torch.device(device)
        self.fabric = Fabric(
            accelerator=dev.type, devices=[dev.index or 0] if dev.type == "cuda" else 1,
            precision=precision, loggers=[_ClockLogger(self.log_dir, self._clock_or_none)],
        )
        # learners read `self.trainer.precision` (TAME); through Fabric's trainer shim
        # that is this attribute, the Trainer's string form
        self.fabric.precision = str(precision)
        opts = _learner_optimizers(learner)
        self.fabric.setup(learner, *opts)
        if evaluator is None:
            evaluator = EvaluationPlugin(
                accuracy_metrics(experience=True, stream=True), segment_matrix_metrics(),
                loggers=[TensorboardLogger(self.log_dir)],
            )
        super().__init__(
            model=learner, optimizer=opts[0] if opts else None,
            criterion=nn.CrossEntropyLoss(), train_mb_size=train_mb_size, train_epochs=1,
            eval_mb_size=eval_mb_size, device=dev, plugins=plugins, evaluator=evaluator,
            eval_every=eval_every, peval_mode=peval_mode, **base_kwargs,
        )
        self.labels_to_learner = labels_to_learner
        self.adapt_in_eval = adapt_in_eval
        self._started = False
        self._hide_labels = False
        self._dirty = False
        self._final_exp = False
        self._final_done = False
        self._forward_done = False
        self._ours: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _clock_or_none(self) -> Any:
        return getattr(self, "clock", None)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The learner's optimizers (raw torch objects), for plugins."""
        return [o.optimizer for o in fabric_optimizers(self.learner)]

    # -- what Avalanche must not do to a learner ----------------------------------------------
    def make_optimizer(self, **kwargs: Any) -> None:
        """Nothing: Avalanche's first `update_optimizer` would reset the optimizer and put
        every parameter in it, breaking learners with several or run-time optimizers."""

    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        """Nothing: the learner owns its model and optimizers (see `make_optimizer`)."""

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        """Unchanged: dynamic heads would need boundaries the learner must not see."""
        return self.model if model is None else model

    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool | None = None,
                              pin_memory: bool | None = None, persistent_workers: bool = False,
                              drop_last: bool = False, **kwargs: Any) -> None:
        """`shuffle` defaults as the data came: an adaptlab stream (`stream_to_avalanche`) keeps
        its order, sliced from tensors; any other benchmark is shuffled, Avalanche's default
        (its experiences are often sorted by class, which order-sensitive learners cannot
        survive)."""
        xy = getattr(self.experience, "_adaptlab_xy", None)
        if shuffle is None:
            shuffle = xy is None
        if (xy is not None and not shuffle and not drop_last
                and len(self.adapted_dataset) == len(xy[1])):
            self.dataloader = _TensorBatches(xy[0], xy[1], self.train_mb_size)
            return
        super().make_train_dataloader(num_workers=num_workers, shuffle=shuffle,
                                      pin_memory=pin_memory,
                                      persistent_workers=persistent_workers,
                                      drop_last=drop_last, **kwargs)

    def make_eval_dataloader(self, num_workers: int = 0, shuffle: bool = False,
                             pin_memory: bool | None = None, persistent_workers: bool = False,
                             **kwargs: Any) -> None:
        """`stream_to_avalanche` test sets are sliced from tensors, as the native evaluator."""
        xy = getattr(self.experience, "_adaptlab_xy", None)
        if xy is not None and len(self.adapted_dataset) == len(xy[1]):
            self.dataloader = _TensorBatches(xy[0], xy[1], self.eval_mb_size)
            return
        super().make_eval_dataloader(num_workers=num_workers, shuffle=shuffle,
                                     pin_memory=pin_memory,
                                     persistent_workers=persistent_workers, **kwargs)

    def _unpack_minibatch(self) -> None:
        """Avalanche's metrics read `mb_task_id` (`mbatch[-1]`): add a zero task label."""
        mb = list(self.mbatch)
        if len(mb) == 2:
            mb.append(torch.zeros(len(mb[1]), dtype=torch.long))
        self.mbatch = mb
        super()._unpack_minibatch()

    def forward(self) -> torch.Tensor:
        """The learner's evaluation forward, under the Fabric precision."""
        with self.fabric.autocast():
            return self.model(self.mb_x)

    # -- training -----------------------------------------------------------------------------
    def _before_training(self, **kwargs: Any) -> None:
        super()._before_training(**kwargs)
        if not self._started:  # once, as under a Trainer: the fit is the whole stream
            self._started = True
            self.learner.on_fit_start()
            self.learner.on_train_start()
            self.learner.on_train_epoch_start()

    def _before_training_exp(self, **kwargs: Any) -> None:
        exp = self.experience
        classes = sorted(getattr(exp, "classes_in_this_experience", None) or [])
        if classes and classes[-1] >= len(classes) and not getattr(self, "_warned_labels", False):
            self._warned_labels = True  # global class ids: say it once per run
            self.learner.check_labels(task_local=False)
        hide = self.labels_to_learner is False or (
            self.labels_to_learner is None and getattr(exp, "adaptlab_supervised", True) is False)
        self._hide_labels = hide
        self._final_exp = _is_last(exp)
        super()._before_training_exp(**kwargs)

    def _relay_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The learner's `manual_backward` inside the bridge: Avalanche's backward events
        around the real backward, once per backward the learner makes."""
        if not self._forward_done:
            self._forward_done = True
            self._after_forward()
        self.loss = loss
        self._before_backward()
        self.learner.on_before_backward(self.loss)
        self.fabric.backward(self.loss, *args, **kwargs)
        self.learner.on_after_backward()
        self._after_backward()

    def _is_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        known = self._ours.get(optimizer)
        if known is None:  # first step of this optimizer (TAME creates them at run time)
            mine = {id(p) for p in self.learner.parameters()}
            known = any(id(p) in mine for g in optimizer.param_groups for p in g["params"])
            self._ours[optimizer] = known
        return known

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._is_ours(optimizer):
            self._before_update()
            self.learner.on_before_optimizer_step(optimizer)

    def _step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._is_ours(optimizer):
            self._after_update()

    def training_epoch(self, **kwargs: Any) -> None:
        """Per mini-batch: `before_training_iteration`, `before_forward`, `observe` (backward
        and update events fire from inside it, once per real backward or step), then
        `after_training_iteration` with `mb_output` = the pre-update logits."""
        learner = self.learner
        from torch.optim import optimizer as optim
        handles = [optim.register_optimizer_step_pre_hook(self._step_pre_hook),
                   optim.register_optimizer_step_post_hook(self._step_post_hook)]
        learner.manual_backward = self._relay_backward  # the bridge is the learner's host
        losses: list[torch.Tensor] = []
        try:
            for idx, mbatch in enumerate(self.dataloader):
                if self._stop_training:
                    break
                self.mbatch = mbatch
                self._unpack_minibatch()
                batch = (self.mb_x, self.mb_y)
                self._before_training_iteration(**kwargs)
                learner.on_train_batch_start(batch, idx)
                self.loss = self._make_empty_loss()
                self._before_forward(**kwargs)
                self._forward_done = False
                y = torch.full_like(self.mb_y, -100) if self._hide_labels else self.mb_y
                with self.fabric.autocast():  # the counters and hooks of training_step
                    logits, loss = learner.observe_counted(self.mb_x, y, len(self.mb_x))
                if logits.requires_grad or (loss is not None and loss.requires_grad):
                    raise TypeError(f"{type(learner).__name__}.observe: must return detached "
                                    "pre-update logits and loss (the learner contract)")
                self._dirty = True
                if not self._forward_done:
                    self._after_forward(**kwargs)
                self.mb_output = logits
                if loss is not None:
                    self.loss = loss
                    losses.append(loss)
                    if len(losses) == 50:  # one host sync per 50 steps, as a native chunk
                        learner.check_losses(losses)
                        losses = []
                self._after_training_iteration(**kwargs)
                learner.on_train_batch_end({"preds": logits.argmax(-1)}, batch, idx)
            learner.check_losses(losses)
        finally:
            del learner.manual_backward
            for h in handles:
                h.remove()

    # -- evaluation ---------------------------------------------------------------------------
    def eval(self, exp_list: Any, **kwargs: Any) -> dict[str, Any]:
        """Avalanche's eval, after the learner's `before_evaluation(final)` (once per
        evaluation point; `final` is the last experience's, or pass `final=True`)."""
        final = kwargs.pop("final", None)
        final = self._final_exp if final is None else bool(final)
        if not self._final_done and (self._dirty or final):
            with torch.enable_grad():
                self.learner.before_evaluation(final)
            self._final_done = final
            self._dirty = False
        return super().eval(exp_list, **kwargs)

    def eval_epoch(self, **kwargs: Any) -> None:
        if not self.adapt_in_eval:
            return super().eval_epoch(**kwargs)
        for mbatch in self.dataloader:  # test-time adaptation: observe, with gradients
            self.mbatch = mbatch
            self._unpack_minibatch()
            self._before_eval_iteration(**kwargs)
            self._before_eval_forward(**kwargs)
            y = torch.full_like(self.mb_y, -100) if self._hide_labels else self.mb_y
            with torch.enable_grad(), self.fabric.autocast():
                self.mb_output, _ = self.learner.observe(self.mb_x, y)
            self._after_eval_forward(**kwargs)
            self.loss = self.criterion()
            self._after_eval_iteration(**kwargs)

    def close(self) -> None:
        """The learner's end-of-fit hooks (a Trainer calls them when the stream ends)."""
        if self._started:
            self.learner.on_train_epoch_end()
            self.learner.on_train_end()
            self.learner.on_fit_end()
            self._started = False
        for logger in self.fabric.loggers:
            logger.finalize("success")

    # -- checkpoints --------------------------------------------------------------------------
    def _stateful_plugins(self) -> list[Any]:
        found = [p for p in self.plugins if hasattr(p, "state_dict") and hasattr(
            p, "load_state_dict") and not isinstance(p, nn.Module)]
        found += [m for m in getattr(self.evaluator, "metrics", [])
                  if isinstance(m, SegmentMatrixMetrics)]
        return found

    def save_checkpoint(self, path: str) -> None:
        """A Lightning-format checkpoint (tensors and plain containers only, so it loads with
        `weights_only=True`); resuming continues exactly, adaptlab's R included."""
        learner = self.learner
        clock = {k: v for k, v in vars(self.clock).items() if isinstance(v, int)}
        np_state = np.random.get_state()
        ckpt: dict[str, Any] = {
            "state_dict": learner.state_dict(),
            "optimizer_states": [o.state_dict() for o in self.optimizers],
            "hyper_parameters": to_jsonable(dict(learner.hparams)),
            "pytorch-lightning_version": __import__("pytorch_lightning").__version__,
            "epoch": 0, "global_step": learner.update_steps,
            "adaptlab_bridge": {
                "clock": clock, "experiences_trained": self.clock.train_exp_counter,
                "started": self._started, "dirty": self._dirty, "final_done": self._final_done,
                "plugins": [p.state_dict() for p in self._stateful_plugins()],
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                        "python_version": random.getstate()[0],
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
                        "numpy_pos": int(np_state[2])},
            },
        }
        learner.on_save_checkpoint(ckpt)
        self.fabric.save(path, ckpt)

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote into this (identically built) strategy."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        learner = self.learner
        learner.on_load_checkpoint(ckpt)
        learner.load_state_dict(ckpt["state_dict"])
        opts = self.optimizers
        if len(opts) != len(ckpt["optimizer_states"]):
            raise ValueError(f"checkpoint: {len(ckpt['optimizer_states'])} optimizer states "
                             f"for {len(opts)} optimizers; build the strategy as it was saved")
        for o, s in zip(opts, ckpt["optimizer_states"]):
            o.load_state_dict(s)
        state = ckpt["adaptlab_bridge"]
        for k, v in state["clock"].items():
            setattr(self.clock, k, v)
        self._started, self._dirty = state["started"], state["dirty"]
        self._final_done = state["final_done"]
        plugins = self._stateful_plugins()
        if len(plugins) != len(state["plugins"]):
            raise ValueError("checkpoint: the strategy has other plugins than the saved one")
        for p, s in zip(plugins, state["plugins"]):
            p.load_state_dict(s)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32),
                             rng["numpy_pos"], 0, 0.0))


