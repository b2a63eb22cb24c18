"""Source loaders (spec `streams.md` §2, §6): formats, errors, caching, no silent download."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from sklearn.datasets import load_digits as sk_load_digits
from sklearn.model_selection import train_test_split

from adaptlab.streams.sources import (
    CORRUPTION_NAMES_C,
    SOURCES,
    DatasetFormatError,
    DatasetNotFoundError,
    clear_source_cache,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_source,
)

TORCHVISION_SOURCES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
TORCHVISION_CLASSES = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")
MNIST_FIX = (
    "set `--data.stream.init_args.root` to the folder that contains `MNIST/`, "
    "or pass `download: true` (needs network)"
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_source_cache()
    yield
    clear_source_cache()


@pytest.fixture
def no_download(monkeypatch):
    """Make every torchvision downloader fail loudly if it is ever constructed."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"torchvision download attempted: {args} {kwargs}")

    for cls in TORCHVISION_CLASSES:
        monkeypatch.setattr(torchvision.datasets, cls, forbidden)


def assert_matches(data, written):
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), getattr(written, f"x_{split}"))
        np.testing.assert_array_equal(y.numpy(), getattr(written, f"y_{split}"))
    assert data.n_classes == written.n_classes


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_ranges_and_stratification():
    data = load_digits()
    assert data.x_train.shape == (1257, 1, 8, 8) and data.x_test.shape == (540, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    x = torch.cat([data.x_train, data.x_test])
    assert x.min() == 0.0 and x.max() == 1.0  # 0..16 scaled by 1/16
    full = np.bincount(sk_load_digits().target, minlength=10)
    train = np.bincount(data.y_train.numpy(), minlength=10)
    test = np.bincount(data.y_test.numpy(), minlength=10)
    np.testing.assert_array_equal(train + test, full)
    assert np.all(np.abs(test - 0.3 * full) <= 1)  # stratified
    assert data.n_classes == 10


@pytest.mark.parametrize("split_seed", [0, 3])
def test_digits_split_is_sklearns_stratified_split_in_source_order(split_seed):
    digits = sk_load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(1797), test_size=0.3, stratify=digits.target, random_state=split_seed
    )
    data = load_digits(split_seed)
    for x, y, idx in (
        (data.x_train, data.y_train, idx_train),
        (data.x_test, data.y_test, idx_test),
    ):
        idx = np.sort(idx)
        np.testing.assert_array_equal(x[:, 0].numpy(), digits.images[idx] / 16)
        np.testing.assert_array_equal(y.numpy(), digits.target[idx])


def test_digits_is_deterministic_in_split_seed():
    a, b, c = load_digits(0), load_digits(0), load_digits(1)
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert c.fingerprint != a.fingerprint
    assert not torch.equal(a.x_test, c.x_test)
    # another split of the same 1,797 images
    total = lambda d: torch.cat([d.x_train, d.x_test]).sum(dim=(1, 2, 3)).sort().values
    assert torch.equal(total(a), total(c))


def test_load_source_caches_per_parameters():
    assert load_source() is load_source("digits", split_seed=0)
    assert load_source(split_seed=1) is not load_source(split_seed=0)
    assert load_source(split_seed=1).fingerprint == load_digits(1).fingerprint


def test_unknown_source_and_labels_are_value_errors():
    with pytest.raises(ValueError, match="cifar100") as info:
        load_source("imagenet")
    assert all(name in str(info.value) for name in SOURCES)
    with pytest.raises(ValueError, match="coarse"):
        load_source("mnist", root="/nonexistent", labels="coarse")
    with pytest.raises(ValueError, match="labels"):
        load_source("cifar100", root="/nonexistent", labels="medium")


# --------------------------------------------------------------------------- round trips


def test_mnist_round_trip(mnist_files, no_download):
    data = load_mnist(mnist_files.root)
    assert data.x_train.shape == (100, 1, 28, 28) and data.x_test.shape == (50, 1, 28, 28)
    assert int(data.x_train.min()) == 0 and int(data.x_train.max()) == 255
    assert_matches(data, mnist_files)
    assert data.name == "mnist"


