"""Learners and training regimes; one file per method, sharing the core."""

from .finetune import Finetune
from .joint import Joint
from .replay import Replay
from .tame import TAME

__all__ = ["Finetune", "Joint", "Replay", "TAME"]
