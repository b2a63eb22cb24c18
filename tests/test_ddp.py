"""Data parallelism on CPU (gloo, 2 processes) through the real CLI: the same metrics as one
process (the gradient is the same sample-weighted mean), written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
S = "--data.stream.init_args."


def _run(tmp: Path, name: str, strategy: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "adaptlab.cli", "fit",
           "--config", str(ROOT / f"configs/{strategy}/split_digits.yaml"),
           f"{S}max_samples_per_segment", "60", f"{S}test_samples_per_segment", "30",
           f"{S}repeats", "2", "--progress_bar.refresh_rate", "0",
           "--trainer.accelerator", "cpu",
           "--trainer.logger.init_args.save_dir", str(tmp / name), *extra]
    out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    docs = list((tmp / name).rglob("metrics.json"))
    assert len(docs) == 1  # metrics are written once, by rank 0
    assert out.stdout.count("acc_final ") == 1  # the table is printed once
    return json.loads(docs[0].read_text())


@pytest.mark.parametrize("strategy", ["finetune", "replay"])
def test_two_process_ddp_matches_one_process(tmp_path, strategy):
    """Replay too: every process holds the same memory and replays its share of one draw."""
    one = _run(tmp_path, "one", strategy)
    two = _run(tmp_path, "two", strategy, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    r1 = one["accuracy_matrix"]["rows"]
    r2 = two["accuracy_matrix"]["rows"]
    assert [r["position"] for r in r1] == [r["position"] for r in r2]
    diffs = [abs(a - b) for x, y in zip(r1, r2) for a, b in zip(x["acc"], y["acc"])]
    assert max(diffs) <= 1 / 30 + 1e-9  # at most one test sample flips (float reduction order)
    assert abs(one["final"]["acc_online"] - two["final"]["acc_online"]) <= 0.01


def test_tame_decisions_identical_on_every_rank_and_single_process(tmp_path):
    """TAME's spawn/switch decisions: the same on both ranks and as in one process."""
    decisions = {}
    for name, extra in [("one", []), ("two", ["--trainer.strategy", "ddp",
                                             "--trainer.devices", "2"])]:
        dump = tmp_path / f"{name}.yaml"
        dump.write_text(json.dumps({"trainer": {"callbacks": [{
            "class_path": "tests.helpers.DumpDecisions",
            "init_args": {"folder": str(tmp_path / name / "dec")}}]}}))
        cmd = [sys.executable, "-m", "adaptlab.cli", "fit",
               "--config", str(ROOT / "configs/tame/recurring_digits.yaml"),
               "--config", str(dump), "--progress_bar.refresh_rate", "0",
               "--trainer.accelerator", "cpu",
               "--trainer.logger.init_args.save_dir", str(tmp_path / name), *extra]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        for f in sorted((tmp_path / name / "dec").glob("decisions_rank*.json")):
            decisions[f"{name}/{f.stem}"] = json.loads(f.read_text())
    assert set(decisions) == {"one/decisions_rank0", "two/decisions_rank0",
                              "two/decisions_rank1"}
    ref = decisions["one/decisions_rank0"]
    assert len(set(ref["active"])) == 4 and len(ref["shift_events"]) == 4
    for doc in decisions.values():
        assert doc["shift_events"] == ref["shift_events"]
        assert doc["active"] == ref["active"]
