"""Learners and training regimes; one file per method, sharing the core."""

from .finetune import Finetune
from .forgetting import EmbeddingForgetting, ProbabilisticEmbeddingForgetting
from .in_context import InContextLearner
from .joint import Joint
from .replay import Replay
from .tame import TAME

__all__ = [
    "TAME", "EmbeddingForgetting", "Finetune", "InContextLearner", "Joint",
    "ProbabilisticEmbeddingForgetting", "Replay",
]
