"""Sources: anything that yields a train/test split of tensors (the open interface).

A stream builder's `source=` may be

- a **name**: a built-in (`digits`, `mnist`, `fashion_mnist`, `cifar10`, `cifar100`), a name a
  package added with `register_source`, or one it advertises under the entry-point group
  `adaptlab.sources`;
- a **file**: a `.npz` or `.pt` path holding `x_train`, `y_train`, `x_test`, `y_test` (and
  optionally `n_classes`);
- an **import path** `package.module:function` naming a loader;
- from Python, a **`SourceData`**, made by `from_arrays` or `from_dataset`.

Every route ends in `from_arrays`, the one place that checks, casts and fingerprints data, so a
stream built from the same numbers is the same stream whichever route brought them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SOURCES",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "SourceData",
    "SourceError",
    "available_sources",
    "clear_source_cache",
    "from_arrays",
    "from_dataset",
    "load_file",
    "load_source",
    "register_source",
    "source_name",
]

#: The built-in names; `available_sources()` adds the registered ones.
SOURCES: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
ENTRY_POINT_GROUP = "adaptlab.sources"
FILE_SUFFIXES = (".npz", ".pt")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)
CLEAR_ARGS = "a config's source_args are cleared with --data.stream.init_args.source_args '{}'"


class SourceError(ValueError):
    """The data cannot become a stream (the message names the array and the fix)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where the source expects them (message says how to fix it)."""


class DatasetFormatError(SourceError):
    """A dataset file exists but is not in the expected format (message names the file)."""


@dataclass(frozen=True)
class SourceData:
    """A checked source: a train/test split of samples and integer labels.

    Samples are images (C, H, W), sequences (C, L) or flat features (D,); `x` is float32, or
    uint8 for image pixels (scaled to [0, 1] when served). Labels are int64 in
    [0, n_classes). Instances are cached and shared between streams: treat them as read-only.
    Make one with `from_arrays` or `from_dataset`, which also compute the fingerprint.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    fingerprint: str  # sha256 over name, parameters and data bytes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        """Images are (C, H, W); what needs pixels (rotations, corruptions) asks this."""
        return len(self.sample_shape) == 3


# --------------------------------------------------------------------------- from arrays


