"""The `adaptlab` console script end to end: metrics.json, TensorBoard events, clear errors."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.stream.init_args.max_samples_per_segment", "60",
         "--data.stream.init_args.test_samples_per_segment", "30",
         "--data.stream.init_args.repeats", "1"]


def adaptlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("adaptlab", path=os.path.dirname(sys.executable)) or "adaptlab"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fit_writes_metrics_json_and_tensorboard_events(tmp_path):
    out = adaptlab("fit", "--config", str(ROOT / "configs/replay/split_digits.yaml"), *SMALL,
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = Path(glob.glob(str(tmp_path / "logs" / "replay_split_digits" / "version_*"))[0])
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["status"] == "completed" and doc["backend"] == "lightning"
    assert doc["stream"]["n_samples"] == 300 and doc["stream"]["true_shifts"] == [60, 120, 180, 240]
    rows = doc["accuracy_matrix"]["rows"]
    assert [r["position"] for r in rows] == [60, 120, 180, 240, 300]
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["acc"])
    final = doc["final"]
    assert final["acc_final"] == pytest.approx(sum(rows[-1]["acc"]) / 5)
    assert final["bwt_gem"] == pytest.approx(-final["forgetting_last"])
    assert final["params_total"] == 64 * 256 + 256 + 256 * 10 + 10
    assert final["learner"] == dict.fromkeys(
        ["acc_task_inferred", "acc_task_oracle", "acc_class_il", "selector_acc", "n_experts"])
    assert {"learner.acc_task_oracle", "learner.acc_class_il"} <= set(doc["definitions"])
    assert set(doc["definitions"]) >= {"acc_final", "forgetting_chaudhry", "bwt_gem"}
    assert "acc_final" in out.stdout  # the terminal table
    run = json.loads((run_dir / "run.json").read_text())
    assert run["learner"] == "Replay" and run["finished_at"]

    ckpt = glob.glob(str(run_dir / "checkpoints" / "*.ckpt"))
    assert ckpt, "the default ModelCheckpoint writes one checkpoint"
    tested = adaptlab("test", "--config", str(ROOT / "configs/replay/split_digits.yaml"), *SMALL,
                      "--trainer.logger", "false", "--ckpt_path", ckpt[0], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "test/acc_exp004" in tested.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "Top1_Acc_Stream/eval_phase/test_stream" in tags["scalars"]
    assert "Top1_Acc_Exp/eval_phase/test_stream/Exp004" in tags["scalars"]
    assert "StreamForgetting/eval_phase/test_stream" in tags["scalars"]
    assert "Figures/accuracy_matrix" in tags["images"]
    stream_acc = acc.Scalars("Top1_Acc_Stream/eval_phase/test_stream")
    assert stream_acc[-1].value == pytest.approx(final["acc_final_weighted"], abs=1e-6)
    # the HPARAMS tab: hyper-parameters (no parser internals) paired with the final metrics
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"learner/lr" in start and b"stream/name" in start and b"_class_path" not in start
    assert acc.Scalars("final/acc_final")[-1].value == pytest.approx(final["acc_final"], abs=1e-6)


def test_unknown_config_key_is_one_clear_error(tmp_path):
    out = adaptlab("fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
                   "--model.init_args.learning_rate", "0.1", cwd=tmp_path)
    assert out.returncode != 0
    assert "learning_rate" in out.stderr


def test_missing_dataset_root_is_one_clear_line(tmp_path):
    out = adaptlab("fit", "--config", str(ROOT / "configs/finetune/split_digits.yaml"),
                   "--data.stream.init_args.source", "mnist",
                   "--data.stream.init_args.root", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("adaptlab: error:") and "Traceback" not in out.stderr
    assert "nowhere" in lines[-1] and "root" in lines[-1]
    assert not (tmp_path / "lightning_logs").exists()  # nothing written


@pytest.mark.parametrize("cfg", sorted(glob.glob(str(ROOT / "configs" / "*" / "*.yaml"))))
def test_every_shipped_config_parses(cfg, capsys):
    from adaptlab.cli import main

    text = Path(cfg).read_text()
    configs = ["--config", cfg]
    if text.startswith("# Overlay"):  # parsed after the base config its comment names
        base = re.search(r"--config (\S+) --config", text)
        assert base, f"{cfg}: an overlay names the config it goes after"
        configs = ["--config", str(ROOT / base.group(1)), *configs]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
