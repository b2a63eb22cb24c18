"""The one writer of a run's `metrics.json` and `run.json`, for both back ends."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from ..jsonio import to_jsonable, write_json_atomic


def now() -> str:
    """UTC time, to the second, as run.json records it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def plain_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as JSON scalars (anything else as its `str`)."""
    return to_jsonable({k: (v if isinstance(v, (int, float, str, bool)) or v is None
                            else str(v)) for k, v in hp.items()})


class RunFiles:
    """Writes `metrics.json` on every call (atomically: a killed run leaves the previous
    valid file) and `run.json` (run-specific: times, seed, hyper-parameters) only when the
    status changes."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._status: str | None = None

    def write(self, doc: dict[str, Any], *, learner: Any, started_at: str | None,
              hparams: dict[str, Any], **extra: Any) -> None:
        d = self.log_dir
        os.makedirs(d, exist_ok=True)
        write_json_atomic(os.path.join(d, "metrics.json"), doc)
        status = doc["status"]
        if status == self._status:
            return
        self._status = status
        run = {
            "log_dir": d, "seed": getattr(learner, "seed", None),
            "learner": type(learner).__name__, **extra, "status": status,
            "started_at": started_at, "finished_at": now() if status != "running" else None,
            "hparams": plain_hparams(hparams),
        }
        write_json_atomic(os.path.join(d, "run.json"), run)
