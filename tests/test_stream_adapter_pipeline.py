"""The tiny StreamAdapter pipeline end to end from the CLI (spec §8 item 10; `slow`, ≈5 min on
2 cores): Stage A passes its `icl_check` gate, Stage B trains both adapters, and the benchmark
confirms A0 (empty state = zero-shot), A4 (SA(W) > SA(1) > zero-shot on seen families) and A3
on the families that are not random label maps (SA(4W) ≥ SA(W) − 2 SE).

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

ROOT = Path(__file__).resolve().parents[1]
NOT_LABEL_MAPS = ("linreg", "logreg", "bool_conj")


def adaptlab(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "adaptlab.cli", "fit", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_tiny_pipeline(tmp_path):
    base, logs = str(tmp_path / "base.pt"), str(tmp_path / "logs")
    adaptlab("--config", "configs/icl/pretrain_tinygpt.yaml", "--model.init_args.export", base,
             "--trainer.logger.init_args.save_dir", logs, "--threads", "2")
    gate = json.load(open(Path(logs) / "icl" / "pretrain_tinygpt" / "metrics.json"))
    assert gate["icl_check"]["passed"], gate["icl_check"]
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
