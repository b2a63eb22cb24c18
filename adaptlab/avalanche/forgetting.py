"""`ForgettingPlugin`: a forgetting regime driven by Avalanche events.

The bridge knows no method and fakes no Trainer: it drives any regime that offers
`bind_without_trainer(model, optimizer)`, `per_token`, `core` and `state_dict`, and, for a
per-step regime, the trainer-free steps `apply_due(step, optimizer, log)`,
`check_segment(step, segment, log)`, `observe_loss(step, loss, log)` and `reset_steps`
(a per-token regime is driven through its `core`). The forgetting regimes of
`adaptlab.strategies.forgetting` offer them; the dependency points from the method to the
core, not back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue

from .convert import segment_of

_PROTOCOL = ("core", "per_token", "bind_without_trainer", "state_dict", "load_state_dict")
_PER_STEP = ("apply_due", "check_segment", "observe_loss", "reset_steps")


class ForgettingPlugin(SupervisedPlugin, supports_distributed=False):
    """The forgetting regimes as an Avalanche plugin, e.g.
    `ForgettingPlugin(EmbeddingForgetting(regime="active", every_k=5))`.

    It drives the same regime object as the Lightning callback (its `ForgettingCore`
    schedule and in-place reset), so both back ends reset at the same steps: the reset due
    after step s = `clock.train_iterations` is applied at the start of the next iteration,
    before the forward pass. Works on the bridge and on Avalanche's own `Naive`, `ER_ACE`, ….
    `rearm_on: segment` reads the current experience's segment (an oracle, as the callback's).
    """

    adaptlab_safe = True

    def __init__(self, forgetting: Any) -> None:
        super().__init__()
        per_token = getattr(forgetting, "per_token", None)
        needed = _PROTOCOL + (() if per_token else _PER_STEP)
        if per_token is None or not all(hasattr(forgetting, name) for name in needed):
            raise TypeError(f"ForgettingPlugin: takes an EmbeddingForgetting or "
                            f"ProbabilisticEmbeddingForgetting, got {type(forgetting).__name__}")
        self.forgetting = forgetting
        self.probabilistic = bool(per_token)
        self._published = 0

    @staticmethod
    def _optimizer(strategy: Any) -> torch.optim.Optimizer | None:
        """The bridge's learner optimizers (`strategy.optimizers`), or a plain strategy's one."""
        opts = getattr(strategy, "optimizers", None)
        if not isinstance(opts, list):
            opts = [strategy.optimizer] if getattr(strategy, "optimizer", None) else []
        return opts[0] if opts else None

    def _log(self, strategy: Any) -> Callable[[dict[str, float], int], None]:
        """The regime's scalars, published through the strategy's evaluation plugin."""
        def log(values: dict[str, float], step: int) -> None:
            ev = getattr(strategy, "evaluator", None)
            if ev is not None:
                for k, v in values.items():
                    ev.publish_metric_value(MetricValue(self, k, float(v), int(step)))
        return log

    @property
    def reset_steps(self) -> list[int]:
        return list(getattr(self.forgetting, "reset_steps", []))

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.forgetting.bind_without_trainer(strategy.model, self._optimizer(strategy))

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        opt = self._optimizer(strategy)
        if opt is not None and not self.probabilistic:  # the optimizer may be rebuilt
            self.forgetting.core.check_optimizer(opt)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.probabilistic:
            self.forgetting.core.restore()
            return
        step, log = int(strategy.clock.train_iterations), self._log(strategy)
        if self.forgetting.core.rearm_on == "segment":
            self.forgetting.check_segment(step, segment_of(strategy.experience), log)
        self.forgetting.apply_due(step, self._optimizer(strategy), log)

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
        step = int(strategy.clock.train_iterations)
        self.forgetting.observe_loss(step, strategy.loss, self._log(strategy))
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
