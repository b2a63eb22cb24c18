"""`Finetune`: plain SGD on the stream, the lower bound that shows catastrophic forgetting."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adaptlab.learner import StreamLearner, make_optimizer


class Finetune(StreamLearner):
    """One backbone, one optimizer step per mini-batch, no memory of the past.

    Args:
        optimizer: `sgd`, `adam` or `adamw`.
        lr, momentum, weight_decay: optimizer settings.
        **kwargs: `StreamLearner` arguments (backbone, shapes, seed).
    """

    def __init__(
        self,
        *,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.optimizer_name = optimizer
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        make_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))], lr=lr)  # validate early
        self.model = self.build_backbone()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(
            self.optimizer_name, self.model.parameters(), lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Logits on the batch, the loss to minimise and how many samples it averages
        (Replay adds memory samples here)."""
        logits = self.model(x)
        return logits, F.cross_entropy(logits, y), len(x)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss, n = self.training_loss(x, y)
        self.update(self.optimizers(), loss, n=n)
        return logits.detach(), loss.detach()
