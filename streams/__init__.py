"""Non-stationary streams: deterministic, ordered, with the evaluator's view kept apart.

`from adaptlab.streams import split` builds a stream; `Split` is the same as a config class.
Any data set becomes a source with `from_arrays`, `from_dataset`, a `.npz`/`.pt` file or
`register_source` (see `sources.py`).
"""

from . import generated  # noqa: F401  (registers the generated sources: tabular, signals)
from .builders import SegmentData, StreamBuilder
from .core import UNLABELED, Segment, Stream
from .sources import SourceData, from_arrays, from_dataset, load_file, register_source
from .vision import Corrupted, Permuted, Rotated, Split, corrupted, permuted, rotated, split

__all__ = [
    "UNLABELED", "Segment", "Stream", "StreamBuilder", "SegmentData",
    "Split", "Permuted", "Rotated", "Corrupted", "split", "permuted", "rotated", "corrupted",
    "SourceData", "from_arrays", "from_dataset", "load_file", "register_source",
]
