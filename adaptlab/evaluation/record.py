"""What an evaluation gathers while a stream runs: the online events and the matrix rows.

Both back ends fill the same `EventLog` and `Record` (the Lightning callback per chunk, the
Avalanche metric per iteration), so the document built from them cannot differ by loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .. import metrics


class EventLog:
    """One test-then-train event per `observe`: `(pos, n, n_correct, seg)`.

    Correct counts stay where they were computed (often the GPU) until `flush`, so recording
    costs no host sync; a flush moves all pending counts in one transfer.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._chunks: list[np.ndarray] = []  # each (k, 4) int64: pos, n, n_correct, seg
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self.n = 0
        self.correct = 0

    def add(self, meta: np.ndarray, correct: torch.Tensor) -> None:
        """Record events: `meta` is (k, 3) `pos, n, seg`; `correct` their k correct counts."""
        self._pending.append((meta, correct.reshape(-1)))

    def flush(self) -> None:
        """Move pending counts to the host (one sync per flush)."""
        if not self._pending:
            return
        counts = torch.cat([c for _, c in self._pending]).cpu().numpy().astype(np.int64)
        meta = np.concatenate([m for m, _ in self._pending])
        ev = np.column_stack([meta[:, 0], meta[:, 1], counts, meta[:, 2]])
        self._chunks.append(ev)
        self.n += int(ev[:, 1].sum())
        self.correct += int(ev[:, 2].sum())
        self._pending = []

    def __bool__(self) -> bool:
        self.flush()
        return bool(self._chunks)

    def array(self) -> np.ndarray:
        """All events as one (k, 4) int64 array."""
        self.flush()
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0, 4), np.int64)

    def events(self) -> metrics.OnlineEvents:
        ev = self.array()
        return metrics.OnlineEvents(ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 3])

    def tail(self, samples: int) -> np.ndarray:
        """The latest recorded chunks, enough to cover `samples` stream samples (a windowed
        accuracy needs no more; concatenating the whole history each time would be O(n²))."""
        self.flush()
        keep = samples // max(1, int(self._chunks[-1][0, 1])) + 2
        return np.concatenate(self._chunks[-keep:])

    def state(self) -> torch.Tensor:
        # a tensor, not a numpy array: checkpoints must load with weights_only=True
        return torch.from_numpy(self.array())

    def load(self, state: Any) -> None:
        self.reset()
        ev = torch.as_tensor(state).numpy().astype(np.int64).reshape(-1, 4)
        if len(ev):
            self._chunks = [ev]
            self.n, self.correct = int(ev[:, 1].sum()), int(ev[:, 2].sum())


@dataclasses.dataclass
class Record:
    """Everything a run's evaluation has measured, in stream-column order.

    `init`: accuracies before training (None without an initial evaluation); `rows`: one
    `{"after_segment", "position", "observe_step", "acc"}` per evaluation point;
    `anytime`: `(position, accuracies)` of the periodic evaluations; `curve`: `[position,
    windowed online accuracy]` points; `events`: the online events.
    """

    init: list[float] | None = None
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    anytime: list[tuple[int, list[float]]] = dataclasses.field(default_factory=list)
    curve: list[list[Any]] = dataclasses.field(default_factory=list)
    events: EventLog = dataclasses.field(default_factory=EventLog)

    def matrix(self) -> np.ndarray:
        return np.array([r["acc"] for r in self.rows], dtype=float)
