"""tools/compare_metrics.py: the before/after check of a redesign must see a changed number
and must not see a changed clock."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import compare_metrics  # noqa: E402


def _tree(root: Path, version: int, doc: dict) -> None:
    d = root / "run_a" / f"version_{version}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(doc))


DOC = {"status": "completed", "final": {"acc_final": 0.5, "learner": {"n_experts": 3}},
       "accuracy_matrix": {"rows": [{"acc": [0.1, 0.2]}]}, "started_at": "t0"}


def test_equal_runs_pass_and_clocks_are_ignored(tmp_path: Path, capsys) -> None:
    _tree(tmp_path / "a", 0, DOC)
    _tree(tmp_path / "b", 3, {**DOC, "started_at": "t1"})  # another version, another clock
    assert compare_metrics.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "1 compared, 0 different" in capsys.readouterr().out


def test_a_changed_number_fails_with_its_path(tmp_path: Path, capsys) -> None:
    _tree(tmp_path / "a", 0, DOC)
    changed = json.loads(json.dumps(DOC))
    changed["accuracy_matrix"]["rows"][0]["acc"][1] = 0.2000001
    _tree(tmp_path / "b", 0, changed)
    assert compare_metrics.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "/accuracy_matrix/rows[0]/acc[1]: 0.2 != 0.2000001" in capsys.readouterr().out
    assert compare_metrics.main([str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "1e-6"]) == 0


def test_a_missing_run_fails(tmp_path: Path) -> None:
    _tree(tmp_path / "a", 0, DOC)
    (tmp_path / "b").mkdir()
    assert compare_metrics.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