def test_fashion_mnist_reads_its_own_folder(fashion_mnist_files, mnist_root, no_download):
    data = load_fashion_mnist(fashion_mnist_files.root)
    assert_matches(data, fashion_mnist_files)
    assert data.name == "fashion_mnist"
    assert not torch.equal(data.x_train, load_mnist(mnist_root).x_train)


def test_cifar10_round_trip(cifar10_files, no_download):
    data = load_cifar10(cifar10_files.root)
    assert data.x_train.shape == (50, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32)
    assert_matches(data, cifar10_files)
    assert sorted(data.y_train.unique().tolist()) == list(range(10))


def test_cifar_data_rows_are_rgb_planes(cifar10_root, source_writers):
    """Row layout: 1024 red values, then green, then blue, each plane row-major."""
    base = cifar10_root / "cifar-10-batches-py"
    batch = pickle.loads((base / "test_batch").read_bytes())
    data = np.zeros_like(batch["data"])
    data[:, :1024] = 7  # the whole red plane
    data[:, 1024 + 32 * 5 + 9] = 200  # green, row 5, column 9
    data[:, 2048 + 31] = 100  # blue, row 0, column 31
    source_writers.write_pickle(base / "test_batch", {**batch, "data": data})
    x = load_cifar10(cifar10_root).x_test
    assert (x[:, 0] == 7).all()
    assert (x[:, 1, 5, 9] == 200).all() and x[:, 1].sum() == 200 * len(x)
    assert (x[:, 2, 0, 31] == 100).all() and x[:, 2].sum() == 100 * len(x)


def test_cifar100_fine_and_coarse(cifar100_files, no_download):
    fine = load_cifar100(cifar100_files.root)
    assert fine.x_train.shape == (200, 3, 32, 32) and fine.n_classes == 100
    assert_matches(fine, cifar100_files)
    assert fine.y_train.min() == 0 and fine.y_train.max() == 99
    coarse = load_cifar100(cifar100_files.root, labels="coarse")
    assert coarse.n_classes == 20
    np.testing.assert_array_equal(coarse.y_train.numpy(), cifar100_files.extra["coarse_train"])
    np.testing.assert_array_equal(coarse.y_test.numpy(), cifar100_files.extra["coarse_test"])
    assert torch.equal(coarse.x_train, fine.x_train)
    assert coarse.fingerprint != fine.fingerprint


@pytest.mark.parametrize("name", TORCHVISION_SOURCES)
def test_load_source_dispatches_and_accepts_str_roots(
    name, mnist_root, fashion_mnist_root, cifar10_root, cifar100_root, no_download
):
    root = mnist_root  # all four fixtures write into one data root
    assert root == fashion_mnist_root == cifar10_root == cifar100_root
    loader = {
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
    }[name]
    direct = loader(root)
    data = load_source(name, root=str(root))
    assert data.name == name and data.fingerprint == direct.fingerprint
    assert torch.equal(data.x_train, direct.x_train)
    assert load_source(name, root=root) is data  # cached; Path and str are one key


def test_fingerprint_follows_content_not_location(cifar10_root, tmp_path, source_writers):
    copy = tmp_path / "elsewhere"
    shutil.copytree(cifar10_root, copy)
    assert load_cifar10(copy).fingerprint == load_cifar10(cifar10_root).fingerprint
    source_writers.write_cifar10(copy, seed=1)  # same shapes, other pixels
    assert load_cifar10(copy).fingerprint != load_cifar10(cifar10_root).fingerprint


# --------------------------------------------------------------------------- CIFAR-C


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar_c_severity_block(cifar10_c_files, severity):
    x, y = load_cifar_c(cifar10_c_files.root, corruption="fog", severity=severity)
    rows = slice((severity - 1) * 4, severity * 4)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(
        x.numpy(), cifar10_c_files.images["fog"][rows].transpose(0, 3, 1, 2)
    )
    np.testing.assert_array_equal(y.numpy(), cifar10_c_files.labels[rows])


