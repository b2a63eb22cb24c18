"""Non-stationary streams: deterministic, ordered, with the evaluator's view kept apart.

`from adaptlab.streams import split` builds a stream; `Split` is the same as a config class.
"""

from .builders import SegmentData, StreamBuilder
from .core import UNLABELED, Segment, Stream
from .vision import Corrupted, Permuted, Rotated, Split, corrupted, permuted, rotated, split

__all__ = [
    "UNLABELED", "Segment", "Stream", "StreamBuilder", "SegmentData",
    "Split", "Permuted", "Rotated", "Corrupted", "split", "permuted", "rotated", "corrupted",
]
