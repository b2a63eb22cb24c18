"""StreamAdapter as a learner: Stage A (`FamilyInContextLearner`), Stage B meta-training, the
test-time context stream (`TestTimeStreamAdapter`), exports, errors and resume (spec §5, §6, §8).

Everything runs on a tiny random base (d 16, 2 layers) trained for a handful of steps, so the
tests check plumbing and invariants, not accuracy (that is `tools/stream_adapter_bench.py`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from adaptlab.data import StreamDataModule
from adaptlab.episodes import EpisodeDataModule, draw_k
from adaptlab.strategies.icl_families import (
    FamilyInContextLearner,
    distill_loss,
    family_loss,
    icl_outputs,
    load_base,
    save_atomic,
    state_hash,
    zero_shot_outputs,
)
from adaptlab.strategies.stream_adapter import (
    SegmentReset,
    StreamAdapter,
    TestTimeStreamAdapter,
    load_adapter,
)
from adaptlab.streams.icl import ContextStream, FamilyVocab
from tests.helpers import fit_resumable

torch.set_num_threads(1)
TINY = {"n_layer": 2, "d_model": 16, "n_head": 2, "d_mlp": 32}
SEEN = ["tokcls4", "bool_conj"]


def episode_dm(families=("tokcls4", "bool_conj", "linreg"), **kw) -> EpisodeDataModule:
    args = {"families": list(families), "window": 8, "n_query": 2, "per_family": 4,
            "steps": 6, "seed": 0, **kw}
    return EpisodeDataModule(**args)


def trainer(tmp_path, name: str, steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1, max_steps=steps, logger=TensorBoardLogger(str(tmp_path), name=name),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=False, **kw)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> str:
    """A Stage A export: 6 steps of a tiny TinyGPT (fails the gate: it has not learned)."""
    tmp = tmp_path_factory.mktemp("stage_a")
    dm = episode_dm()
    learner = FamilyInContextLearner(
        input_shape=dm.input_shape, n_classes=dm.n_classes, batch_size=dm.batch_size,
        eval_every=3, eval_episodes=8, export=str(tmp / "base.pt"), **TINY)
    trainer(tmp, "a", 6).fit(learner, datamodule=dm)
    return str(tmp / "base.pt")


@pytest.fixture(scope="module")
def adapter_path(base_path, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("stage_b")
    dm = episode_dm(SEEN, k_dist="loguniform", k_min=1, k_max=20)
    sa = StreamAdapter(base=base_path, allow_weak_base=True, n_slots=2, chunk_size=4,
                       eval_every=0, eval_episodes=8, eval_ks=[1, 4], export=str(tmp / "sa.pt"),
                       input_shape=dm.input_shape, n_classes=dm.n_classes,
                       batch_size=dm.batch_size)
    trainer(tmp, "b", 6).fit(sa, datamodule=dm)
    # Stage B left the frozen base exactly as Stage A exported it
    assert state_hash(sa.core.base.state_dict()) == load_base(base_path)[1]["sha256"]
    return str(tmp / "sa.pt")


@pytest.fixture(scope="module")
def strong_adapter_path(adapter_path, tmp_path_factory) -> str:
    """The Stage B export with large random `W1`: the state then moves every answer, so a
    state lost on resume could not go unnoticed."""
    rec = torch.load(adapter_path, weights_only=True)
    gen = torch.Generator().manual_seed(7)
    for key, t in rec["state_dict"].items():
        if key.endswith(".w1"):
            rec["state_dict"][key] = torch.randn(t.shape, generator=gen)
    path = str(tmp_path_factory.mktemp("strong") / "strong.pt")
    save_atomic(rec, path)
    return path


# ----- episodes --------------------------------------------------------------------------------


def test_episode_batches_are_a_function_of_seed_and_step():
    a, b = episode_dm(), episode_dm()
    for i in (0, 3):
        for key, t in a.batch(i).items():
            assert torch.equal(t, b.batch(i)[key])
    assert not torch.equal(a.batch(0)["q_token"], episode_dm(seed=1).batch(0)["q_token"])
    ks = {draw_k(0, i, "loguniform", 1, 64) for i in range(300)}
    assert min(ks) == 1 and max(ks) > 32 and all(1 <= k <= 64 for k in ks)


def test_episode_errors():
    with pytest.raises(ValueError, match="families"):
        episode_dm(families=("linreg", "nope"))
    with pytest.raises(ValueError, match="k_dist"):
        episode_dm(k_dist="normal")
    with pytest.raises(ValueError, match="k_min, k_max"):
        episode_dm(k_min=5, k_max=2)


# ----- Stage A ---------------------------------------------------------------------------------


def test_stage_a_exports_base_with_hash_and_gate(base_path):
    model, rec = load_base(base_path)
    assert rec["sha256"] == state_hash(model.state_dict())
    assert rec["task"]["window"] == 8 and rec["task"]["n_query"] == 2
    check = rec["icl_check"]
    assert set(check["families"]) == {"tokcls4", "bool_conj", "linreg"}
    assert check["passed"] is False and check["failing"]  # 6 steps learn nothing
    assert model.reg_head is not None and model.value_in is not None


def test_stage_a_learns_in_context(tmp_path):
    """1000 steps on tokcls4 alone: the base's accuracy at k = W clearly beats k = 0."""
    dm = episode_dm(["tokcls4"], steps=1000, per_family=32)
    learner = FamilyInContextLearner(
        input_shape=dm.input_shape, n_classes=dm.n_classes, batch_size=dm.batch_size,
        eval_every=0, eval_episodes=64, lr=3e-3, warmup_steps=10, n_layer=2, d_model=32,
        n_head=2, d_mlp=64)
    trainer(tmp_path, "a", 1000).fit(learner, datamodule=dm)
    curve = learner.curve()["tokcls4"]
    assert curve[8]["skill"] > curve[0]["skill"] + 0.15
    metrics = json.load(open(os.path.join(tmp_path, "a", "version_0", "metrics.json")))
    assert metrics["schema_version"] == 1 and metrics["status"] == "completed"
    assert "icl_check" in metrics["stage_a"] and "tokcls4" in metrics["stage_a"]["icl_curve"]
    assert metrics["final"]["icl_check_passed"] == metrics["stage_a"]["icl_check"]["passed"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(os.path.join(tmp_path, "a", "version_0")).Reload().Tags()
    assert {"train/loss", "icl/tokcls4/k8", "icl/seen/kW"} <= set(tags["scalars"])
    assert "icl_curve" in tags["images"]


# ----- Stage B ---------------------------------------------------------------------------------


def test_stage_b_refuses_a_base_without_icl(base_path):
    dm = episode_dm(SEEN)
    with pytest.raises(ValueError, match="failed Stage A's icl_check"):
        StreamAdapter(base=base_path, input_shape=dm.input_shape, n_classes=dm.n_classes)


def test_stage_b_trains_only_the_adapter(base_path, adapter_path):
    core, rec = load_adapter(adapter_path)
    base, base_rec = load_base(base_path)
    assert rec["base_sha256"] == base_rec["sha256"] == state_hash(core.base.state_dict())
    assert rec["families"] == SEEN and rec["steps"] == 6
    w1 = [a.w1 for a in core.absorptions.values()]
    assert any(float(w.abs().max()) > 0 for w in w1)  # trained away from the zero init


def test_stage_b_step_zero_is_zero_shot(base_path):
    """A0: `W1 = 0` (fresh adapter) answers every query exactly as the base with no context."""
    dm = episode_dm(SEEN)
    sa = StreamAdapter(base=base_path, allow_weak_base=True, input_shape=dm.input_shape,
                       n_classes=dm.n_classes, chunk_size=4)
    batch = dm.batch(2)
    assert batch["ctx_token"].shape[1] > 0
    with torch.no_grad():
        logits, reg = sa.adapted_outputs(batch)
        z_logits, z_reg = zero_shot_outputs(sa.core.base, batch, sa.vocab)
    torch.testing.assert_close(logits, z_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(reg, z_reg, atol=1e-6, rtol=0)
    # and not trivially: the ICL answers of the same queries (context in the window) differ
    assert not torch.allclose(icl_outputs(sa.core.base, batch, sa.vocab)[0], logits)


def test_distillation_term_pulls_towards_the_icl_teacher(base_path, tmp_path):
    """`distill > 0` adds λ·KL(ICL teacher ‖ adapted) for k ≤ W: the step's gradient is the
    task gradient plus λ times the KL's, and steps on the KL alone bring the adapter closer."""
    dm = episode_dm(SEEN, k_dist="uniform", k_min=2, k_max=8)
    batch = dm.batch(0)
    sa = StreamAdapter(base=base_path, allow_weak_base=True, chunk_size=4, eval_every=0,
                       input_shape=dm.input_shape, n_classes=dm.n_classes)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in sa.core.absorptions.values():
            a.w1.copy_(torch.randn(a.w1.shape, generator=gen) * 0.3)
    with torch.no_grad():
        t_logits, t_reg = icl_outputs(sa.core.base, batch, sa.vocab)

    def kl() -> torch.Tensor:
        logits, reg = sa.adapted_outputs(batch)
        return distill_loss(logits, reg, t_logits, t_reg, batch["family"])

    before = float(kl())
    assert before > 0
    opt = torch.optim.SGD(sa.core.adapter_parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        kl().backward()
        opt.step()
    assert float(kl()) < before
    with pytest.raises(ValueError, match="distill"):
        StreamAdapter(base=base_path, allow_weak_base=True, distill=-1.0,
                      input_shape=dm.input_shape, n_classes=dm.n_classes)


def test_family_loss_and_distill_loss_average_per_family():
    vocab = FamilyVocab()
    family = torch.tensor([0, 0, 2, 2, 2])  # linreg x2, logreg x3
    target = torch.tensor([[1.0], [3.0], [64.0], [65.0], [64.0]])
    reg = torch.tensor([[0.0], [0.0], [9.0], [9.0], [9.0]])
    logits = torch.zeros(5, 1, 16)
    logits[2:, 0, 0] = 10.0  # confident "label 64" for the logreg rows
    loss = family_loss(logits, reg, target, family, vocab)
    ce = torch.nn.functional.cross_entropy(logits[2:, 0], torch.tensor([0, 1, 0]))
    torch.testing.assert_close(loss, torch.tensor((1 + 9) / 2) + ce)
    zero = distill_loss(logits, reg, logits, reg, family)
    assert float(zero) == pytest.approx(0.0, abs=1e-7)


def test_adapter_with_another_base_is_refused(base_path, adapter_path, tmp_path):
    model, rec = load_base(base_path)
    with torch.no_grad():
        model.head.weight.add_(0.01)
    rec = {**rec, "state_dict": model.state_dict(), "sha256": state_hash(model.state_dict())}
    other = str(tmp_path / "other.pt")
    save_atomic(rec, other)
    with pytest.raises(ValueError, match="trained on base"):
        load_adapter(adapter_path, other)


# ----- stream mode -----------------------------------------------------------------------------


def context_stream(**kw):
    args = {"family": "tokcls4", "n_tasks": 3, "order": [0, 1, 0, 2], "examples_per_segment": 24,
            "batch_size": 4, "n_test": 16, "seed": 0, "n_items": 64, "n_labels": 16}
    return ContextStream(**{**args, **kw}).build()


def stream_learner(base_path, adapter_path, **kw) -> TestTimeStreamAdapter:
    st = context_stream()
    return TestTimeStreamAdapter(base=base_path, adapter=adapter_path,
                                 input_shape=st.input_shape, n_classes=st.n_classes,
                                 batch_size=st.batch_size, log_norms_every=0, **kw)


def test_context_stream_layout():
    st = context_stream()
    assert st.x.shape == (96, 2 + 8) and st.true_shifts == (24, 48, 72)
    assert ((st.y >= 64) & (st.y < 80)).all()
    # a recurring task keeps its item -> label map; different tasks have their own
    def table(s, e):
        return {int(t): int(y) for t, y in zip(st.x[s:e, 0], st.y[s:e])}
    first, again = table(0, 24), table(48, 72)
    assert all(again[t] == first[t] for t in set(first) & set(again))
    with pytest.raises(ValueError, match="label family"):
        ContextStream(family="linreg")


def test_stream_mode_predicts_then_absorbs(base_path, adapter_path):
    sa = stream_learner(base_path, adapter_path, reset_on="none")
    st = context_stream()
    x, y = st.x[:4], st.y[:4]
    before = sa(x)
    logits, loss = sa.observe(x, y)
    assert torch.equal(logits, before)  # test-then-train: pre-absorb predictions
    assert int(sa.core.effective_state()[1]) == 1  # one (masked) chunk of 4 demos absorbed
    assert not torch.allclose(sa(x), before)  # the state now changes the answers
    assert torch.isfinite(logits[:, 64:80]).all() and torch.isinf(logits[:, :64]).all()
    assert sa.configure_optimizers() is None


def test_detector_resets_on_a_loss_jump(base_path, adapter_path):
    sa = stream_learner(base_path, adapter_path, reset_on="detected",
                        detector={"window": 5, "alpha": 1.0, "grace": 3, "sigma_floor": 0.05})
    # the window starts from the zero-shot loss ln 16, pushed out after 5 losses
    lows = [0.3, 0.32, 0.29, 0.31, 0.3, 0.33, 0.3, 0.31]
    fired = [sa._shift(torch.tensor(v)) for v in [*lows, 3.0]]
    assert fired == [False] * len(lows) + [True]
    assert float(sa.detector.window[0, 0]) == pytest.approx(math.log(16))  # re-seeded
    assert int(sa.detector.steps[0]) == 0  # re-seeded: grace again before the next firing


def run_stream(base_path, adapter_path, log_dir, crash_at=None, ckpt_path=None,
               reset_on="detected", batch_size=4):
    st = context_stream(batch_size=batch_size)
    sa = TestTimeStreamAdapter(base=base_path, adapter=adapter_path,
                       input_shape=st.input_shape, n_classes=st.n_classes,
                       batch_size=st.batch_size, log_norms_every=0, reset_on=reset_on,
                       detector={"window": 4, "grace": 2, "sigma_floor": 0.01, "n_sigma": 1.0})
    extra = [SegmentReset()] if reset_on == "segment" else []
    return fit_resumable(sa, st, log_dir, crash_at, ckpt_path, extra), sa


@pytest.mark.parametrize("reset_on", ["detected", "segment"])
def test_stream_resumed_mid_segment_predicts_the_same(base_path, strong_adapter_path, tmp_path,
                                                      reset_on):
    """Batches of 3 against chunks of 4: the step-10 checkpoint (30 demos, in task 1) holds
    pending positions; the resumed run ends with the same state, resets and metrics."""
    args = (base_path, strong_adapter_path)
    whole, sa_whole = run_stream(*args, str(tmp_path / "whole"), reset_on=reset_on,
                                 batch_size=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stream(*args, str(tmp_path / "cut"), crash_at=12, reset_on=reset_on, batch_size=3)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    state = saved["adaptlab_learner"]["stream_state"]
    assert saved["global_step"] == 10 and state["n"].item() > 0
    assert state["cache_mask"].shape[1] - state["consumed"] > 0  # pending demos were saved
    resumed, sa_res = run_stream(*args, str(tmp_path / "cut"), ckpt_path=str(last),
                                 reset_on=reset_on, batch_size=3)
    assert resumed["accuracy_matrix"]["rows"] == whole["accuracy_matrix"]["rows"]
    assert resumed["final"]["acc_online"] == whole["final"]["acc_online"]
    assert sa_res.resets == sa_whole.resets and sa_whole.resets
    if reset_on == "segment":
        assert sa_whole.resets == [24, 48, 72]
    else:
        for key, buf in sa_whole.detector.state_dict().items():
            torch.testing.assert_close(sa_res.detector.state_dict()[key], buf, equal_nan=True)
    a, b = sa_whole.core.stream_state(), sa_res.core.stream_state()
    for x, y in zip(a["s"], b["s"]):
        torch.testing.assert_close(x, y)
    x = context_stream().test_sets[2][0]
    torch.testing.assert_close(sa_res(x), sa_whole(x))
    # and the state matters: a fresh state answers differently
    sa_res.reset_state(1)
    assert not torch.allclose(sa_res(x), sa_whole(x))


def test_segment_oracle_resets_at_true_changes(base_path, adapter_path, tmp_path):
    metrics, sa = run_stream(base_path, adapter_path, str(tmp_path), reset_on="segment")
    assert sa.resets == [24, 48, 72]
    assert sa.hparams["oracle_segment_info"] is True
    assert len(metrics["accuracy_matrix"]["rows"]) == 4
    assert metrics["shift_detection"] is not None


def test_segment_reset_needs_its_callback(base_path, adapter_path, tmp_path):
    st = context_stream()
    sa = stream_learner(base_path, adapter_path, reset_on="segment")
    with pytest.raises(ValueError, match="SegmentReset callback"):
        trainer(tmp_path, "s", 3).fit(sa, datamodule=StreamDataModule(st))


def test_stream_of_another_size_is_refused(base_path, adapter_path, tmp_path):
    with pytest.raises(ValueError, match="packed examples of the base's size"):
        st = context_stream(size="small")
        TestTimeStreamAdapter(base=base_path, adapter=adapter_path,
                              input_shape=st.input_shape, n_classes=st.n_classes)
    st = context_stream(n_items=60, n_labels=20)  # same vocabulary size, other layout
    sa = TestTimeStreamAdapter(base=base_path, adapter=adapter_path,
                               input_shape=st.input_shape, n_classes=st.n_classes,
                               reset_on="none")
    with pytest.raises(ValueError, match="data.stream.n_items: 60"):
        trainer(tmp_path, "s", 3).fit(sa, datamodule=StreamDataModule(st))


def test_state_follows_the_module_across_dtype_and_device_moves(base_path, adapter_path):
    sa = stream_learner(base_path, adapter_path, reset_on="none")
    st = context_stream()
    sa.observe(st.x[:6], st.y[:6])  # 6 demos: one chunk folded, 2 pending
    sa.double()  # the same path as .to("cuda"): nn.Module._apply
    assert all(s.dtype == torch.float64 for s in sa.core.stream_state()["s"])
    assert sa.core.stream_state()["cache"][0][0].dtype == torch.float64
    assert sa(st.x[6:8].double()).dtype == torch.float64


def test_incomplete_adapter_export_is_refused(adapter_path, tmp_path):
    rec = torch.load(adapter_path, weights_only=True)
    rec["state_dict"] = {k: v for k, v in rec["state_dict"].items() if not k.endswith(".w1")}
    path = str(tmp_path / "broken.pt")
    save_atomic(rec, path)
    with pytest.raises(ValueError, match="does not fit its settings"):
        load_adapter(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not readable"):
        load_adapter(str(tmp_path / "junk.pt"))


def test_stage_b_refuses_unseen_families(base_path, tmp_path):
    dm = episode_dm(["tokcls4", "tokcls8"])
    sa = StreamAdapter(base=base_path, allow_weak_base=True, input_shape=dm.input_shape,
                       n_classes=dm.n_classes, eval_every=0)
    with pytest.raises(ValueError, match=r"\['tokcls8'\] are held out as unseen"):
        trainer(tmp_path, "u", 1).fit(sa, datamodule=dm)


def test_stream_mode_needs_an_adapter_export(base_path):
    st = context_stream()
    with pytest.raises(ValueError, match="needs a Stage B export"):
        TestTimeStreamAdapter(base=base_path, input_shape=st.input_shape,
                              n_classes=st.n_classes)
    with pytest.raises(FileNotFoundError, match="no Stage B export"):
        TestTimeStreamAdapter(base=base_path, adapter="/nonexistent.pt",
                              input_shape=st.input_shape, n_classes=st.n_classes)


def test_deprecated_mode_is_refused_or_warned(base_path, adapter_path):
    """`mode`, from the old one-class API: `stream` points to the new class, `meta_train`
    still trains (with a warning)."""
    st = context_stream()
    with pytest.raises(ValueError, match="TestTimeStreamAdapter"):
        StreamAdapter(base=base_path, adapter=adapter_path, mode="stream",
                      input_shape=st.input_shape, n_classes=st.n_classes)
    with pytest.warns(FutureWarning, match="deprecated"):
        sa = StreamAdapter(base=base_path, mode="meta_train", allow_weak_base=True,
                           input_shape=st.input_shape, n_classes=st.n_classes)
    assert isinstance(sa, StreamAdapter)


def test_cli_weak_base_is_one_line(base_path, tmp_path):
    cmd = [sys.executable, "-m", "adaptlab.cli", "fit", "--config",
           "configs/stream_adapter/classification.yaml", "--model.init_args.base", base_path,
           "--trainer.logger.init_args.save_dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("adaptlab: error: base:") and "icl_check" in lines[-1]


def test_context_stream_report_runs_the_three_policies(base_path, adapter_path, tmp_path):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "csr", os.path.join(root, "tools", "context_stream_report.py"))
    csr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(csr)
    text = csr.main(["--seeds", "0", "--log-dir", str(tmp_path), "--",
                     "--model.init_args.base", base_path, "--model.init_args.adapter",
                     adapter_path, "--data.stream.init_args.examples_per_segment", "16"])
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["detected", "none", "segment"]
    oracle = json.load(open(tmp_path / "stream_adapter" / "segment_s0" / "metrics.json"))
    assert oracle["shift_detection"]["detections"] == [16, 32, 48, 64]  # the true changes


def test_stage_b_samples_chunk_sizes(base_path, tmp_path):
    """`chunk_sizes` draws C per step (seeded): the chunkings seen in training vary, and
    inference keeps `chunk_size`."""
    dm = episode_dm(SEEN, k_dist="uniform", k_min=6, k_max=8)
    sa = StreamAdapter(base=base_path, allow_weak_base=True, chunk_size=4, chunk_sizes=[2, 4],
                       eval_every=0, input_shape=dm.input_shape, n_classes=dm.n_classes)
    seen: list[int] = []
    real = sa.core._fold_full_chunks
    sa.core._fold_full_chunks = lambda: (seen.append(sa.core.chunk_size), real())[1]
    trainer(tmp_path, "c", 6).fit(sa, datamodule=dm)
    assert set(seen) == {2, 4} and sa.core.chunk_size == 4
    with pytest.raises(ValueError, match=r"chunk_sizes: \[3\] do not divide block_size 8"):
        StreamAdapter(base=base_path, allow_weak_base=True, chunk_size=4, chunk_sizes=[3],
                      input_shape=dm.input_shape, n_classes=dm.n_classes)