def test_cifar100_c_uses_its_folder(source_writers, tmp_path):
    written = source_writers.write_cifar_c(tmp_path, dataset="cifar100", corruptions=("snow",))
    x, y = load_cifar_c(tmp_path, dataset="cifar100", corruption="snow", severity=2)
    np.testing.assert_array_equal(x.numpy(), written.images["snow"][4:8].transpose(0, 3, 1, 2))
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10-C"):
        load_cifar_c(tmp_path, dataset="cifar10", corruption="snow", severity=2)


def test_cifar_c_argument_and_file_errors(cifar10_c_root):
    assert len(CORRUPTION_NAMES_C) == 15 and "fog" in CORRUPTION_NAMES_C
    for bad in (0, 6):
        with pytest.raises(ValueError, match="severity"):
            load_cifar_c(cifar10_c_root, corruption="fog", severity=bad)
    with pytest.raises(ValueError, match="gaussian_noise"):
        load_cifar_c(cifar10_c_root, corruption="fgo", severity=1)
    with pytest.raises(DatasetNotFoundError) as info:  # a valid name that was not written
        load_cifar_c(cifar10_c_root, corruption="snow", severity=1)
    assert str(cifar10_c_root / "CIFAR-10-C" / "snow.npy") in str(info.value)
    assert "download: true" not in str(info.value)  # CIFAR-C has no download
    with pytest.raises(DatasetNotFoundError, match="root=None"):
        load_cifar_c(None, corruption="fog", severity=1)


def test_cifar_c_label_count_mismatch(cifar10_c_root):
    labels_path = cifar10_c_root / "CIFAR-10-C" / "labels.npy"
    np.save(labels_path, np.zeros(19, dtype=np.int64))
    with pytest.raises(DatasetFormatError, match=str(labels_path)):
        load_cifar_c(cifar10_c_root, corruption="fog", severity=1)


# --------------------------------------------------------------------------- not found


def test_missing_file_is_named(mnist_root, no_download):
    gone = mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    gone.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("mnist", root=mnist_root)
    message = str(info.value)
    assert str(gone) in message and str(mnist_root) in message and "'mnist'" in message
    assert MNIST_FIX in message
    assert "train-images" not in message  # only what is actually missing
    assert isinstance(info.value, FileNotFoundError)


def test_missing_cifar_batch_is_named(cifar10_root, no_download):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        load_cifar10(cifar10_root)
    assert "data_batch_2" not in str(info.value)
    assert "contains `cifar-10-batches-py/`" in str(info.value)


def test_missing_root_lists_every_path(tmp_path, no_download):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_source("mnist", root=root)
    message = str(info.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        assert str(root / "MNIST" / "raw" / name) in message
    assert "does not exist" in message and MNIST_FIX in message


@pytest.mark.parametrize("name", TORCHVISION_SOURCES)
def test_root_none_raises_with_fix(name, no_download):
    with pytest.raises(DatasetNotFoundError) as info:
        load_source(name)
    assert "set `--data.stream.init_args.root`" in str(info.value)
    assert "download: true" in str(info.value) and name in str(info.value)


# --------------------------------------------------------------------------- bad formats


@pytest.mark.parametrize("gz", [False, True])
def test_bad_magic_names_the_file(source_writers, tmp_path, gz):
    written = source_writers.write_mnist(tmp_path, gz=gz)
    path = tmp_path / "MNIST" / "raw" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    source_writers.write_idx(path, written.x_train[:, 0], magic=2049)
    with pytest.raises(DatasetFormatError, match="magic") as info:
        load_mnist(tmp_path)
    assert str(path) in str(info.value) and "2051" in str(info.value)


@pytest.mark.parametrize("edit", [lambda b: b[:-100], lambda b: b + b"\0"], ids=["cut", "extra"])
def test_idx_length_must_match_header(mnist_root, edit):
    path = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(DatasetFormatError, match="truncated or corrupt") as info:
        load_mnist(mnist_root)
    assert str(path) in str(info.value)


def test_truncated_gzip_names_the_file(source_writers, tmp_path):
    source_writers.write_mnist(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DatasetFormatError, match=str(path)):
        load_mnist(tmp_path)


def test_truncated_pickle_names_the_file(cifar10_root):
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetFormatError, match="unreadable pickle") as info:
        load_cifar10(cifar10_root)
    assert str(path) in str(info.value)


