"""Learners and training regimes; one file per method, sharing the core."""

from .finetune import Finetune
from .forgetting import EmbeddingForgetting, ProbabilisticEmbeddingForgetting
from .icl_families import FamilyInContextLearner
from .in_context import InContextLearner
from .joint import Joint
from .replay import Replay
from .stream_adapter import SegmentReset, StreamAdapter, TestTimeStreamAdapter
from .tame import TAME
from .tta import EATA, LAME, SAR, TENT, BNAdapt, CoTTA, Source, SourceTraining

__all__ = [
    "TAME", "EmbeddingForgetting", "FamilyInContextLearner", "Finetune", "InContextLearner",
    "Joint",
    "ProbabilisticEmbeddingForgetting", "Replay", "SegmentReset", "StreamAdapter",
    "TestTimeStreamAdapter",
    "BNAdapt", "CoTTA", "EATA", "LAME", "SAR", "Source", "SourceTraining", "TENT",
]