def from_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    name: str = "arrays",
    n_classes: int | None = None,
    params: Mapping[str, Any] | None = None,
) -> SourceData:
    """Check, cast and fingerprint four arrays (numpy, torch or nested lists) as a source.

    Features: float32 and uint8 are kept (uint8 is read as image pixels); every other real
    dtype (float64, float16, int, bool) is cast to float32 unchanged. Labels: integers of any
    width become int64; anything else is refused, as are NaN/inf, empty splits, train/test
    shape or dtype mismatches, negative labels and labels >= `n_classes` (default: the largest
    label + 1). `params` (JSON-able) enter the fingerprint, e.g. a generator's settings.
    """
    where = f"source {name!r}"
    xs = {k: _features(v, f"{where}: {k}") for k, v in (("x_train", x_train), ("x_test", x_test))}
    ys = {k: _labels(v, f"{where}: {k}") for k, v in (("y_train", y_train), ("y_test", y_test))}
    for split in ("train", "test"):
        x, y = xs[f"x_{split}"], ys[f"y_{split}"]
        if len(x) == 0:
            raise SourceError(f"{where}: the {split} split is empty")
        if len(y) != len(x):
            raise SourceError(
                f"{where}: x_{split} has {len(x)} samples but y_{split} has {len(y)} labels"
            )
    shape_tr, shape_te = tuple(xs["x_train"].shape[1:]), tuple(xs["x_test"].shape[1:])
    if shape_tr != shape_te:
        raise SourceError(
            f"{where}: train samples are {shape_tr} but test samples are {shape_te}; "
            "both splits need one sample shape"
        )
    if len(shape_tr) == 3 and shape_tr[2] in (1, 3, 4) and min(shape_tr[:2]) > shape_tr[2]:
        warnings.warn(
            f"{where}: samples of shape {shape_tr} look channels-last (H, W, C); adaptlab "
            "reads images as (C, H, W): pass x.transpose(0, 3, 1, 2) if they are",
            stacklevel=2,
        )
    if xs["x_train"].dtype != xs["x_test"].dtype:
        raise SourceError(
            f"{where}: x_train is {xs['x_train'].dtype} but x_test is {xs['x_test'].dtype}; "
            "give both splits one dtype (uint8 is read as pixels in 0..255, floats as values)"
        )
    largest = max(int(ys["y_train"].max()), int(ys["y_test"].max()))
    inferred = largest + 1
    if n_classes is None:
        n_classes = inferred
    elif isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise SourceError(f"{where}: n_classes must be an integer, got {n_classes!r}")
    n_classes = int(n_classes)
    if largest >= n_classes:
        split = "train" if int(ys["y_train"].max()) >= n_classes else "test"
        y = ys[f"y_{split}"]
        raise SourceError(
            f"{where}: y_{split} labels span [{int(y.min())}, {int(y.max())}], expected "
            f"[0, {n_classes}) (n_classes={n_classes} was given)"
        )
    if n_classes < 2:
        raise SourceError(f"{where}: a classifier needs at least 2 classes, got {n_classes}")

    meta: dict[str, Any] = {"name": name, "params": dict(params or {})}
    if n_classes != inferred:  # said explicitly and not visible in the labels
        meta["n_classes"] = n_classes
    try:
        blob = json.dumps(meta, sort_keys=True)
    except TypeError as err:
        raise SourceError(f"{where}: params must be JSON-able ({err})") from None
    digest = hashlib.sha256(blob.encode())
    arrays = (xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"])
    for a in arrays:
        a_np = a.numpy()
        digest.update(f"{a_np.dtype.str}{a_np.shape}".encode())
        digest.update(a_np.data)
    return SourceData(name, *arrays, n_classes=n_classes, fingerprint=digest.hexdigest())


def _as_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise SourceError(f"{what}: cannot be read as an array ({err})") from None
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise SourceError(
            f"{what}: cannot be read as a numeric array (got {type(value).__name__} of "
            f"{arr.dtype}); pass numbers: a numpy array, a tensor, or nested lists of numbers"
        )
    return np.require(arr, requirements=["C", "W"])


def _features(value: Any, what: str) -> torch.Tensor:
    arr = _as_numpy(value, what)
    if arr.ndim < 2:
        raise SourceError(
            f"{what}: shape {arr.shape} has no sample axis; samples are rows: (N, D) features, "
            "(N, C, L) sequences or (N, C, H, W) images (one feature per sample: reshape to (N, 1))"
        )
    if arr.ndim > 4:
        raise SourceError(
            f"{what}: samples of shape {arr.shape[1:]}; adaptlab takes images (C, H, W), "
            "sequences (C, L) or flat features (D,)"
        )
    if arr.dtype.kind == "c":
        raise SourceError(f"{what}: complex values ({arr.dtype}); pass real features")
    if arr.dtype != np.uint8 and arr.dtype != np.float32:
        log.info("%s: %s features cast to float32", what, arr.dtype)
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
    if arr.dtype == np.float32 and arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))[0])
        raise SourceError(
            f"{what}: NaN or inf at sample {bad} (after the cast to float32); "
            "clean or drop those samples"
        )
    return torch.from_numpy(arr)


def _labels(value: Any, what: str) -> torch.Tensor:
    arr = _as_numpy(value, what)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise SourceError(f"{what}: labels must be one class id per sample, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        hint = " (if they are whole numbers, cast them: y.astype(int))" if (
            arr.dtype.kind == "f") else ""
        raise SourceError(f"{what}: labels must be integer class ids, got {arr.dtype}{hint}")
    if arr.size and int(arr.min()) < 0:
        raise SourceError(
            f"{what}: label {int(arr.min())} is negative; class ids run from 0 to n_classes - 1"
        )
    return torch.from_numpy(arr.astype(np.int64))


# --------------------------------------------------------------------------- from a Dataset


def from_dataset(
    train: Any, test: Any, *, name: str | None = None, n_classes: int | None = None
) -> SourceData:
    """Read two map-style Datasets of `(sample, label)` items once, in index order.

    Works for any `torch.utils.data.Dataset` with `__len__` and `__getitem__` (torchvision's
    included): tensors and arrays are taken as they are, PIL images become uint8 (C, H, W).
    `n_classes` defaults to `len(train.classes)` where the dataset has that attribute.
    """
    name = name or type(train).__name__.lower()
    if n_classes is None and isinstance(getattr(train, "classes", None), Sequence):
        n_classes = len(train.classes)
    arrays = [a for ds, split in ((train, "train"), (test, "test"))
              for a in _read_dataset(ds, f"source {name!r}: {split} dataset")]
    return from_arrays(*arrays, name=name, n_classes=n_classes)


