"""`tools/stream_adapter_bench.py` on a random tiny base and adapters (no training).

The exports are written in the real formats (`FamilyInContextLearner.base_record`,
`StreamAdapter.adapter_record`); `W1` is random so that absorbing a context changes answers
while an empty state must still answer exactly as the base (A0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptlab.models import TinyGPT
from adaptlab.strategies.icl_families import BASE_FORMAT, state_hash
from adaptlab.strategies.stream_adapter import ADAPTER_FORMAT, AdaptedGPT
from adaptlab.streams.icl import FAMILIES, FamilyVocab, value_dim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import stream_adapter_bench as bench  # noqa: E402

torch.set_num_threads(1)

W, N_QUERY = 4, 2
TASK = {"families": list(FAMILIES), "size": "tiny", "n_items": 16, "n_labels": 8, "window": W,
        "n_query": N_QUERY}
ADAPTER_ARGS = {"n_slots": 2, "chunk_size": 2, "block_size": W, "targets": ["v", "o", "fc1", "fc2"],
                "layers": "all", "gate": "vector", "recurrence": "ema", "gate_bias": 2.0}
SEEN = {"regression": ["linreg"], "classification": ["logreg", "tokcls4", "bool_conj"]}


def write_exports(tmp_path: Path) -> list[str]:
    vocab = FamilyVocab(TASK["n_items"], TASK["n_labels"])
    arch = {"vocab_size": vocab.size, "n_positions": W + N_QUERY, "n_layer": 2, "d_model": 16,
            "n_head": 2, "d_mlp": 32, "pad_id": vocab.size - 1, "d_value": value_dim("tiny"),
            "reg_head": True, "initializer_range": 0.2}
    torch.manual_seed(0)
    base = TinyGPT(**arch)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    base_rec = {"format": BASE_FORMAT, "arch": arch, "state_dict": state,
                "sha256": state_hash(state), "task": TASK, "icl_check": {"passed": True},
                "steps": 0, "seed": 0}
    base_path = tmp_path / "base.pt"
    torch.save(base_rec, base_path)
    paths = []
    for i, (name, seen) in enumerate(SEEN.items()):
        core = AdaptedGPT(TinyGPT(**arch), **ADAPTER_ARGS)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for a in core.absorptions.values():
                a.w1.copy_(torch.randn(a.w1.shape, generator=gen) * 0.3)
        adapter_state = {k: v.detach().clone() for k, v in core.state_dict().items()
                         if not k.startswith("base.")}
        rec = {"format": ADAPTER_FORMAT, "adapter_args": ADAPTER_ARGS,
               "state_dict": adapter_state, "base_path": str(base_path),
               "base_sha256": base_rec["sha256"],
               "base_record": {k: v for k, v in base_rec.items() if k != "state_dict"},
               "families": seen, "steps": 0, "seed": 0}
        path = tmp_path / f"adapter_{name}.pt"
        torch.save(rec, path)
        paths.append(str(path))
    return paths


def test_quick_run_writes_report_and_consistent_numbers(tmp_path: Path, capsys) -> None:
    adapters = write_exports(tmp_path)
    out = tmp_path / "b"
    bench.main(["--adapters", *adapters, "--quick", "--episodes", "8", "--reps", "3",
                "--out", str(out)])
    printed = capsys.readouterr().out
    for suffix in (".md", ".json", "_skill.png", "_cost.png"):
        assert (tmp_path / f"b{suffix}").stat().st_size > 0, suffix
    assert "| A0 |" in printed and "| C4 |" in printed
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == printed.rstrip("\n") + "\n"

    res = json.loads((tmp_path / "b.json").read_text())
    families = {"linreg", "sparse_linreg", "logreg", "tokcls4", "bool_conj", "tokcls8",
                "bool_disj"}
    assert set(res["families"]) == families
    assert res["families"]["sparse_linreg"]["split"] == "unseen"
    assert res["families"]["bool_conj"]["split"] == "seen"
    skill = res["skill"]
    assert set(skill) == {"zero-shot", "ICL", "truncated ICL", "StreamAdapter"}
    ks = [0, 1, 4, 16]  # quick: {0, 1, 4, W, 4W} with W = 4
    for fam in families:
        assert sorted(map(int, skill["StreamAdapter"][fam])) == ks
        assert sorted(map(int, skill["zero-shot"][fam])) == ks
        assert sorted(map(int, skill["ICL"][fam])) == [0, 1, 4]
        assert sorted(map(int, skill["truncated ICL"][fam])) == [4, 16]
        for row in skill["StreamAdapter"][fam].values():
            assert 0.0 <= row["skill"] <= 1.0 and row["se"] >= 0.0
        assert ("nmse" in skill["ICL"][fam]["4"]) == (fam in ("linreg", "sparse_linreg"))
    # the same episodes for every method: SA at k = 0 and ICL at W vs truncated ICL at W
    assert skill["ICL"]["logreg"]["4"] == skill["truncated ICL"]["logreg"]["4"]
    assert skill["StreamAdapter"]["tokcls4"]["0"] == skill["zero-shot"]["tokcls4"]["0"]

    claims = {c["id"]: c for c in res["claims"]}
    assert claims["A0"]["pass"] is True
    assert max(v["max_abs_diff"] for v in res["a0"].values()) < 1e-5
    assert {"A1", "A2", "A3", "A4", "C1", "C2", "C3", "C4"} <= set(claims)

    assert len(res["cost"]) == 1  # both adapters share the architecture and settings
    rows = res["cost"][0]["rows"]
    assert [r["k"] for r in rows] == [4, 16, 64]
    assert len({r["state_nbytes"] for r in rows}) == 1
    kv = [r["icl_kv_nbytes"] for r in rows]
    assert all(b > a for a, b in zip(kv, kv[1:]))
    assert all(r["sa_committed_ms"] > 0 and r["absorb_ms_per_demo"] > 0 for r in rows)
    assert rows[0]["sa_committed_peak_bytes"] is None  # CPU
    assert claims["C2"]["pass"] is True  # C1, C3, C4 compare wall-clock times: not asserted


def test_missing_adapter_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "stream_adapter_bench.py"), "--adapters",
         str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stream_adapter_bench: error: adapter:")
    assert "missing.pt" in lines[0]
    assert not (tmp_path / "b.md").exists()


def test_baselines_add_the_protocol_table_and_cost_rows(tmp_path: Path, capsys) -> None:
    """`--baselines`: evicting KV (last, most attended), TempLoRA, MT-LoRA and the best
    constant on the same episodes, the protocol table over two evaluation seeds, a cost row
    per method; `--combine` over training seeds."""
    adapters = write_exports(tmp_path)[:1]  # regression: linreg seen, sparse_linreg unseen
    common = ["--adapters", *adapters, "--quick", "--episodes", "4", "--reps", "2",
              "--baselines", "--seeds", "4321", "7", "--templora-steps", "3",
              "--mt-lora-steps", "3"]
    doc = bench.main([*common, "--out", str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "## The paper's protocol" in printed and "| **seen avg** | seen | TempLoRA |" in printed
    assert "exactly the same episodes" in printed
    skill = doc["skill"]
    for method in bench.BASELINES:
        assert set(skill[method]) == {"linreg", "sparse_linreg"}
    # at k = 0 TempLoRA has nothing to train on and evicting KV holds nothing: zero-shot
    assert skill["TempLoRA"]["linreg"][0] == skill["zero-shot"]["linreg"][0]
    # both evictions keep every demo at k <= m: ICL
    m = doc["protocol"]["settings"][adapters[0]]["evict_m"]
    assert m >= 1 and doc["protocol"]["cost"][1]["held_nbytes"] == min(4, m) * 2 * 2 * 16 * 4
    for ev in (bench.EVICT_LAST, bench.EVICT_ATT):
        assert skill[ev]["linreg"][1] == skill["ICL"]["linreg"][1]
    assert len(doc["protocol"]["skill"]) == 2
    methods = {r["method"] for r in doc["protocol"]["cost"]}
    assert methods == {"StreamAdapter", *bench.BASELINES} - {"best constant"}
    # every method saw the same batches: one digest per evaluation seed, all methods checked
    eps = doc["protocol"]["episodes"]
    assert set(eps) == {"4321", "7"}
    assert set(bench.PROTOCOL_METHODS) <= set(eps["7"][adapters[0]]["methods"])
    assert eps["7"][adapters[0]]["digest"] != eps["4321"][adapters[0]]["digest"]
    # --combine, one training seed: mean ± sd over the evaluation seeds of the runs
    text = bench.combine([str(tmp_path / "b.json"), str(tmp_path / "b.json")],
                         str(tmp_path / "c.md"))
    assert "4 evaluation seeds" in text and (tmp_path / "c.md").read_text() == text
    assert "identical in every run" in text
    # a second training seed (its MT-LoRA data seed differs): sd over training seeds
    bench.main([*common, "--training-seed", "1", "--out", str(tmp_path / "b1")])
    text = bench.combine([str(tmp_path / "b.json"), str(tmp_path / "b1.json")], None)
    assert "training seeds [0, 1] (each the mean over its evaluation seeds [4321, 7])" in text


def test_a_method_given_other_episodes_is_an_error() -> None:
    same = {"A": {(0, 4): ["x", "y"]}, "B": {(0, 4): ["x", "y"], (0, 16): ["z"]}}
    assert bench.same_episodes(same)["cells"] == 2
    other = {"A": {(0, 4): ["x", "y"]}, "B": {(0, 4): ["x", "q"]}}
    with pytest.raises(RuntimeError, match="B saw other episodes"):
        bench.same_episodes(other)
