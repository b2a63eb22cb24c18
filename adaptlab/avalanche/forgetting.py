"""`ForgettingPlugin`: a forgetting regime driven by Avalanche events.

The bridge knows no method: it drives any regime that offers what it reads — `core` (the
schedule and in-place reset, or the per-token replacement when `per_token` is true),
`bind_without_trainer(model, optimizer)`, the Lightning-callback hooks
`on_train_batch_start` / `on_train_batch_end`, `reset_steps` and `state_dict`. The
forgetting regimes of `adaptlab.strategies.forgetting` offer it; the dependency points from
the method to the core, not back.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue

from .convert import segment_of

_PROTOCOL = ("core", "per_token", "bind_without_trainer", "on_train_batch_start",
             "on_train_batch_end", "state_dict", "load_state_dict")


class _PublishLogger:
    """The forgetting callbacks log through `trainer.logger`; here that is the evaluator."""

    def __init__(self, plugin: ForgettingPlugin, strategy: Any) -> None:
        self.plugin, self.strategy = plugin, strategy

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        ev = getattr(self.strategy, "evaluator", None)
        if ev is not None:
            for k, v in values.items():
                ev.publish_metric_value(MetricValue(self.plugin, k, float(v), int(step)))


class _SegmentMeta:
    """`batch_meta()` for `rearm_on: segment`: the current experience's segment, read by the
    core's oracle (`adaptlab.oracle`) as it reads a Lightning data module's."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def batch_meta(self) -> dict[str, Any]:
        return {"segment_ids": torch.tensor([segment_of(self.strategy.experience)])}


class ForgettingPlugin(SupervisedPlugin, supports_distributed=False):
    """The forgetting regimes as an Avalanche plugin, e.g.
    `ForgettingPlugin(EmbeddingForgetting(regime="active", every_k=5))`.

    It drives the same regime object as the Lightning callback (its `ForgettingCore`
    schedule and in-place reset), so both back ends reset at the same steps: the reset due
    after step s = `clock.train_iterations` is applied at the start of the next iteration,
    before the forward pass. Works on the bridge and on Avalanche's own `Naive`, `ER_ACE`, ….
    """

    adaptlab_safe = True

    def __init__(self, forgetting: Any) -> None:
        super().__init__()
        if not all(hasattr(forgetting, name) for name in _PROTOCOL):
            raise TypeError(f"ForgettingPlugin: takes an EmbeddingForgetting or "
                            f"ProbabilisticEmbeddingForgetting, got {type(forgetting).__name__}")
        self.forgetting = forgetting
        self.probabilistic = bool(forgetting.per_token)
        self._published = 0

    def _host(self, strategy: Any) -> tuple[Any, Any]:
        """What the callback reads from a Trainer and a module, from the strategy."""
        opts = getattr(strategy, "optimizers", None)
        if not isinstance(opts, list):
            opts = [strategy.optimizer] if getattr(strategy, "optimizer", None) else []
        trainer = _Host(optimizers=opts, logger=_PublishLogger(self, strategy),
                        is_global_zero=True, global_step=int(strategy.clock.train_iterations),
                        callbacks=[], datamodule=_SegmentMeta(strategy))
        return trainer, _Host()

    @property
    def reset_steps(self) -> list[int]:
        return list(getattr(self.forgetting, "reset_steps", []))

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        trainer, _ = self._host(strategy)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        self.forgetting.bind_without_trainer(strategy.model, opt)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        trainer, _ = self._host(strategy)
        if trainer.optimizers and not self.probabilistic:  # the optimizer may be rebuilt
            self.forgetting.core.check_optimizer(trainer.optimizers[0])

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        trainer, module = self._host(strategy)
        if self.probabilistic:
            self.forgetting.core.restore()
            return
        self.forgetting.on_train_batch_start(trainer, module, (strategy.mb_x,), 0)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.before_forward(int(strategy.clock.train_iterations),
                                                strategy.mb_x)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.after_backward()

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.before_optimizer_step()

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.restore()
            return
        trainer, module = self._host(strategy)
        module.last_loss = strategy.loss
        self.forgetting.on_train_batch_end(trainer, module, {"loss": strategy.loss}, None, 0)
        step = int(strategy.clock.train_iterations)
        ev = getattr(strategy, "evaluator", None)
        if ev is not None and len(self.forgetting.reset_steps) != self._published:
            self._published = len(self.forgetting.reset_steps)
            ev.publish_metric_value(MetricValue(
                self, "Forgetting_Resets/train_phase/train_stream",
                len(self.forgetting.reset_steps), step))

    def state_dict(self) -> dict[str, Any]:
        return self.forgetting.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forgetting.load_state_dict(state)


class _Host:
    """A bag of attributes standing in for the Trainer / module the callbacks read."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

