"""Your own data (README "Your own data"): every route to a source — arrays, a Dataset, a file,
a registered name — gives the same stream and the same results, through Python and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from adaptlab.cli import main
from adaptlab.data import StreamDataModule
from adaptlab.strategies import TAME, Finetune
from adaptlab.streams import Permuted, Split
from adaptlab.streams.sources import (
    SourceError,
    available_sources,
    clear_source_cache,
    from_arrays,
    from_dataset,
    load_source,
    register_source,
)
from tests.helpers import fit, learner_kwargs

ROOT = Path(__file__).resolve().parents[1]
STREAM = {"classes_per_segment": 2, "labels": "local", "batch_size": 10, "repeats": 2, "seed": 0}
FINETUNE = {"backbone": "conv1d", "backbone_args": {"channels": [8], "hidden": 32},
            "lr": 0.05, "seed": 0}
TAME_KW = {"backbone": "mlp", "backbone_args": {"hidden": [32]}, "seed": 0,
           "memory": {"selector_capacity": 100, "retrain_capacity": 10},
           "selector": {"epochs": 5}, "pruning": {"retrain_epochs": 5},
           "detector": {"window": 30, "grace_steps": 10}}


def signals(n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """A 10-class 1-D signal set as a user holds it: float64 (N, 40) features, int32 labels.
    Class c is a sine of frequency c + 1 with a random phase, in noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.int32)
    rng.shuffle(y)
    t = np.linspace(0.0, 1.0, 40)
    phase = rng.uniform(0, 0.5, (n, 1))
    x = np.sin(2 * np.pi * (y[:, None] + 1) * (t[None] + phase)) + 0.5 * rng.normal(size=(n, 40))
    cut = int(0.7 * n)
    return {"x_train": x[:cut], "y_train": y[:cut], "x_test": x[cut:], "y_test": y[cut:]}


