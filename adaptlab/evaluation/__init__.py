"""How a run is judged, one job per module:

- `callback`: `StreamEvaluator`, the Lightning hooks (when to evaluate, what to record);
- `record`: `EventLog` and `Record`, what a run has measured;
- `summary`: `LearnerSummary`, what the document needs from the learner;
- `document`: the pure builder of `metrics.json` and the TensorBoard scalars, shared with
  the Avalanche bridge;
- `tensorboard`: figures and hyper-parameters; `files`: the one writer of `metrics.json`
  and `run.json`; `table`: the terminal table.
"""

from .callback import StreamEvaluator
from .document import build_document
from .files import RunFiles
from .record import EventLog, Record
from .summary import LearnerSummary, summarize
from .table import format_table

__all__ = ["EventLog", "LearnerSummary", "Record", "RunFiles", "StreamEvaluator",
           "build_document", "format_table", "summarize"]
