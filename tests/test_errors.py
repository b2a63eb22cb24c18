"""The bad-input catalogue (README "Errors"): every entry gives a clear message, a non-zero
exit and leaves what earlier runs wrote untouched.

Entries run the real CLI in-process (`adaptlab.cli.main`), as `adaptlab fit` would.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "configs/finetune/split_digits.yaml")
REPLAY = str(ROOT / "configs/replay/split_digits.yaml")
S = "--data.stream.init_args."
M = "--model.init_args."
SMALL = [f"{S}max_samples_per_segment", "40", f"{S}test_samples_per_segment", "20",
         f"{S}repeats", "1", "--progress_bar.refresh_rate", "0"]


def cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    return int(info.value.code or 0), err


def fit(config: str, *extra: str, logs: Path) -> list[str]:
    return ["fit", "--config", config, *SMALL, "--trainer.logger.init_args.save_dir", str(logs),
            *extra]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """An earlier, completed run in a log folder, and its checkpoint."""
    logs = tmp_path_factory.mktemp("logs")
    main(fit(FINETUNE, logs=logs))
    ckpt = next(logs.rglob("*.ckpt"))
    return logs, ckpt


def _bad_mnist(root: Path, writers, what: str) -> Path:
    written = writers.write_mnist(root, n_train=40, n_test=20)
    raw = root / "MNIST" / "raw"
    if what == "magic":
        writers.write_idx(raw / "train-images-idx3-ubyte", written.x_train[:, 0], magic=1234)
    elif what == "labels":
        writers.write_idx(raw / "train-labels-idx1-ubyte",
                          np.full(40, 11, dtype=np.uint8))
    return root


CATALOGUE = [
    # (id, extra args or callable(tmp, writers) -> extra args, message fragment)
    ("unknown config key", [f"{M}learning_rate", "0.1"], "learning_rate"),
    ("unknown strategy", ["--model", "NoSuchLearner"], "NoSuchLearner"),
    ("unknown stream class", ["--data.stream", "adaptlab.streams.Nope"], "Nope"),
    ("wrong type", [f"{S}batch_size", "ten"], "batch_size"),
    ("zero batch size", [f"{S}batch_size", "0"], "batch_size: must be a positive integer"),
    ("negative passes", [f"{S}repeats", "-1"], "repeats: must be a positive integer"),
    ("zero batches per step", ["--data.batches_per_step", "0"], "batches_per_step"),
    ("batch larger than the stream", [f"{S}batch_size", "100000"], "larger than the stream"),
    ("missing dataset root", lambda t, w: [f"{S}source", "mnist", f"{S}root",
                                           str(t / "nowhere")], "not found under root"),
    ("torchvision source without root", [f"{S}source", "mnist"], "root"),
    ("corrupt dataset file", lambda t, w: [f"{S}source", "mnist", f"{S}root",
                                           str(_bad_mnist(t / "bad", w, "magic"))], "magic"),
    ("labels out of range", lambda t, w: [f"{S}source", "mnist", f"{S}root",
                                          str(_bad_mnist(t / "lab", w, "labels"))],
     "labels span"),
    ("empty stream", [f"{S}segments", "[]"], "no segments"),
    ("stream with one class", [f"{S}segments", "[[3]]"], "one class"),
    ("class missing from the source", [f"{S}segments", "[[0, 12]]"], "not in source"),
    ("order names no segment", [f"{S}order", "[0, 7]"], "not segment ids"),
    ("transition wider than a segment", [f"{S}transition", "500"], "transition"),
    ("unknown backbone", [f"{M}backbone", "vgg"], "unknown 'vgg'"),
    ("backbone argument it does not take", [f"{M}backbone_args", "{hidden: [64], depth: 3}"],
     "backbone_args"),
    ("unknown optimizer", [f"{M}optimizer", "lion"], "optimizer: unknown 'lion'"),
    ("non-positive learning rate", [f"{M}lr", "0"], "lr: must be > 0"),
    ("bad NaN policy", [f"{M}nonfinite", "ignore"], "nonfinite"),
    ("more than one epoch", ["--trainer.max_epochs", "2"], "max_epochs: must be 1"),
    ("zero threads", ["--threads", "0"], "threads"),
    ("NaN loss during training", [f"{M}lr", "1e30"], "training loss became"),
    ("unwritable log dir", lambda t, w: ["--trainer.logger.init_args.save_dir",
                                         str(_file(t / "afile") / "logs")], "not writable"),
    ("missing config file", lambda t, w: ["--config", str(t / "nope.yaml")], "nope.yaml"),
]


def _file(p: Path) -> Path:
    p.write_text("not a folder")
    return p


def readme_catalogue() -> dict[str, tuple[int, str]]:
    """README "Errors" rows: name -> (exit code, message); `…` elides a machine-specific part."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[2].isdigit() and cells[3].startswith("adaptlab: error:"):
            rows[cells[0]] = (int(cells[2]), cells[3].replace("\\|", "|"))
    return rows


README_ROWS = readme_catalogue()


def matches(message: str, line: str) -> bool:
    """The whole line, with each `…` standing for any text."""
    pattern = ".*".join(re.escape(part) for part in message.split("…"))
    return re.fullmatch(pattern, line) is not None


