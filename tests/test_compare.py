"""`tools/compare.py` smoke test: a tiny stream, one seed, two methods (one from Avalanche
where it is installed); the printed table has their rows, and its numbers are the ones in
the runs' metrics.json / run.json."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import compare  # noqa: E402

HAS_AVALANCHE = importlib.util.find_spec("avalanche") is not None


def _rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


@pytest.mark.parametrize("stream", ["split"])
def test_compare_smoke(stream, tmp_path, capsys):
    second = "av:Naive" if HAS_AVALANCHE else "Replay"
    text = compare.main([
        "--stream", stream, "--seeds", "0", "--max-samples-per-segment", "30",
        "--repeats", "2", "--methods", "Finetune", second, "--out", str(tmp_path),
    ])
    assert text in capsys.readouterr().out
    assert (tmp_path / stream / "table.md").read_text().strip() == text.strip()
    rows = _rows(text)
    expected = {"adaptlab Finetune": tmp_path / stream / "seed0" / "adaptlab_Finetune"}
    if HAS_AVALANCHE:
        expected["Avalanche Naive"] = tmp_path / stream / "seed0" / "avalanche_Naive"
        assert "Avalanche 0.6 strategies are boundary-aware" in text
    else:
        expected["adaptlab Replay"] = tmp_path / stream / "seed0" / "adaptlab_Replay"
    assert set(rows) == set(expected)
    for method, run_dir in expected.items():
        doc = json.loads((run_dir / "metrics.json").read_text())
        run = json.loads((run_dir / "run.json").read_text())
        assert doc["status"] == "completed"
        assert run["compare"]["method"] == method
        if method.startswith("Avalanche"):
            assert doc["backend"] == "avalanche:Naive"
        else:
            assert doc["backend"] == "lightning"
        final = doc["final"]
        acc, within, forgetting, experts, params, wall = rows[method]
        assert acc == _fmt(final["acc_final"], ".3f")
        assert within == "—"  # class-IL baselines on Split: not in metrics.json
        assert forgetting == _fmt(final["forgetting_chaudhry"], ".3f")
        assert experts == "—"
        assert params == _fmt(final["params_nonzero"], ",.0f")
        assert wall == _fmt(run["compare"]["wall_s"], ".1f")
    # the same table again from the files alone
    again = compare.main([
        "--stream", stream, "--seeds", "0", "--methods", "Finetune", second,
        "--out", str(tmp_path), "--table-only",
    ])
    assert _rows(again) == rows


def test_any_stream_equal_budget(tmp_path):
    """A generated stream named by class path: every method gets the same passes and memory,
    TAME's buffers fill the same M, and the caption states the budget."""
    text = compare.main([
        "--stream", "adaptlab.streams.Permuted", "--stream-args",
        "{source: tabular, source_args: {n_samples: 400}, n_segments: 3}",
        "--seeds", "0", "--repeats", "2", "--memory", "120", "--methods", "Replay", "TAME",
        "--out", str(tmp_path),
    ])
    runs = {m: json.loads((tmp_path / "permuted_tabular" / "seed0" / f"adaptlab_{m}"
                           / "run.json").read_text())["compare"] for m in ("Replay", "TAME")}
    assert runs["Replay"]["stream_params"] == runs["TAME"]["stream_params"]
    assert runs["Replay"]["settings"]["passes"] == runs["TAME"]["settings"]["passes"] == 2
    tame = runs["TAME"]["settings"]
    assert tame["selector_capacity"] + 3 * tame["retrain_capacity"] == 120
    assert "permuted_tabular" in text and "2 passes per segment" in text
    assert "Unequal budget" not in text
    with pytest.raises(SystemExit, match="too small for TAME"):
        compare.main(["--stream", "adaptlab.streams.Permuted", "--stream-args",
                      "{source: tabular, n_segments: 3}", "--memory", "5",
                      "--methods", "TAME", "--out", str(tmp_path)])