class SignalDataset(torch.utils.data.Dataset):
    """A map-style Dataset yielding (numpy float64 row, numpy int32 label)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_source_cache()
    yield
    clear_source_cache()


def _python_run(source, learner_cls, kw, tmp_path: Path) -> dict:
    stream = Split(source=source, **STREAM).build()
    dm = StreamDataModule(stream, batches_per_step=10)
    learner = learner_cls(**learner_kwargs(stream, **kw))
    ev = fit(learner, dm, tmp_path)
    return json.loads((Path(ev.trainer_log_dir) / "metrics.json").read_text())


def _cli_run(source: str, learner: str, kw: dict, tmp_path: Path, tag: str) -> dict:
    config = {
        "seed_everything": 0, "threads": 1,
        "model": {"class_path": f"adaptlab.strategies.{learner}", "init_args": kw},
        "data": {"stream": {"class_path": "adaptlab.streams.Split",
                            "init_args": {"source": source, **STREAM}},
                 "batches_per_step": 10},
        "trainer": {"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "logs"), "name": tag}},
                    "enable_checkpointing": False},
        "progress_bar": {"refresh_rate": 0},
        "evaluator": {"print_table": False, "figures": False},
    }
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return json.loads(next((tmp_path / "logs" / tag).rglob("metrics.json")).read_text())


@pytest.mark.parametrize("learner_cls,kw", [(Finetune, FINETUNE), (TAME, TAME_KW)],
                         ids=["Finetune", "TAME"])
def test_every_route_gives_the_same_run(learner_cls, kw, tmp_path) -> None:
    data = signals()
    npz = tmp_path / "mine.npz"
    np.savez(npz, **data)
    register_source("mine", lambda: data, replace=True)
    routes = {
        "arrays": from_arrays(*data.values(), name="mine"),
        "dataset": from_dataset(SignalDataset(data["x_train"], data["y_train"]),
                                SignalDataset(data["x_test"], data["y_test"]), name="mine"),
        "file": str(npz),
        "registered": "mine",
    }
    fingerprints = {r: load_source(s).fingerprint for r, s in routes.items()}
    assert len(set(fingerprints.values())) == 1, fingerprints
    docs = {r: _python_run(s, learner_cls, kw, tmp_path / r) for r, s in routes.items()}
    name = learner_cls.__name__
    docs["file (CLI)"] = _cli_run(str(npz), name, kw, tmp_path, "file")
    docs["registered (CLI)"] = _cli_run("mine", name, kw, tmp_path, "registered")
    ref = docs["arrays"]
    assert ref["status"] == "completed" and ref["stream"]["name"] == "split_mine"
    assert ref["final"]["acc_online"] > 0.5 + 0.1  # it learns (local labels: 2 per segment)
    for route, doc in docs.items():
        assert doc["stream"]["fingerprint"] == ref["stream"]["fingerprint"], route
        assert doc["accuracy_matrix"] == ref["accuracy_matrix"], route
        assert doc["final"]["acc_final"] == ref["final"]["acc_final"], route


def test_casts_and_shapes() -> None:
    data = signals(200)
    src = from_arrays(*data.values())
    assert src.x_train.dtype == torch.float32 and src.y_train.dtype == torch.int64
    assert src.sample_shape == (40,) and not src.is_image and src.n_classes == 10
    for shape in [(40,), (1, 40), (2, 20), (1, 5, 8)]:
        x_tr, x_te = data["x_train"].reshape(-1, *shape), data["x_test"].reshape(-1, *shape)
        src = from_arrays(x_tr, data["y_train"], x_te, data["y_test"], name="s")
        permuted = Permuted(source=src, n_segments=3, identity_first=True).build()
        assert permuted.input_shape == shape and permuted.name == "permuted_s"
        # segment 1 permutes positions: same values per sample, another order
        first, second = permuted.test_sets[0][0], permuted.test_sets[1][0]
        assert not torch.equal(first, second)
        assert torch.equal(first.flatten(1).sort(1).values, second.flatten(1).sort(1).values)
    # uint8 stays pixels; wider integer labels become int64
    img = np.zeros((20, 1, 4, 4), np.uint8)
    src = from_arrays(img, np.arange(20, dtype=np.uint16) % 2, img, np.arange(20) % 2)
    assert src.x_train.dtype == torch.uint8 and src.y_train.dtype == torch.int64


def test_torchvision_style_dataset_of_pil_images() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)

    class Pictures(torch.utils.data.Dataset):
        classes = ["cat", "dog", "owl"]

        def __len__(self) -> int:
            return len(pixels)

        def __getitem__(self, i: int):
            return Image.fromarray(pixels[i]), i % 3

    src = from_dataset(Pictures(), Pictures())
    assert src.name == "pictures" and src.n_classes == 3 and src.x_train.dtype == torch.uint8
    assert torch.equal(src.x_train, torch.from_numpy(pixels).permute(0, 3, 1, 2))


def test_registered_and_entry_point_names_are_listed() -> None:
    register_source("listed_here", lambda: signals(100), replace=True)
    assert "listed_here" in available_sources()
    with pytest.raises(SourceError, match="already registered"):
        register_source("listed_here", lambda: signals(100))
    with pytest.raises(SourceError, match="built-in"):
        register_source("digits", lambda: signals(100))


BAD = [
    ("labels as floats", {"y_train": "float"},
     "y_train: labels must be integer class ids, got float64 (if they are whole numbers, cast "
     "them: y.astype(int))"),
    ("NaN", {"x_train": "nan"},
     "x_train: NaN or inf at sample 3 (after the cast to float32); clean or drop those samples"),
    ("label out of range", {"n_classes": 5},
     "y_train labels span [0, 9], expected [0, 5) (n_classes=5 was given)"),
    ("negative label", {"y_test": "negative"},
     "y_test: label -1 is negative; class ids run from 0 to n_classes - 1"),
    ("shape mismatch", {"x_test": "short"},
     "train samples are (40,) but test samples are (39,); both splits need one sample shape"),
    ("empty split", {"x_test": "empty"}, "the test split is empty"),
    ("one feature, no axis", {"x_train": "flat"},
     "x_train: shape (70,) has no sample axis; samples are rows: (N, D) features, (N, C, L) "
     "sequences or (N, C, H, W) images (one feature per sample: reshape to (N, 1))"),
]


def _corrupt(data: dict, change: dict) -> tuple[dict, int | None]:
    data = {k: v.copy() for k, v in data.items()}
    n_classes = change.pop("n_classes", None)
    for key, how in change.items():
        if how == "float":
            data[key] = data[key].astype(np.float64)
        elif how == "nan":
            data[key][3, 7] = np.nan
        elif how == "negative":
            data[key][0] = -1
        elif how == "short":
            data[key] = data[key][:, :39]
        elif how == "empty":
            data[key], data["y_test"] = data[key][:0], data["y_test"][:0]
        elif how == "flat":
            data[key] = data[key][:, 0]
    return data, n_classes


@pytest.mark.parametrize("what,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_one_line_through_the_cli(what, change, message, tmp_path, capsys) -> None:
    data, n_classes = _corrupt(signals(100), dict(change))
    npz = tmp_path / "bad.npz"
    np.savez(npz, **data, **({} if n_classes is None else {"n_classes": n_classes}))
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
              "--data.stream.init_args.source", str(npz),
              "--trainer.logger.init_args.save_dir", str(logs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1
    assert err[-1] == f"adaptlab: error: source 'bad': {message}", err
    assert "Traceback" not in "\n".join(err)
    assert not logs.exists() or not any(logs.rglob("metrics.json"))  # nothing half-written


@pytest.mark.parametrize("extra,message", [
    (["--data.stream.init_args.class_order", "[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]"],
     "class_order: classes [0] appear more than once"),
    (["--data.stream.init_args.segments", "[[0, 1], [1, 2]]"],
     "segments: classes [1] appear more than once"),
    (["--data.stream.init_args.source", "mine_unknown"], "unknown source 'mine_unknown'"),
    (["--data.stream.init_args.source", "nowhere.npz"], "source file 'nowhere.npz' not found"),
    (["--model.init_args.backbone", "lenet", "--model.init_args.backbone_args", "{}"],
     "is not an image (C, H, W) for lenet"),
])
def test_bad_options_are_one_line(extra, message, tmp_path, capsys) -> None:
    npz = tmp_path / "mine.npz"
    np.savez(npz, **signals(100))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
              "--data.stream.init_args.source", str(npz), *extra,
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_loader_arguments_it_does_not_take(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_data.py").write_text(
        "def load_waves(noise=0.5):\n    raise AssertionError('not called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
              "--data.stream.init_args.source", "my_data:load_waves",
              "--data.stream.init_args.source_args", "{bogus: 1}",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1
    assert err[-1] == ("adaptlab: error: source_args: load_waves() got an unexpected keyword "
                       "argument 'bogus' (source 'my_data:load_waves')")


def test_more_user_mistakes_are_one_line(tmp_path, monkeypatch, capsys) -> None:
    """What a new user tried (a review): a .csv file, a loader that raises, a .pt of numpy
    arrays, labels with gaps or huge ids."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "t.csv").write_text("1,2\n3,4\n")
    (tmp_path / "flaky.py").write_text("def load():\n    raise RuntimeError('db down')\n")
    data = signals(100)
    torch.save(dict(data), tmp_path / "arrays.pt")
    gaps = {k: (v * 2 if k.startswith("y") else v) for k, v in data.items()}  # 0, 2, …, 18
    np.savez(tmp_path / "gaps.npz", **gaps)
    cases = {
        "t.csv": "source 't.csv': only .npz and .pt files are read; save x_train, y_train, "
                 "x_test, y_test with numpy.savez (.npz) or as tensors with torch.save (.pt)",
        "flaky:load": "source 'flaky:load': the loader raised RuntimeError: db down "
                      "(ADAPTLAB_DEBUG=1 shows the trace)",
        "arrays.pt": f"{tmp_path / 'arrays.pt'}: holds objects other than tensors (e.g. numpy "
                     "arrays), which are not unpickled; save tensors (torch.from_numpy) or use "
                     "numpy.savez (.npz)",
        "gaps.npz": "segments: classes [1, 3, 5, 7, 9, 11, 13, 15, 17] have no training samples "
                    "in source 'gaps'; remap the labels to 0..n-1 or name the segments' classes "
                    "explicitly (`segments:`)",
    }
    for source, message in cases.items():
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
                  "--data.stream.init_args.source", source,
                  "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 1 and err[-1] == f"adaptlab: error: {message}", err