@pytest.mark.parametrize(("name", "extra", "fragment"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_gives_one_clear_error(name, extra, fragment, tmp_path, capsys,
                                         source_writers, finished_run):
    logs, ckpt = finished_run
    earlier = ckpt.parents[1]  # the earlier run's version folder
    before = digest(earlier)
    args = extra(tmp_path, source_writers) if callable(extra) else extra
    code, err = cli(fit(FINETUNE, *args, logs=logs), capsys)
    assert code != 0, name
    assert fragment in err, err[-1500:]
    exit_code, message = README_ROWS[name]  # what the README promises, exactly
    assert code == exit_code, (name, code)
    assert matches(message, err.strip().splitlines()[-1]), (message, err[-600:])
    assert "Traceback" not in err
    assert digest(earlier) == before  # what the earlier run wrote is untouched
    for doc in logs.rglob("metrics.json"):  # a failed run says so in its own folder
        assert doc.parent == earlier or '"status": "completed"' not in doc.read_text()


def test_checkpoint_from_another_strategy(finished_run, capsys, tmp_path):
    logs, ckpt = finished_run
    before = digest(logs)
    code, err = cli(fit(REPLAY, "--ckpt_path", str(ckpt), logs=tmp_path), capsys)
    assert code == 1 and "written by learner Finetune, not Replay" in err
    assert digest(logs) == before
    code, err = cli(fit(FINETUNE, f"{M}lr", "0.2", "--ckpt_path", str(ckpt), logs=tmp_path),
                    capsys)
    assert code == 1 and "model.lr=0.05" in err


def test_checkpoint_from_another_stream(finished_run, capsys, tmp_path):
    logs, ckpt = finished_run
    code, err = cli(fit(FINETUNE, f"{S}seed", "7", "--ckpt_path", str(ckpt), logs=tmp_path),
                    capsys)
    assert code == 1 and "another stream" in err


def test_missing_checkpoint_file(capsys, tmp_path):
    code, err = cli(fit(FINETUNE, "--ckpt_path", str(tmp_path / "gone.ckpt"), logs=tmp_path),
                    capsys)
    assert code == 1 and "gone.ckpt" in err


def test_nan_in_data_is_refused_at_build():
    from adaptlab.streams import SegmentData, StreamBuilder

    class WithNaN(StreamBuilder):
        def _make_segments(self, src):
            x = src.x_train.clone()
            x[5, 0, 0, 0] = float("nan")
            return [SegmentData("a", "a", {}, x, src.y_train, src.x_test, src.y_test)]

    with pytest.raises(ValueError, match="NaN or inf"):
        WithNaN().build()


def test_input_shape_that_does_not_fit_the_backbone():
    from adaptlab.models import build_model

    with pytest.raises(ValueError, match="too small for lenet"):
        build_model("lenet", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="does not fit backbone"):
        build_model("resnet18", (3, 0, 32), 10)
    assert torch.is_tensor(build_model("lenet", (1, 8, 8), 10)(torch.zeros(1, 1, 8, 8)))


# ----- StreamAdapter ----------------------------------------------------------------------------

SA_CLASSIFICATION = str(ROOT / "configs/stream_adapter/classification.yaml")
SA_CONTEXT = str(ROOT / "configs/stream_adapter/context_stream.yaml")


def _weak_base(t: Path) -> str:
    """A Stage A export whose `icl_check` failed (an untrained base)."""
    from adaptlab.models import TinyGPT
    from adaptlab.strategies.icl_families import BASE_FORMAT, state_hash

    arch = {"vocab_size": 83, "n_positions": 20, "n_layer": 1, "d_model": 16, "n_head": 2,
            "d_mlp": 32, "pad_id": 82, "d_value": 8, "reg_head": True}
    state = TinyGPT(**arch).state_dict()
    rec = {"format": BASE_FORMAT, "arch": arch, "state_dict": state, "sha256": state_hash(state),
           "task": {"families": ["tokcls4"], "size": "tiny", "n_items": 64, "n_labels": 16,
                    "window": 16, "n_query": 4},
           "icl_check": {"passed": False, "failing": ["tokcls4"]}}
    path = t / "weak.pt"
    torch.save(rec, path)
    return str(path)


SA_CATALOGUE = [
    ("missing Stage A export", SA_CLASSIFICATION,
     lambda t: [f"{M}base", str(t / "none.pt")], "base: no Stage A export"),
    ("base that failed the ICL gate", SA_CLASSIFICATION, lambda t: [f"{M}base", _weak_base(t)],
     "failed Stage A's icl_check (families ['tokcls4']"),
    ("stream mode without an adapter", SA_CONTEXT, lambda t: [f"{M}adapter", "null"],
     "needs a Stage B export"),
    ("unknown adapter target", SA_CLASSIFICATION,
     lambda t: [f"{M}base", _weak_base(t), f"{M}allow_weak_base", "true", f"{M}targets",
                "[v, gate_proj]"], "targets: unknown 'gate_proj'"),
    ("chunk not dividing the block", SA_CLASSIFICATION,
     lambda t: [f"{M}base", _weak_base(t), f"{M}allow_weak_base", "true", f"{M}chunk_size",
                "3"], "chunk_size 3 must be >= 1 and divide block_size 16"),
]


@pytest.mark.parametrize(("name", "config", "extra", "fragment"), SA_CATALOGUE,
                         ids=[c[0] for c in SA_CATALOGUE])
def test_stream_adapter_bad_input(name, config, extra, fragment, tmp_path, capsys):
    args = ["fit", "--config", config, *extra(tmp_path), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs")]
    code, err = cli(args, capsys)
    assert code == 1, name
    assert fragment in err, err[-1500:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
