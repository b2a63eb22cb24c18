"""TTA bad input (README "Errors" rows): a missing or mismatched source model and a backbone
without normalisation layers end in one line, exit 1, the README's exact message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptlab.cli import main
from adaptlab.strategies.tta import SourceTraining
from tests.test_errors import README_ROWS, matches

ROOT = Path(__file__).resolve().parents[1]
TENT = str(ROOT / "configs/tta/tent_digits.yaml")
BN = str(ROOT / "configs/tta/bn_digits.yaml")
M = "--model.init_args."
SMALL = ["--data.stream.init_args.max_samples_per_segment", "64",
         "--data.stream.init_args.corruptions", "[fog, contrast]", "--progress_bar.refresh_rate",
         "0"]


def export(path: Path, backbone: str = "lenet_bn", shape=(1, 8, 8), n_classes: int = 10) -> str:
    rec = SourceTraining(input_shape=shape, n_classes=n_classes, backbone=backbone,
                         backbone_args={}).source_record()
    torch.save(rec, path)
    return str(path)


CASES = [
    ("TTA learner without a source model", TENT, lambda t: [f"{M}source", "null"]),
    ("missing source model", TENT, lambda t: [f"{M}source", str(t / "none.pt")]),
    ("source model for other classes", TENT,
     lambda t: [f"{M}source", export(t / "five.pt", n_classes=5)]),
    ("source model for another input shape", TENT,
     lambda t: [f"{M}source", export(t / "rgb.pt", shape=(3, 8, 8))]),
    ("TENT on a backbone without normalisation", TENT,
     lambda t: [f"{M}source", export(t / "plain.pt", backbone="lenet")]),
    ("BN adaptation on a backbone without BatchNorm", BN,
     lambda t: [f"{M}source", export(t / "plain.pt", backbone="lenet")]),
]


@pytest.mark.parametrize(("name", "config", "extra"), CASES, ids=[c[0] for c in CASES])
def test_tta_bad_input(name, config, extra, tmp_path, capsys):
    args = ["fit", "--config", config, *SMALL, *extra(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    exit_code, message = README_ROWS[name]
    assert int(info.value.code) == exit_code == 1
    assert matches(message, line), (message, line)
    assert not list((tmp_path / "logs").rglob("metrics.json"))  # refused before any run