def test_channels_last_images_are_flagged() -> None:
    x = np.zeros((20, 12, 12, 3), np.uint8)
    with pytest.warns(UserWarning, match=r"look channels-last \(H, W, C\)"):
        from_arrays(x, np.arange(20) % 2, x, np.arange(20) % 2)


def test_rotated_refuses_non_images() -> None:
    from adaptlab.streams import Rotated

    with pytest.raises(ValueError, match=re.escape("Rotated: needs images (C, H, W)")):
        Rotated(source=from_arrays(*signals(100).values(), name="s")).build()


def test_readme_snippets_run(tmp_path, monkeypatch) -> None:
    """Every Python block of the README's "Your own data" section runs as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_custom_stream_class_from_the_current_folder(tmp_path, monkeypatch, capsys) -> None:
    """`class_path: my_streams.Halves` names a StreamBuilder subclass in the folder the command
    runs from, with no PYTHONPATH set."""
    (tmp_path / "my_streams.py").write_text(
        "from adaptlab.streams import SegmentData, StreamBuilder\n\n\n"
        "class Halves(StreamBuilder):\n"
        "    kind = 'halves'\n\n"
        "    def _make_segments(self, src):\n"
        "        out = []\n"
        "        for s, keep in enumerate((lambda y: y < 5, lambda y: y >= 5)):\n"
        "            tr, te = keep(src.y_train), keep(src.y_test)\n"
        "            out.append(SegmentData(f'half_{s}', 'halves', {}, src.x_train[tr],\n"
        "                                   src.y_train[tr], src.x_test[te], src.y_test[te]))\n"
        "        return out\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    main(["fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
          "--data.stream", "my_streams.Halves", "--data.stream.init_args.batch_size", "10",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
          "--evaluator.print_table", "false", "--progress_bar.refresh_rate", "0"])
    doc = json.loads(next((tmp_path / "logs").rglob("metrics.json")).read_text())
    assert doc["status"] == "completed" and doc["stream"]["name"] == "halves_digits"
    assert len(doc["accuracy_matrix"]["columns"]) == 2
