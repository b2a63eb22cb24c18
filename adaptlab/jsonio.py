"""JSON helpers for ``metrics.json`` / ``run.json`` (spec: metrics.md §7).

``write_json_atomic`` writes ``<path>.tmp``, flushes and fsyncs it, then ``os.replace``s
it over ``<path>``, so a killed run always leaves the previous valid file. Undefined or
non-finite floats become ``null``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCHEMA_VERSION", "metrics_document", "read_json", "to_jsonable",
           "write_json_atomic"]

#: One metrics.json schema for every run: the keys below always exist; a stream run fills
#: `stream`/`accuracy_matrix`/`per_segment`/…, other runs (StreamAdapter's episodic stages)
#: leave those null and add their own section.
SCHEMA_VERSION = 1


def metrics_document(status: str, *, backend: str = "lightning", final: dict | None = None,
                     **sections: Any) -> dict[str, Any]:
    """The common frame of a metrics.json; `sections` are added as they are."""
    from . import __version__

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "adaptlab_version": __version__, "backend": backend,
        "status": status, "stream": None, "accuracy_matrix": None, "final": final or {},
    }
    doc.update(sections)
    return doc


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
        return str(int(k))
    raise TypeError(f"JSON object keys must be str or int, got {type(k).__name__}: {k!r}")


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types only.

    numpy scalars/arrays -> Python values/lists, NaN/inf -> None, dataclasses -> dict,
    tuples -> lists, int keys -> str, paths -> str. Anything with ``tolist()`` (arrays,
    tensors) is converted through it. Other types raise ``TypeError``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible everywhere (e.g. Windows), so best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``to_jsonable(obj)`` to ``path`` atomically.

    On any exception the previous file is left untouched and ``<path>.tmp`` is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        data = to_jsonable(obj)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Load a JSON document (as written by :func:`write_json_atomic`)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