def test_label_count_and_range_are_checked(source_writers, mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    source_writers.write_idx(raw / "train-labels-idx1-ubyte", np.zeros(99, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="99 labels") as info:
        load_mnist(mnist_root)
    assert str(raw / "train-images-idx3-ubyte") in str(info.value)
    source_writers.write_idx(raw / "train-labels-idx1-ubyte", np.full(100, 10, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"expected \[0, 10\)"):
        load_mnist(mnist_root)


def test_wrong_image_size_is_checked(source_writers, mnist_root):
    path = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    source_writers.write_idx(path, np.zeros((50, 27, 27), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="28x28"):
        load_mnist(mnist_root)


def test_cifar_shape_keys_and_label_range_are_checked(source_writers, cifar100_root):
    path = cifar100_root / "cifar-100-python" / "test"
    batch = pickle.loads(path.read_bytes())
    source_writers.write_pickle(path, {**batch, "data": batch["data"][:, :3000]})
    with pytest.raises(DatasetFormatError, match="3072"):
        load_cifar100(cifar100_root)
    source_writers.write_pickle(path, {**batch, "fine_labels": [100] * len(batch["data"])})
    with pytest.raises(DatasetFormatError, match=r"\[0, 100\)"):
        load_cifar100(cifar100_root)
    assert load_cifar100(cifar100_root, labels="coarse").n_classes == 20  # coarse still valid
    source_writers.write_pickle(path, {"data": batch["data"]})
    with pytest.raises(DatasetFormatError, match="coarse_labels"):
        load_cifar100(cifar100_root, labels="coarse")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetFormatError, match="dict"):
        load_cifar100(cifar100_root)


class _RunShell:
    """A pickle payload: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_not_executed(cifar10_root, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _RunShell(f"touch {marker}"), "labels": []})
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError, match="refusing global") as info:
        load_cifar10(cifar10_root)
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()
    pickle.loads(payload)  # control: the payload is live under a plain unpickler
    assert marker.exists()


@pytest.mark.parametrize("target", [eval, exec, getattr, shutil.rmtree])
def test_other_dangerous_globals_are_refused(cifar10_root, target):
    class Payload:
        def __reduce__(self):
            return (target, ("1",))

    path = cifar10_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(DatasetFormatError, match="refusing global"):
        load_cifar10(cifar10_root)


# --------------------------------------------------------------------------- download


def test_download_is_never_called_by_default(mnist_root, cifar10_root, tmp_path, no_download):
    load_source("mnist", root=mnist_root)
    load_cifar10(cifar10_root)
    with pytest.raises(DatasetNotFoundError):  # not the AssertionError of `no_download`
        load_source("fashion_mnist", root=tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError):
        load_cifar100(tmp_path / "empty")


def test_download_fetches_only_missing_files(monkeypatch, source_writers, tmp_path):
    calls = []

    def fake_mnist(root, train=True, download=False):
        calls.append((root, download))
        source_writers.write_mnist(Path(root))

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    data = load_source("mnist", root=tmp_path, download=True)
    assert calls == [(str(tmp_path.resolve()), True)]
    assert data.x_train.shape == (100, 1, 28, 28)
    clear_source_cache()
    load_mnist(tmp_path, download=True)  # files exist now: nothing to fetch
    assert len(calls) == 1


def test_failed_download_is_a_not_found_error(monkeypatch, tmp_path):
    def offline(root, train=True, download=False):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetNotFoundError, match="no network") as info:
        load_source("cifar10", root=tmp_path, download=True)
    assert "cifar-10-batches-py" in str(info.value)
