"""The tiny StreamAdapter pipeline end to end from the CLI (spec §8 item 10).

`test_shipped_configs_ci_sized` (default run, well under a minute): the shipped Stage A, Stage B
and test-time configs, shortened on the command line, chain through their exports.
`test_tiny_pipeline` (`slow`, ≈5 min on 2 cores): Stage A passes its `icl_check` gate, Stage B
trains both adapters, and the benchmark confirms A0 (empty state = zero-shot), A4
(SA(W) > SA(1) > zero-shot on seen families) and A3 on the families that are not random label
maps (SA(4W) ≥ SA(W) − 2 SE).

Run: `python -m pytest -m slow tests/test_stream_adapter_pipeline.py`
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOT_LABEL_MAPS = ("linreg", "logreg", "bool_conj")


def adaptlab(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "adaptlab.cli", "fit", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]


def run_cli(*args: str) -> None:
    """`adaptlab fit …` in this process (no interpreter start-up); any exit but 0 fails."""
    from adaptlab.cli import main

    try:
        main(["fit", *args])
    except SystemExit as exc:
        assert not exc.code, f"adaptlab fit {' '.join(args)} exited with {exc.code}"


def test_shipped_configs_ci_sized(tmp_path):
    """Stage A (10 steps: too short for `icl_check`, so Stage B runs with allow_weak_base),
    Stage B classification (6 steps), then the test-time stream on that export: each stage's
    export is the next one's input, and each writes its metrics document."""
    base, adapter, logs = (str(tmp_path / n) for n in ("base.pt", "adapter.pt", "logs"))
    common = ("--trainer.logger.init_args.save_dir", logs, "--threads", "1")
    run_cli("--config", "configs/icl/pretrain_tinygpt.yaml", "--model.init_args.export", base,
            "--trainer.max_steps", "10", "--data.init_args.steps", "10",
            "--data.init_args.per_family", "4", "--model.init_args.eval_episodes", "16",
            "--model.init_args.warmup_steps", "2", *common)
    stage_a = json.load(open(Path(logs) / "icl" / "pretrain_tinygpt" / "metrics.json"))
    assert stage_a["stage_a"]["steps"] == 10 and "passed" in stage_a["stage_a"]["icl_check"]
    run_cli("--config", "configs/stream_adapter/classification.yaml",
            "--model.init_args.base", base, "--model.init_args.export", adapter,
            "--model.init_args.allow_weak_base", "true", "--trainer.max_steps", "6",
            "--data.init_args.steps", "6", "--data.init_args.per_family", "2",
            "--data.init_args.k_max", "32", "--model.init_args.eval_episodes", "8",
            "--model.init_args.eval_ks", "[1, 16]", *common)
    stage_b = json.load(open(Path(logs) / "stream_adapter" / "classification" / "metrics.json"))
    assert stage_b["stage_b"]["steps"] == 6
    assert sorted(stage_b["stage_b"]["families"]) == ["bool_conj", "logreg", "tokcls4"]
    rec = torch.load(adapter, weights_only=False)
    assert rec["base_sha256"] == torch.load(base, weights_only=False)["sha256"]
    run_cli("--config", "configs/stream_adapter/context_stream.yaml",
            "--model.init_args.base", base, "--model.init_args.adapter", adapter,
            "--data.stream.init_args.examples_per_segment", "16",
            "--data.stream.init_args.n_test", "16", "--data.batches_per_step", "4", *common)
    stream = json.load(open(Path(logs) / "stream_adapter" / "context_stream" / "metrics.json"))
    assert stream["status"] == "completed", stream.get("status")


@pytest.mark.slow
def test_tiny_pipeline(tmp_path):
    base, logs = str(tmp_path / "base.pt"), str(tmp_path / "logs")
    adaptlab("--config", "configs/icl/pretrain_tinygpt.yaml", "--model.init_args.export", base,
             "--trainer.logger.init_args.save_dir", logs, "--threads", "2")
    gate = json.load(open(Path(logs) / "icl" / "pretrain_tinygpt" / "metrics.json"))
    assert gate["stage_a"]["icl_check"]["passed"], gate["stage_a"]["icl_check"]
    adapters = []
    for kind in ("regression", "classification"):
        path = str(tmp_path / f"{kind}.pt")
        adaptlab("--config", f"configs/stream_adapter/{kind}.yaml", "--model.init_args.base",
                 base, "--model.init_args.export", path, "--trainer.logger.init_args.save_dir",
                 logs, "--threads", "2")
        adapters.append(path)
    check_bench(adapters, tmp_path)


def check_bench(adapters: list[str], tmp_path: Path) -> None:
    """The benchmark's A0, A4 and A3 (non-label-map families) on the trained exports."""
    spec = importlib.util.spec_from_file_location("stream_adapter_bench", ROOT / "tools" /
                                                  "stream_adapter_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    doc = bench.main(["--adapters", *adapters, "--quick", "--episodes", "256",
                      "--out", str(tmp_path / "bench")])
    claims = {c["id"]: c for c in doc["claims"]}
    assert claims["A0"]["pass"] and claims["A4"]["pass"], (claims["A0"], claims["A4"])
    sa, w = doc["skill"]["StreamAdapter"], doc["window"]
    for fam in NOT_LABEL_MAPS:
        hi, lo = sa[fam][4 * w], sa[fam][w]
        margin = 2 * math.hypot(hi["se"], lo["se"])
        assert hi["skill"] >= lo["skill"] - margin, (fam, hi, lo)
