"""Kill a real `adaptlab fit` with SIGKILL mid-stream, resume it with `--ckpt_path`, and get
the metrics.json of a run never interrupted (README "Resume")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
S = "--data.stream.init_args."


def _config(tmp: Path, name: str, slow: bool) -> Path:
    callbacks = [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / name / "ckpt"), "every_n_train_steps": 9,
                       "save_last": True, "save_top_k": -1}},
    ]
    if slow:
        callbacks.append({"class_path": "tests.helpers.SlowAfter",
                          "init_args": {"step": 36, "seconds": 0.5}})
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    return cfg


def _cmd(strategy: str, tmp: Path, name: str, slow: bool, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adaptlab.cli", "fit",
            "--config", str(ROOT / f"configs/{strategy}/split_digits.yaml"),
            "--config", str(_config(tmp, name, slow)),
            f"{S}max_samples_per_segment", "60", f"{S}test_samples_per_segment", "30",
            f"{S}repeats", "2", "--data.batches_per_step", "2",
            "--progress_bar.refresh_rate", "0",
            "--trainer.logger.init_args.save_dir", str(tmp / name / "logs"), *extra]


def _metrics(tmp: Path, name: str, version: int = 0) -> dict:
    found = sorted((tmp / name / "logs").rglob(f"version_{version}/metrics.json"))
    return json.loads(found[0].read_text())


# Short segments: TAME needs a short detector window to see them (and spawn experts).
EXTRA = {"tame": ["--model.init_args.detector.window", "5",
                  "--model.init_args.detector.grace_steps", "3"]}


def _kill_and_resume(strategy: str, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = EXTRA.get(strategy, [])
    whole = subprocess.run(_cmd(strategy, tmp, "whole", False, *extra), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    proc = subprocess.Popen(_cmd(strategy, tmp, "cut", True, *extra), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt_dir = tmp / "cut" / "ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_dir.glob("*step=36*.ckpt")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(1.2)  # land somewhere between checkpoints 36 and 54
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = _metrics(tmp, "cut")
    assert killed["status"] == "running"  # the last atomic write, still valid JSON
    assert len(killed["accuracy_matrix"]["rows"]) < 5

    resumed = subprocess.run(
        _cmd(strategy, tmp, "cut", False, *extra, "--ckpt_path", str(ckpt_dir / "last.ckpt")),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after, before = _metrics(tmp, "cut", version=1), _metrics(tmp, "whole")
    assert after["status"] == "completed"
    assert after["accuracy_matrix"] == before["accuracy_matrix"]
    assert after == before
    return after


def test_replay_killed_and_resumed(tmp_path):
    _kill_and_resume("replay", tmp_path)


def test_tame_killed_and_resumed(tmp_path):
    """Experts, their optimizers, detector windows, buffers and the selector resume exactly."""
    doc = _kill_and_resume("tame", tmp_path)
    assert doc["final"]["learner"]["n_experts"] >= 2  # the resumed state held several experts


@pytest.mark.slow
def test_finetune_killed_and_resumed(tmp_path):
    _kill_and_resume("finetune", tmp_path)