def _read_dataset(ds: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise SourceError(
            f"{what}: {type(ds).__name__} is not a map-style Dataset (it needs __len__ and "
            "__getitem__); materialise an iterable dataset into arrays and use from_arrays"
        )
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise SourceError(f"{what}: item {i} is {type(item).__name__}, not (sample, label)")
        xs.append(_sample(item[0], f"{what}: item {i}"))
        ys.append(_as_numpy(item[1], f"{what}: label of item {i}").reshape(-1))
    if not xs:
        raise SourceError(f"{what}: the dataset is empty")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        first = next(i for i, x in enumerate(xs) if x.shape != xs[0].shape)
        raise SourceError(
            f"{what}: samples have different shapes (item 0: {xs[0].shape}, item {first}: "
            f"{xs[first].shape}); resize them to one shape first"
        )
    if any(len(y) != 1 for y in ys):
        raise SourceError(f"{what}: every label must be one class id")
    return np.stack(xs), np.concatenate(ys)


def _sample(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "getbands") and hasattr(x, "size"):  # a PIL image: (H, W[, C]) -> (C, H, W)
        arr = np.asarray(x)
        return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    return _as_numpy(x, what)


# --------------------------------------------------------------------------- from a file


def load_file(path: PathLike, *, name: str | None = None) -> SourceData:
    """A `.npz` (numpy) or `.pt` (torch, a dict of tensors) file with `x_train`, `y_train`,
    `x_test`, `y_test` and optionally `n_classes`; the source is named after the file."""
    path = Path(path).expanduser()
    name = name or path.stem
    if path.suffix not in FILE_SUFFIXES:
        raise SourceError(f"source file {str(path)!r}: expected a .npz or .pt file")
    if not path.is_file():
        raise DatasetNotFoundError(f"source file {str(path)!r} not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                content: Mapping[str, Any] = {k: npz[k] for k in npz.files}
        else:
            content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a truncated, foreign or pickled file
        if path.suffix == ".pt" and "weights_only" in str(err).replace(" ", "_").lower():
            raise DatasetFormatError(
                f"{path}: holds objects other than tensors (e.g. numpy arrays), which are not "
                "unpickled; save tensors (torch.from_numpy) or use numpy.savez (.npz)"
            ) from None
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0]) if str(err) else ""
        raise DatasetFormatError(
            f"{path}: not a readable {path.suffix} file ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(content, Mapping):
        raise DatasetFormatError(f"{path}: holds {type(content).__name__}, expected a dict")
    missing = [k for k in ARRAY_KEYS if k not in content]
    if missing:
        raise DatasetFormatError(
            f"{path}: missing {', '.join(missing)} (found: {', '.join(sorted(content)) or 'none'}"
            f"); a source file holds {', '.join(ARRAY_KEYS)} and optionally n_classes"
        )
    n_classes = content.get("n_classes")
    if n_classes is not None:
        n_classes = int(np.asarray(n_classes))
    return from_arrays(*(content[k] for k in ARRAY_KEYS), name=name, n_classes=n_classes)


# --------------------------------------------------------------------------- names


Loader = Callable[..., Any]
_REGISTRY: dict[str, Loader] = {}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def register_source(name: str, loader: Loader, *, replace: bool = False) -> None:
    """Make `loader` a named source that configs can name like a built-in (`source: name`).

    `loader(**source_args)` returns a `SourceData`, a dict with the four arrays (and optionally
    `n_classes`), or the 4-tuple `(x_train, y_train, x_test, y_test)`; `source_args` come from
    the stream's config. Results are cached per arguments.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise SourceError(f"register_source: {name!r} is not a valid name (letters, digits, _, -)")
    if name in SOURCES:
        raise SourceError(f"register_source: {name!r} is a built-in source")
    if not callable(loader):
        raise SourceError(f"register_source: the loader for {name!r} is not callable")
    if name in _REGISTRY and _REGISTRY[name] is not loader and not replace:
        raise SourceError(
            f"register_source: {name!r} is already registered; pass replace=True to change it"
        )
    _REGISTRY[name] = loader
    _load_named.cache_clear()


def available_sources() -> tuple[str, ...]:
    """Built-in, registered and entry-point source names."""
    advertised = [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return tuple(dict.fromkeys([*SOURCES, *sorted(_REGISTRY), *sorted(advertised)]))


def load_source(
    source: str | SourceData = "digits",
    *,
    root: PathLike | None = None,
    download: bool = False,
    split_seed: int = 0,
    labels: str = "fine",
    source_args: Mapping[str, Any] | None = None,
) -> SourceData:
    """Resolve any `source=` value to a checked `SourceData` (cached in-process).

    `root`, `download`, `split_seed` and `labels` apply to built-ins (`split_seed` to digits,
    `labels` "fine"/"coarse" to cifar100); a relative file path is read under `root` when one
    is given. `source_args` are passed to a registered or imported loader.
    """
    if isinstance(source, SourceData):
        return source
    if not isinstance(source, str):
        raise SourceError(
            f"source: expected a name, a file path or a SourceData, got {type(source).__name__}"
        )
    args = dict(source_args or {})
    if source in SOURCES:
        if args:
            raise SourceError(
                f"source_args: built-in source {source!r} takes none (it reads root, download, "
                f"split_seed); {CLEAR_ARGS}"
            )
        from .datasets import load_builtin

        return load_builtin(source, root=root, download=download, split_seed=split_seed,
                            labels=labels)
    if labels != "fine":
        raise SourceError(f"labels={labels!r} only applies to source 'cifar100', not {source!r}")
    if source.endswith(FILE_SUFFIXES):
        path = Path(source).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root).expanduser() / path
        if args:
            raise SourceError(f"source_args: a file source ({source!r}) takes none; {CLEAR_ARGS}")
        if not path.is_file():
            raise DatasetNotFoundError(
                f"source file {source!r} not found (looked at {str(path.resolve())!r})"
            )
        stat = path.stat()
        return _load_file_cached(str(path.resolve()), (stat.st_mtime_ns, stat.st_size))
    try:
        key = json.dumps(args, sort_keys=True)
    except TypeError as err:
        raise SourceError(f"source_args: must be JSON-able ({err})") from None
    return _load_named(source, key)


def source_name(source: str | SourceData) -> str:
    """The name a `source=` value gives its data (`mine` for `mine`, `data/mine.npz` and
    `pkg.data:mine`): streams are named and fingerprinted by it, not by where files live."""
    if isinstance(source, SourceData):
        return source.name
    if source.endswith(FILE_SUFFIXES):
        return Path(source).stem
    return source.rpartition(":")[2]


def clear_source_cache() -> None:
    """Forget every cached source (e.g. after files under a root were replaced)."""
    from .datasets import clear_builtin_cache

    clear_builtin_cache()
    _load_named.cache_clear()
    _load_file_cached.cache_clear()


@lru_cache(maxsize=8)
def _load_file_cached(path: str, stamp: Any) -> SourceData:
    return load_file(path)


@lru_cache(maxsize=8)
def _load_named(name: str, args_json: str) -> SourceData:
    loader = _resolve_loader(name)
    args = json.loads(args_json)
    try:
        result = loader(**args)
    except TypeError as err:
        if "argument" in str(err) and err.__traceback__.tb_next is None:  # the call itself
            raise SourceError(f"source_args: {err} (source {name!r})") from None
        raise _loader_failed(name, err) from err
    except Exception as err:  # the user's code: name it, keep the trace for ADAPTLAB_DEBUG
        raise _loader_failed(name, err) from err
    if isinstance(result, SourceData):
        return result
    label = source_name(name)
    if isinstance(result, Mapping):
        missing = [k for k in ARRAY_KEYS if k not in result]
        if missing:
            raise SourceError(f"source {name!r}: the loader's dict lacks {', '.join(missing)}")
        return from_arrays(*(result[k] for k in ARRAY_KEYS), name=label,
                           n_classes=result.get("n_classes"), params=args)
    if isinstance(result, tuple | list) and len(result) == 4:
        return from_arrays(*result, name=label, params=args)
    raise SourceError(
        f"source {name!r}: the loader returned {type(result).__name__}; expected a SourceData, "
        "a dict with x_train, y_train, x_test, y_test, or that 4-tuple"
    )


def _loader_failed(name: str, err: BaseException) -> SourceError:
    return SourceError(
        f"source {name!r}: the loader raised {type(err).__name__}: {err} (ADAPTLAB_DEBUG=1 "
        "shows the trace)"
    )


def _resolve_loader(name: str) -> Loader:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            loader = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise SourceError(
                f"source {name!r}: cannot import it ({err}); the module must be importable "
                "(installed, or on PYTHONPATH; the adaptlab CLI also looks in the current "
                "folder)"
            ) from None
        if not callable(loader):
            raise SourceError(f"source {name!r}: {attr} is not callable")
        return loader
    if Path(name).suffix or Path(name).exists():
        raise SourceError(
            f"source {name!r}: only .npz and .pt files are read; save x_train, y_train, "
            "x_test, y_test with numpy.savez (.npz) or as tensors with torch.save (.pt)"
        )
    raise SourceError(
        f"unknown source {name!r}; valid sources: {', '.join(available_sources())}, "
        "a .npz/.pt file path, or 'module:function' (see README, \"Your own data\")"
    )


def __getattr__(attr: str) -> Any:
    """The built-in file parsers live in `datasets.py`; old imports from here still work."""
    from . import datasets

    if attr in datasets.__all__:
        return getattr(datasets, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
