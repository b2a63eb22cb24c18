"""The standard dataset files, parsed into whole tensors (README, "Your own data").

adaptlab parses the files itself instead of going through torchvision's dataset classes:
those check every CIFAR file's MD5 (which rules out tiny test fixtures) and convert one PIL
image per sample, while the stream builders want whole arrays. torchvision is used only to
*fetch* files when `download=True`; the layouts below are the ones its downloaders produce,
so an existing torchvision root works as is. These are the built-in sources of `sources.py`.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import DatasetFormatError, DatasetNotFoundError, SourceData, from_arrays

__all__ = [
    "CORRUPTION_NAMES_C",
    "EXTRA_CORRUPTION_NAMES_C",
    "load_cifar10",
    "load_cifar100",
    "load_cifar_c",
    "load_digits",
    "load_fashion_mnist",
    "clear_builtin_cache",
    "load_builtin",
    "load_mnist",
]

#: The 15 benchmark corruptions of CIFAR-10-C / CIFAR-100-C, in the benchmark's order.
CORRUPTION_NAMES_C: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
#: The four extra corruptions shipped in the same folders (validation set of the paper).
EXTRA_CORRUPTION_NAMES_C: tuple[str, ...] = (
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip

ROOT_OPTION = "--data.stream.init_args.root"

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------- entry point


def load_builtin(
    name: str, *, root: PathLike | None = None, download: bool = False, split_seed: int = 0,
    labels: str = "fine",
) -> SourceData:
    """A built-in source, cached in-process so several streams can share one parse.

    `split_seed` only affects `digits` (the others have an official split); `labels`
    ("fine" or "coarse") only applies to `cifar100`.
    """
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    if labels == "coarse" and name != "cifar100":
        raise ValueError(f"labels='coarse' only applies to source 'cifar100', not {name!r}")
    if name == "digits":
        return _load_cached("digits", None, int(split_seed), "fine")
    root_path = _require_root(name, root)
    _locate(name, root_path, download)  # fetches missing files first when download=True
    return _load_cached(name, str(root_path), 0, labels)


def clear_builtin_cache() -> None:
    _load_cached.cache_clear()


@lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None, split_seed: int, labels: str) -> SourceData:
    if name == "digits":
        return load_digits(split_seed)
    if name == "cifar100":
        return load_cifar100(root, labels=labels)
    loader: Callable[[PathLike], SourceData] = {
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
    }[name]
    return loader(root)


# --------------------------------------------------------------------------- digits


def load_digits(split_seed: int = 0) -> SourceData:
    """sklearn's bundled 8x8 digits, scaled to [0, 1], with a stratified 70/30 split.

    Digits has no official split, so `split_seed` picks one (1,257 / 540). Each side is
    kept in the original dataset order, so "source order" does not depend on the seed.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]  # (N, 1, 8, 8)
    targets = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(targets)), test_size=0.3, stratify=targets, random_state=split_seed
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    arrays = (images[idx_train], targets[idx_train], images[idx_test], targets[idx_test])
    return _source_data("digits", {"split_seed": int(split_seed)}, arrays, n_classes=10)


# --------------------------------------------------------------------------- MNIST (IDX)

_IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_mnist(root: PathLike | None, download: bool = False) -> SourceData:
    """MNIST from `<root>/MNIST/raw/` (IDX, plain or .gz): uint8 (N, 1, 28, 28), 60k/10k."""
    return _load_idx_source("mnist", root, download)


def load_fashion_mnist(root: PathLike | None, download: bool = False) -> SourceData:
    """Fashion-MNIST from `<root>/FashionMNIST/raw/`, same format as MNIST."""
    return _load_idx_source("fashion_mnist", root, download)


