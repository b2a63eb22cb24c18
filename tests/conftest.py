"""Shared fixtures: tiny dataset files in the real on-disk formats (spec `streams.md` §6).

Each `write_*` helper writes one dataset under a root, laid out as torchvision's downloaders
do, and returns what a loader must read back (images already as (N, C, H, W) uint8).
Use the `*_root` fixtures for a ready root, or `source_writers` to write other sizes:

    def test_something(source_writers, tmp_path):
        root = source_writers.write_mnist(tmp_path, n_train=500).root
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class WrittenSource:
    """What was written: the root to pass as `root=` and the arrays a loader must return."""

    root: Path
    x_train: np.ndarray  # (N, C, H, W) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. CIFAR-100 coarse labels


@dataclass(frozen=True)
class WrittenCorruptions:
    root: Path
    images: dict[str, np.ndarray]  # corruption -> (5 * n, 32, 32, 3) uint8, severities in order
    labels: np.ndarray  # (5 * n,)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x.flat[0], x.flat[-1] = 0, 255  # make sure the full uint8 range occurs
    return x


def _labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """Every class occurs (when n >= n_classes), in a seeded order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


# --------------------------------------------------------------------------- IDX (MNIST)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """IDX: big-endian magic (0x08 = uint8, then ndim), big-endian dims, raw bytes.

    Gzipped when `path` ends in `.gz`. `magic` overrides the header for broken files.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist(
    root: Path,
    folder: str = "MNIST",
    *,
    n_train: int = 100,
    n_test: int = 50,
    gz: bool = False,
    seed: int = 0,
) -> WrittenSource:
    """`<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`."""
    rng = np.random.default_rng(seed)
    raw, suffix = Path(root) / folder / "raw", ".gz" if gz else ""
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = _images(rng, n, (28, 28)), _labels(rng, n, 10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x[:, None], y
    return WrittenSource(Path(root), n_classes=10, **arrays)


# --------------------------------------------------------------------------- CIFAR pickles


def write_pickle(path: Path, obj: dict[str, Any], key_style: str = "str") -> Path:
    """Pickle a dict as CIFAR files are found in the wild.

    key_style: "str" (Python 3, newest protocol), "bytes" (bytes keys, protocol 2, as
    re-pickled with `encoding="bytes"`), or "python2" (the official files' format).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if key_style == "python2":
        path.write_bytes(python2_pickle(obj))
    elif key_style == "bytes":
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2))
    elif key_style == "str":
        path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        raise ValueError(f"unknown key_style {key_style!r}")
    return path


def write_cifar10(
    root: Path, *, n_per_batch: int = 10, n_test: int = 10, key_style: str = "str", seed: int = 0
) -> WrittenSource:
    """`<root>/cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    x_train, y_train = _images(rng, 5 * n_per_batch, (3, 32, 32)), _labels(rng, 5 * n_per_batch, 10)
    x_test, y_test = _images(rng, n_test, (3, 32, 32)), _labels(rng, n_test, 10)
    for i in range(5):
        rows = slice(i * n_per_batch, (i + 1) * n_per_batch)
        batch = _cifar_batch(
            f"training batch {i + 1} of 5", x_train[rows], {"labels": y_train[rows]}
        )
        write_pickle(base / f"data_batch_{i + 1}", batch, key_style)
    write_pickle(
        base / "test_batch",
        _cifar_batch("testing batch 1 of 1", x_test, {"labels": y_test}),
        key_style,
    )
    meta = {
        "label_names": [f"class{c}" for c in range(10)],
        "num_cases_per_batch": n_per_batch,
        "num_vis": 3072,
    }
    write_pickle(base / "batches.meta", meta, key_style)
    return WrittenSource(Path(root), x_train, y_train, x_test, y_test, n_classes=10)


def write_cifar100(
    root: Path, *, n_train: int = 200, n_test: int = 100, key_style: str = "str", seed: int = 0
) -> WrittenSource:
    """`<root>/cifar-100-python/`: train, test, meta; coarse label = fine // 5 here."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n, (3, 32, 32)), _labels(rng, n, 100)
        coarse = fine // 5
        batch = _cifar_batch(split, x, {"fine_labels": fine, "coarse_labels": coarse})
        write_pickle(base / split, batch, key_style)
        arrays[f"x_{split}"], arrays[f"y_{split}"], arrays[f"coarse_{split}"] = x, fine, coarse
    meta = {
        "fine_label_names": [f"fine{c}" for c in range(100)],
        "coarse_label_names": [f"coarse{c}" for c in range(20)],
    }
    write_pickle(base / "meta", meta, key_style)
    coarse = {k: arrays.pop(k) for k in ("coarse_train", "coarse_test")}
    return WrittenSource(Path(root), n_classes=100, extra=coarse, **arrays)


def _cifar_batch(batch_label: str, x: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """A batch dict: `data` is (n, 3072), the R, G, B planes of each image, row-major."""
    return {
        "batch_label": batch_label,
        "data": x.reshape(len(x), 3 * 32 * 32),
        **{key: [int(v) for v in values] for key, values in labels.items()},  # plain lists
        "filenames": [f"img_{i:05d}.png" for i in range(len(x))],
    }


def python2_pickle(obj: dict[str, Any]) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle wrote the official CIFAR files: `str` as byte
    strings, arrays via `numpy.core.multiarray._reconstruct` (hand-assembled opcodes)."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    _py2_dump(obj, out)
    return bytes(out + b".")  # STOP


def _py2_dump(value: Any, out: bytearray) -> None:
    if isinstance(value, dict):
        out += b"}("  # EMPTY_DICT, MARK
        for key, item in value.items():
            _py2_dump(key, out)
            _py2_dump(item, out)
        out += b"u"  # SETITEMS
    elif isinstance(value, (list, tuple)):
        out += b"(" if isinstance(value, tuple) else b"]("  # (EMPTY_LIST), MARK
        for item in value:
            _py2_dump(item, out)
        out += b"t" if isinstance(value, tuple) else b"e"  # TUPLE / APPENDS
    elif isinstance(value, (str, bytes)):
        data = value.encode("latin1") if isinstance(value, str) else value
        if len(data) < 256:
            out += b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<I", len(data)) + data  # BINSTRING
    elif value is None:
        out += b"N"
    elif isinstance(value, (int, np.integer)):
        out += b"J" + struct.pack("<i", int(value))  # BININT
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8:
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"  # GLOBAL x2
        _py2_dump((0,), out)
        _py2_dump("b", out)
        out += b"\x87R("  # TUPLE3, REDUCE -> empty array; MARK for its state
        _py2_dump(1, out)
        _py2_dump(tuple(value.shape), out)
        out += b"cnumpy\ndtype\n"
        _py2_dump(("u1", 0, 1), out)
        out += b"R"  # REDUCE -> dtype; then its state and BUILD
        _py2_dump((3, "|", None, None, None, -1, -1, 0), out)
        out += b"b\x89"  # BUILD, NEWFALSE (not Fortran order)
        _py2_dump(value.tobytes(), out)
        out += b"tb"  # TUPLE (array state), BUILD
    else:
        raise TypeError(f"python2_pickle cannot write {type(value).__name__}")


# --------------------------------------------------------------------------- CIFAR-C


def write_cifar_c(
    root: Path,
    *,
    dataset: str = "cifar10",
    corruptions: tuple[str, ...] = ("gaussian_noise", "fog"),
    n_per_severity: int = 4,
    seed: int = 0,
) -> WrittenCorruptions:
    """`<root>/CIFAR-10-C/<corruption>.npy` (5 severities in order) and `labels.npy`."""
    rng = np.random.default_rng(seed)
    folder, n_classes = {"cifar10": ("CIFAR-10-C", 10), "cifar100": ("CIFAR-100-C", 100)}[dataset]
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    labels = np.tile(_labels(rng, n_per_severity, n_classes), 5).astype(np.uint8)
    np.save(base / "labels.npy", labels)
    images = {}
    for name in corruptions:
        images[name] = _images(rng, 5 * n_per_severity, (32, 32, 3))
        np.save(base / f"{name}.npy", images[name])
    return WrittenCorruptions(Path(root), images, labels)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """One folder shared by the `*_root` fixtures, like a real data root."""
    return tmp_path / "data"


@pytest.fixture
def source_writers() -> SimpleNamespace:
    """The writer helpers, for tests that need other sizes or broken files."""
    return SimpleNamespace(
        write_idx=write_idx,
        write_mnist=write_mnist,
        write_pickle=write_pickle,
        python2_pickle=python2_pickle,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_cifar_c=write_cifar_c,
    )


@pytest.fixture(params=["plain", "gz"])
def mnist_files(request: pytest.FixtureRequest, data_root: Path) -> WrittenSource:
    return write_mnist(data_root, gz=request.param == "gz")


@pytest.fixture
def mnist_root(data_root: Path) -> Path:
    """A root holding `MNIST/raw/` (100 train / 50 test, every class present)."""
    return write_mnist(data_root).root


@pytest.fixture(params=["plain", "gz"])
def fashion_mnist_files(request: pytest.FixtureRequest, data_root: Path) -> WrittenSource:
    return write_mnist(data_root, "FashionMNIST", gz=request.param == "gz", seed=1)


@pytest.fixture
def fashion_mnist_root(data_root: Path) -> Path:
    return write_mnist(data_root, "FashionMNIST", seed=1).root


@pytest.fixture(params=["str", "bytes", "python2"])
def cifar10_files(request: pytest.FixtureRequest, data_root: Path) -> WrittenSource:
    return write_cifar10(data_root, key_style=request.param)


@pytest.fixture
def cifar10_root(data_root: Path) -> Path:
    """A root holding `cifar-10-batches-py/` (50 train / 10 test)."""
    return write_cifar10(data_root).root


@pytest.fixture
def cifar10_bytes_keys_root(data_root: Path) -> Path:
    return write_cifar10(data_root, key_style="bytes").root


@pytest.fixture(params=["str", "bytes", "python2"])
def cifar100_files(request: pytest.FixtureRequest, data_root: Path) -> WrittenSource:
    return write_cifar100(data_root, key_style=request.param)


@pytest.fixture
def cifar100_root(data_root: Path) -> Path:
    """A root holding `cifar-100-python/` (200 train / 100 test, fine and coarse labels)."""
    return write_cifar100(data_root).root


@pytest.fixture
def cifar10_c_files(data_root: Path) -> WrittenCorruptions:
    return write_cifar_c(data_root)


@pytest.fixture
def cifar10_c_root(cifar10_c_files: WrittenCorruptions) -> Path:
    """A root holding `CIFAR-10-C/` with gaussian_noise and fog, 4 images per severity."""
    return cifar10_c_files.root
