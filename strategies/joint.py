"""`Joint`: the i.i.d. upper bound — the same samples and updates as Finetune, shuffled."""

from __future__ import annotations

from .finetune import Finetune


class Joint(Finetune):
    """Finetune on one seeded i.i.d. shuffle of the whole stream (every segment at once).

    The data module reads `presentation` and shuffles the stream; the learner itself still
    sees only `(x, y)`. It is evaluated once, at the end: the accuracy a stream learner with
    the same budget of samples and updates could reach without any shift.
    """

    presentation = "iid"