def _load_idx_source(name: str, root: PathLike | None, download: bool) -> SourceData:
    files = _locate(name, _require_root(name, root), download)
    arrays = []
    for split in ("train", "test"):
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
        if images.shape[1:] != (28, 28):
            raise DatasetFormatError(
                f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28"
            )
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)
        _check_labels(labels, len(images), 10, labels_path, images_path)
        arrays += [images[:, None], labels]
    return _source_data(name, {}, tuple(arrays), n_classes=10)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file: big-endian magic and dims, then the uint8 data.

    Not torchvision's `read_sn3_pascalvincent_tensor`: it opens only uncompressed files (the
    `.gz` archives a user copies are refused) and reports a bad magic number or a truncated file
    with a bare `AssertionError`; here each gives a one-line `DatasetFormatError` naming the file.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = bytearray(f.read())
        else:
            raw = bytearray(path.read_bytes())
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetFormatError(f"{path}: cannot read file ({e})") from e
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetFormatError(f"{path}: bad magic number {found}, expected {magic} (IDX)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: {len(raw) - header} data bytes but the header dims {dims} need "
            f"{expected} (truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)  # writable


# --------------------------------------------------------------------------- CIFAR (pickles)

_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(root: PathLike | None, download: bool = False) -> SourceData:
    """CIFAR-10 from `<root>/cifar-10-batches-py/`: uint8 (N, 3, 32, 32), 50k/10k."""
    files = _locate("cifar10", _require_root("cifar10", root), download)
    x_train, y_train = _read_cifar_split([files[f] for f in _CIFAR10_TRAIN], "labels", 10)
    x_test, y_test = _read_cifar_split([files["test_batch"]], "labels", 10)
    return _source_data("cifar10", {}, (x_train, y_train, x_test, y_test), n_classes=10)


def load_cifar100(
    root: PathLike | None, download: bool = False, labels: str = "fine"
) -> SourceData:
    """CIFAR-100 from `<root>/cifar-100-python/`, with 100 fine or 20 coarse labels."""
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    n_classes = 100 if labels == "fine" else 20
    files = _locate("cifar100", _require_root("cifar100", root), download)
    key = f"{labels}_labels"
    x_train, y_train = _read_cifar_split([files["train"]], key, n_classes)
    x_test, y_test = _read_cifar_split([files["test"]], key, n_classes)
    arrays = (x_train, y_train, x_test, y_test)
    return _source_data("cifar100", {"labels": labels}, arrays, n_classes=n_classes)


def _read_cifar_split(
    paths: list[Path], label_key: str, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in paths:
        batch = _read_cifar_pickle(path)
        for key in ("data", label_key):
            if key not in batch:
                raise DatasetFormatError(f"{path}: no {key!r} entry (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetFormatError(
                f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (n, 3072)"
            )
        labels = np.asarray(batch[label_key])
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise DatasetFormatError(f"{path}: {label_key!r} is not a flat list of integers")
        labels = labels.astype(np.int64)
        _check_labels(labels, len(data), n_classes, path)
        xs.append(data.reshape(-1, 3, 32, 32))  # R, G, B planes, each row-major 32x32
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file safely; keys come back as `str` whether stored as str or bytes.

    `latin1` is what Python 2 pickles of numpy arrays (the official files) need.
    """
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises many types (EOFError, ValueError, ...) on bad input
        raise DatasetFormatError(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _numpy_core(submodule: str) -> Any:
    """numpy 2 renamed `numpy.core` to `numpy._core`; pickles may name either."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


_ALLOWED_GLOBALS: Mapping[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,  # protocol-2 pickles encode bytes this way
    **{
        (f"numpy.{core}.multiarray", fn): (lambda fn=fn: getattr(_numpy_core("multiarray"), fn))
        for core in ("core", "_core")
        for fn in ("_reconstruct", "scalar")
    },
    **{
        (f"numpy.{core}.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer
        for core in ("core", "_core")
    },
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy's array-reconstruction globals: a pickle can run any callable it
    names, so a downloaded "dataset" must not be able to name `os.system`."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: only numpy array reconstruction is allowed"
            )
        return resolve()


# --------------------------------------------------------------------------- CIFAR-C (.npy)

_C_FOLDERS = {"cifar10": ("CIFAR-10-C", 10), "cifar100": ("CIFAR-100-C", 100)}
_C_URLS = {
    "cifar10": "https://zenodo.org/record/2535967",
    "cifar100": "https://zenodo.org/record/3555552",
}


def load_cifar_c(
    root: PathLike | None, *, dataset: str = "cifar10", corruption: str, severity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (corruption, severity) block of CIFAR-10-C / CIFAR-100-C.

    `<root>/CIFAR-10-C/<corruption>.npy` holds severities 1-5 in order, n = len / 5 each;
    it is memory-mapped so only the requested block is read. Returns uint8 (n, 3, 32, 32)
    images and int64 labels. There is no download.
    """
    if dataset not in _C_FOLDERS:
        raise ValueError(f"dataset must be one of {sorted(_C_FOLDERS)}, got {dataset!r}")
    valid = CORRUPTION_NAMES_C + EXTRA_CORRUPTION_NAMES_C
    if corruption not in valid:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(valid)}")
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    folder, n_classes = _C_FOLDERS[dataset]
    source = f"{dataset}_c"
    base = _require_root(source, root) / folder
    images_path, labels_path = base / f"{corruption}.npy", base / "labels.npy"
    missing = [(p,) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise _not_found(source, base.parent, missing, folder, download_hint=False)

    images, labels = _open_npy(images_path), _open_npy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DatasetFormatError(
            f"{images_path}: {images.dtype} {images.shape}, expected uint8 (n, 32, 32, 3)"
        )
    if len(images) % 5:
        raise DatasetFormatError(f"{images_path}: {len(images)} rows, not 5 equal severities")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"{labels_path}: {labels.dtype} {labels.shape}, expected (n,) int")
    _check_labels(labels, len(images), n_classes, labels_path, images_path)
    n = len(images) // 5
    rows = slice((severity - 1) * n, severity * n)
    x = np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2))  # reads only these rows
    y = np.array(labels[rows], dtype=np.int64)  # a copy, not a view of the memory map
    return torch.from_numpy(x), torch.from_numpy(y)


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npy array ({e})") from e


# --------------------------------------------------------------------------- files and errors

_FOLDERS = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}
_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


def _fix_hint(folder: str, download_hint: bool = True) -> str:
    hint = f"set `{ROOT_OPTION}` to the folder that contains `{folder}/`"
    return hint + (", or pass `download: true` (needs network)" if download_hint else "")


def _not_found(
    source: str,
    root: PathLike | None,
    missing: list[tuple[Path, ...]],
    folder: str,
    download_hint: bool = True,
) -> DatasetNotFoundError:
    lines = [f"source {source!r}: dataset files not found under root {str(root)!r}"]
    if root is not None and not Path(root).is_dir():
        lines[0] += " (the root folder does not exist)"
    lines.append("missing: " + "; ".join(" or ".join(map(str, alts)) for alts in missing))
    if source.endswith("_c"):
        url = _C_URLS[source[: -len("_c")]]
        lines.append(f"fix: {_fix_hint(folder, False)} (no download; get it from {url})")
    else:
        lines.append(f"fix: {_fix_hint(folder, download_hint)}")
    return DatasetNotFoundError("\n".join(lines))


def _require_root(source: str, root: PathLike | None) -> Path:
    if root is None:
        folder = _C_FOLDERS[source[:-2]][0] if source.endswith("_c") else _FOLDERS[source]
        hint = _fix_hint(folder, download_hint=not source.endswith("_c"))
        raise DatasetNotFoundError(
            f"source {source!r} needs a root folder (root=None); fix: {hint}"
        )
    return Path(root).expanduser().resolve()


def _required_files(name: str, root: Path) -> dict[str, tuple[Path, ...]]:
    """Each required file with its accepted alternatives (IDX may be gzipped)."""
    base = root / _FOLDERS[name]
    if name in ("mnist", "fashion_mnist"):
        return {k: (base / "raw" / f, base / "raw" / f"{f}.gz") for k, f in _IDX_FILES.items()}
    names = (*_CIFAR10_TRAIN, "test_batch") if name == "cifar10" else ("train", "test")
    return {f: (base / f,) for f in names}


def _locate(name: str, root: Path, download: bool) -> dict[str, Path]:
    """Find every required file, fetching with torchvision first only if asked and needed."""

    def find() -> dict[str, Path | None]:
        return {
            key: next((p for p in alts if p.is_file()), None)
            for key, alts in _required_files(name, root).items()
        }

    found = find()
    if download and None in found.values():
        _download(name, root)
        found = find()
    missing = [alts for key, alts in _required_files(name, root).items() if found[key] is None]
    if missing:
        raise _not_found(name, root, missing, _FOLDERS[name], download_hint=not download)
    return {key: path for key, path in found.items() if path is not None}


def _download(name: str, root: Path) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # network and mirror errors come in many types
        raise DatasetNotFoundError(
            f"source {name!r}: download into {str(root)!r} failed ({type(e).__name__}: {e}); "
            f"fix: {_fix_hint(_FOLDERS[name], download_hint=False)}"
        ) from e


# --------------------------------------------------------------------------- validation


def _check_labels(
    labels: np.ndarray, n_images: int, n_classes: int, path: Path, images_path: Path | None = None
) -> None:
    """One label per image, each in [0, n_classes)."""
    if len(labels) != n_images:
        images = f"{images_path} has {n_images}" if images_path else f"there are {n_images}"
        raise DatasetFormatError(f"{path}: {len(labels)} labels, but {images} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetFormatError(
            f"{path}: labels span [{labels.min()}, {labels.max()}], expected [0, {n_classes})"
        )



def _source_data(
    name: str, params: dict[str, Any], arrays: tuple[np.ndarray, ...], n_classes: int
) -> SourceData:
    return from_arrays(*arrays, name=name, n_classes=n_classes, params=params)
