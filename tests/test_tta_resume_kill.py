"""Kill a real TTA `adaptlab fit` (TENT with shift-aware resets) with SIGKILL mid-stream, resume
it with `--ckpt_path`, and get the metrics.json of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_tta import write_source

ROOT = Path(__file__).resolve().parents[1]
S = "--data.stream.init_args."


def _cmd(tmp: Path, name: str, slow: bool, source: str, *extra: str) -> list[str]:
    callbacks = [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / name / "ckpt"), "every_n_train_steps": 4,
                                "save_last": True, "save_top_k": -1}}]
    if slow:
        callbacks.append({"class_path": "tests.helpers.SlowAfter",
                          "init_args": {"step": 8, "seconds": 0.5}})
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    return [sys.executable, "-m", "adaptlab.cli", "fit",
            "--config", str(ROOT / "configs/tta/tent_digits.yaml"), "--config", str(cfg),
            f"{S}corruptions", "[gaussian_noise, fog, contrast]", f"{S}batch_size", "32",
            f"{S}max_samples_per_segment", "128", f"{S}repeats", "2",
            "--data.batches_per_step", "2", "--progress_bar.refresh_rate", "0",
            "--model.init_args.source", source, "--model.init_args.reset", "shift",
            "--model.init_args.detector", "{window: 4, grace: 1, sigma_floor: 0.005}",
            "--trainer.logger.init_args.save_dir", str(tmp / name / "logs"), *extra]


def _metrics(tmp: Path, name: str, version: int = 0) -> dict:
    found = sorted((tmp / name / "logs").rglob(f"version_{version}/metrics.json"))
    return json.loads(found[0].read_text())


@pytest.mark.slow
def test_tta_killed_and_resumed(tmp_path):
    source = write_source(tmp_path / "source.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    whole = subprocess.run(_cmd(tmp_path, "whole", False, source), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(_cmd(tmp_path, "cut", True, source), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt_dir = tmp_path / "cut" / "ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_dir.glob("*step=8*.ckpt")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(1.2)  # between checkpoints 8 and 12
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _metrics(tmp_path, "cut")["status"] == "running"
    resumed = subprocess.run(
        _cmd(tmp_path, "cut", False, source, "--ckpt_path", str(ckpt_dir / "last.ckpt")),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after, before = _metrics(tmp_path, "cut", version=1), _metrics(tmp_path, "whole")
    assert after["status"] == "completed"
    assert after == before
    assert before["final"]["tta_online_error"] is not None
