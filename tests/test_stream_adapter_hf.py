"""StreamAdapter on Hugging Face causal LMs (issue 18): tiny random Llama (grouped-query
attention, rotary) and GPT-2 (learned positions, `Conv1D`) models written offline, with the
properties TinyGPT's adapter has — identity at init, merge equivalence, streaming
equivalence, constant query cost — plus text tasks with option scoring and the CLI run, and
the test-time learner on a stream of text tasks: the export and its base hash, test-then-
absorb, resume from a checkpoint, the CLI run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adaptlab.hf_text import (  # noqa: E402
    PAD,
    PromptFormat,
    TextEpisodeDataModule,
    TextStream,
    accuracy,
    draw_episode,
    load_task,
    option_scores,
    pack_example,
    unpack_rows,
)
from adaptlab.hf_tiny import make_text_tasks, make_tiny_llm  # noqa: E402
from adaptlab.strategies.icl_families import save_atomic  # noqa: E402
from adaptlab.strategies.stream_adapter import SegmentReset  # noqa: E402
from adaptlab.strategies.stream_adapter_hf import (  # noqa: E402
    AdaptedHF,
    HFStreamAdapter,
    HFTestTimeStreamAdapter,
    kv_layers,
    load_causal_lm,
    load_hf_adapter,
    model_sha256,
)
from tests.helpers import fit_resumable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Text tasks and one tiny model folder per family (save_pretrained output)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_llm")
    make_text_tasks(str(root / "tasks"), seed=0)
    out = {"tasks": str(root / "tasks")}
    for fam in FAMILIES:
        out[fam] = make_tiny_llm(str(root / fam), fam, str(root / "tasks"), seed=0)
    return out


def adapted(path: str, **kw) -> AdaptedHF:
    torch.manual_seed(0)
    args = {"n_slots": 2, "chunk_size": 4, "block_size": 16, **kw}
    return AdaptedHF(load_causal_lm(path), **args)


def randomise_w1(a: AdaptedHF) -> None:
    """`W1 = 0` at init makes every check trivially equal; give it values."""
    g = torch.Generator().manual_seed(1)
    for ab in a.absorptions.values():
        ab.w1.data = torch.randn(ab.w1.shape, generator=g) * 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_and_frozen_base(tiny, family):
    a = adapted(tiny[family])
    q = torch.randint(0, 100, (3, 5))
    base = a.base(input_ids=q).logits
    a.absorb(torch.randint(0, 100, (1, 37)))
    assert torch.equal(a.logits(q), base)  # W1 = 0: the adapted model is the base
    assert not any(p.requires_grad for p in a.base.parameters())
    assert all(p.requires_grad for p in a.adapter_parameters())
    assert not a.base.training


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_side_branch_and_uncommit_restores(tiny, family):
    a = adapted(tiny[family])
    randomise_w1(a)
    q = torch.randint(0, 100, (3, 5))
    weights = {n: p.clone() for n, p in a.base.named_parameters()}
    base = a.base(input_ids=q).logits
    a.absorb(torch.randint(0, 100, (1, 37)))
    side = a.logits(q)
    assert (side - base).abs().max() > 1e-2  # the state changes the answers
    a.commit()
    assert torch.allclose(a.logits(q), side, atol=1e-5)
    a.uncommit()
    assert all(torch.equal(p, weights[n]) for n, p in a.base.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_one_call(tiny, family):
    ctx, q = torch.randint(0, 100, (1, 45)), torch.randint(0, 100, (2, 4))
    a = adapted(tiny[family])
    randomise_w1(a)
    a.absorb(ctx)
    whole_state, whole = a.effective_state(), a.logits(q)
    a.reset_state(1)
    for lo, hi in ((0, 3), (3, 17), (17, 18), (18, 45)):  # across chunks and blocks
        a.absorb(ctx[:, lo:hi])
    for s, t in zip(whole_state[0], a.effective_state()[0]):
        assert torch.allclose(s, t, atol=1e-6)
    assert torch.allclose(a.logits(q), whole, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_cost_does_not_grow_with_the_context(tiny, family):
    """The state has one size at every k, the encoder cache stays within one block, and a
    query runs over its own positions only (no past, no context tokens)."""
    a = adapted(tiny[family])
    seen: list[tuple[int, bool]] = []
    emb = a.base.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], False)))
    q = torch.randint(0, 100, (1, 5))
    sizes = []
    for k in (4, 64, 256):
        a.reset_state(1)
        a.absorb(torch.randint(0, 100, (1, k)))
        assert a.pending <= a.block_size
        sizes.append(a.state_nbytes)
        seen.clear()
        a.commit()
        a.logits(q)
        a.uncommit()
        assert [s for s, _ in seen] == [5]
    handle.remove()
    assert len(set(sizes)) == 1


def test_gqa_and_rotary_read_the_kv_cache(tiny):
    """Llama's mapper has one query set per key/value head (2 of 4 heads), width head_dim;
    what it reads is the model's own cache (rotated keys)."""
    a = adapted(tiny["llama"])
    cfg = a.base.config
    m = a.mappers["0"]
    assert (m.n_head, m.d_head) == (cfg.num_key_value_heads, cfg.hidden_size // 4) == (2, 8)
    ids = torch.randint(0, 100, (1, 16))
    kv = a._encode(ids, {}, None)
    ref = kv_layers(a.base(input_ids=ids, use_cache=True).past_key_values)
    assert kv[0][0].shape == (1, 2, 16, 8) and torch.equal(kv[0][0], ref[0][0])
    a2 = adapted(tiny["gpt2"])
    assert a2.mappers["0"].n_head == a2.base.config.num_attention_heads


def test_targets_by_name(tiny):
    llama = adapted(tiny["llama"], targets=["q_proj", "down_proj"], layers=1)
    assert sorted(llama.absorptions) == ["1_mlp_down_proj", "1_self_attn_q_proj"]
    gpt2 = adapted(tiny["gpt2"], targets="all")
    assert "0_attn_c_attn" in gpt2.absorptions and gpt2.absorptions["0_attn_c_attn"].transposed
    with pytest.raises(ValueError, match="unknown 'gate_proj'"):
        adapted(tiny["gpt2"], targets=["gate_proj"])
    with pytest.raises(ValueError, match="ambiguous"):
        adapted(tiny["gpt2"], targets=["c_proj"])


def test_text_episodes_and_option_scoring(tiny):
    data = TextEpisodeDataModule(model_path=tiny["llama"], tasks_dir=tiny["tasks"],
                                 tasks=["map_0"], n_query=3, per_task=2, k_max=8, steps=2)
    ex = load_task(tiny["tasks"], "map_0")
    fmt = PromptFormat(data.tokenizer)
    ep = draw_episode(ex, fmt, "map_0", 4, 3, seed=0, key=7)
    assert ep == draw_episode(ex, fmt, "map_0", 4, 3, seed=0, key=7)  # a pure function
    assert len(ep.prompts) == 3 and all(len(o) == 2 for o in ep.options)
    a = adapted(tiny["llama"])
    base = a.base
    # with no context in the window and W1 = 0, the adapter scores exactly as the base
    a.absorb(torch.tensor([ep.context]))
    sa = option_scores(lambda i, m: a.logits(i, m, per_context=6), [ep], data.pad, False)
    zs = option_scores(lambda i, m: base(input_ids=i, attention_mask=m).logits, [ep],
                       data.pad, False)
    assert torch.equal(sa, zs) and torch.isfinite(sa).all()
    icl = option_scores(lambda i, m: base(input_ids=i, attention_mask=m).logits, [ep],
                        data.pad, True)
    assert not torch.equal(icl, zs)  # the demos in the window change the scores
    assert 0 <= float(accuracy(icl, [ep])) <= 1


def test_cli_pipeline_on_a_tiny_random_llama(tiny, tmp_path):
    """`adaptlab fit --config configs/stream_adapter/text_tiny_cpu.yaml` end to end:
    meta-training, SA/ICL/zero-shot accuracy per task and k, the export."""
    from adaptlab.cli import main

    export, logs = str(tmp_path / "adapter.pt"), str(tmp_path / "logs")
    args = ["fit", "--config", str(ROOT / "configs/stream_adapter/text_tiny_cpu.yaml"),
            "--model.init_args.model_path", tiny["llama"], "--data.init_args.model_path",
            tiny["llama"], "--data.init_args.tasks_dir", tiny["tasks"],
            "--model.init_args.export", export, "--trainer.logger.init_args.save_dir", logs,
            "--trainer.max_steps", "4", "--data.init_args.steps", "4",
            "--model.init_args.eval_episodes", "2", "--model.init_args.eval_ks", "[0, 4]"]
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code
    doc = json.load(open(Path(logs) / "stream_adapter" / "text_tiny_cpu" / "metrics.json"))
    acc = doc["stage_b"]["accuracy"]
    assert doc["stage_b"]["steps"] == 4
    assert set(acc["StreamAdapter"]) == {"map_0", "map_1", "map_4", "map_5"}
    assert acc["StreamAdapter"]["map_4"]["0"] == acc["ICL"]["map_4"]["0"]  # k = 0: zero-shot
    rec = torch.load(export, weights_only=False)
    assert not any(k.startswith("base.") for k in rec["state_dict"])
    assert rec["format"] == "adaptlab.stream_adapter_hf/1"


# ----- the test-time learner on a stream of text tasks ----------------------------------------

STREAM_TASKS = ["map_0", "map_1", "map_2", "map_3", "map_4"]


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory) -> dict[str, str]:
    """A Stage B export per family, with large random `W1`: the state then moves every answer,
    so a state lost or mis-absorbed could not go unnoticed (no training needed for that)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fam in FAMILIES:
        dm = TextEpisodeDataModule(model_path=tiny[fam], tasks_dir=tiny["tasks"],
                                   tasks=["map_0"], steps=1)
        sa = HFStreamAdapter(model_path=tiny[fam], n_slots=2, chunk_size=6, block_size=36,
                             targets="all", input_shape=(1,), n_classes=dm.n_classes)
        g = torch.Generator().manual_seed(1)
        for ab in sa.core.absorptions.values():
            ab.w1.data = torch.randn(ab.w1.shape, generator=g) * 3.0
        out[fam] = str(root / f"{fam}.pt")
        save_atomic(sa.adapter_record(dm), out[fam])
    return out


def text_stream(tiny, family="llama", **kw):
    args = {"model_path": tiny[family], "tasks_dir": tiny["tasks"], "tasks": STREAM_TASKS,
            "order": [0, 1, 0, 4], "examples_per_segment": 12, "batch_size": 3, "n_test": 6,
            "seed": 0, **kw}
    return TextStream(**args).build()


def hf_learner(export, st, **kw) -> HFTestTimeStreamAdapter:
    return HFTestTimeStreamAdapter(adapter=export, input_shape=st.input_shape,
                                   n_classes=st.n_classes, batch_size=st.batch_size,
                                   log_norms_every=0, **kw)


def test_text_stream_layout_and_packing(tiny):
    st = text_stream(tiny)
    assert st.x.dtype == torch.long and st.x.shape[0] == 48 and st.n_classes == 2
    assert st.true_shifts == (12, 24, 36) and st.eval_positions == (12, 24, 36, 48)
    assert [s.name for s in st.segments] == ["map_0", "map_1", "map_4"]
    assert all(len(y) == 6 for _, y in st.test_sets.values())
    assert st.fingerprint == text_stream(tiny).fingerprint
    assert not torch.equal(text_stream(tiny, seed=1).x, st.x)
    assert not torch.equal(st.x[:12], st.x[24:36])  # a recurring task brings fresh examples
    # a row unpacks to the prompt, one continuation and one demo per option
    fmt = PromptFormat(TextEpisodeDataModule(model_path=tiny["llama"], tasks_dir=tiny["tasks"],
                                             tasks=["map_0"], steps=1).tokenizer)
    ex = load_task(tiny["tasks"], "map_3")[5]
    row = torch.tensor([pack_example(fmt, ex) + [PAD] * 3])
    (got,) = unpack_rows(row)
    assert (got.prompt, got.options) == fmt.query(ex)
    assert got.demos[ex.answer] == fmt.demo(ex) and len(got.demos) == len(ex.options)
    with pytest.raises(ValueError, match="order: task indices"):
        TextStream(model_path=tiny["llama"], tasks_dir=tiny["tasks"], tasks=["map_0"],
                   order=[0, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_stream_learner_predicts_then_absorbs(tiny, exports, family):
    st = text_stream(tiny, family)
    sa = hf_learner(exports[family], st, reset_on="none")
    x, y = st.x[:3], st.y[:3]
    before = sa(x)
    logits, loss = sa.observe(x, y)
    assert torch.equal(logits, before)  # test-then-absorb: pre-absorb predictions
    assert logits.shape == (3, 2) and torch.isfinite(logits).all() and torch.isfinite(loss)
    assert sa.core.pending > 0 or int(sa.core.effective_state()[1]) > 0
    after = sa(x)
    assert not torch.allclose(after, before)  # the absorbed demos change the answers
    assert sa.configure_optimizers() is None
    # absorbing example by example is absorbing the batch: any split of the demo stream
    one = hf_learner(exports[family], st, reset_on="none")
    for i in range(3):
        one.observe(x[i:i + 1], y[i:i + 1])
    torch.testing.assert_close(one(x), after, atol=1e-5, rtol=1e-5)
    # the demos absorbed are the answers': other labels give another state
    other = hf_learner(exports[family], st, reset_on="none")
    other.observe(x, 1 - y)
    assert not torch.allclose(other(x), after)


def test_hf_export_records_the_base_hash_and_refuses_another(tiny, exports, tmp_path):
    rec = torch.load(exports["llama"], weights_only=True)
    assert rec["base_sha256"] == model_sha256(tiny["llama"]) != model_sha256(tiny["gpt2"])
    assert rec["dtype"] == "float32" and "{output}" in rec["template"]
    assert not any(k.startswith("base.") for k in rec["state_dict"])
    core, _ = load_hf_adapter(exports["llama"])
    for key, value in rec["state_dict"].items():
        assert torch.equal(core.state_dict()[key], value)
    copy = tmp_path / "copy"
    shutil.copytree(tiny["llama"], copy)  # the same files elsewhere: accepted
    load_hf_adapter(exports["llama"], str(copy))
    model = load_causal_lm(str(copy))
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(str(copy))
    with pytest.raises(ValueError, match="trained on base") as err:
        load_hf_adapter(exports["llama"], str(copy))
    assert "\n" not in str(err.value) and str(copy) in str(err.value)
    with pytest.raises(ValueError, match="trained on base"):
        HFTestTimeStreamAdapter(adapter=exports["llama"], model_path=tiny["gpt2"],
                                input_shape=(10,), n_classes=2)
    with pytest.raises(FileNotFoundError, match="no Stage B export"):
        HFTestTimeStreamAdapter(adapter=str(tmp_path / "none.pt"), input_shape=(10,),
                                n_classes=2)


def run_text_stream(tiny, export, log_dir, crash_at=None, ckpt_path=None,
                    reset_on="detected"):
    st = text_stream(tiny)
    sa = HFTestTimeStreamAdapter(
        adapter=export, input_shape=st.input_shape, n_classes=st.n_classes,
        batch_size=st.batch_size, log_norms_every=0, reset_on=reset_on,
        detector={"window": 3, "grace": 1, "sigma_floor": 0.01, "n_sigma": 0.5})
    extra = [SegmentReset()] if reset_on == "segment" else []
    return fit_resumable(sa, st, log_dir, crash_at, ckpt_path, extra), sa


@pytest.mark.parametrize("reset_on", ["detected", "segment"])
def test_hf_stream_resumed_mid_segment_predicts_the_same(tiny, exports, tmp_path, reset_on):
    """Batches of 3 demos (~21 tokens each) against chunks of 6 tokens: the step-5 checkpoint
    (15 examples, in task 1) holds pending positions; the resumed run ends with the same
    state, resets (before and after the cut) and metrics. The checkpoint holds the adapter
    and the state, not the frozen base."""
    export = exports["llama"]
    whole, sa_whole = run_text_stream(tiny, export, str(tmp_path / "whole"), reset_on=reset_on)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_text_stream(tiny, export, str(tmp_path / "cut"), crash_at=7, reset_on=reset_on)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    state = saved["adaptlab_learner"]["stream_state"]
    assert saved["global_step"] == 5 and state["cache_mask"].shape[1] > state["consumed"]
    assert not any(k.startswith("core.base.") for k in saved["state_dict"])
    assert any(k.startswith("core.absorptions.") for k in saved["state_dict"])
    resumed, sa_res = run_text_stream(tiny, export, str(tmp_path / "cut"), ckpt_path=str(last),
                                      reset_on=reset_on)
    assert resumed["accuracy_matrix"]["rows"] == whole["accuracy_matrix"]["rows"]
    assert resumed["final"]["acc_online"] == whole["final"]["acc_online"]
    assert sa_res.resets == sa_whole.resets
    assert min(sa_whole.resets) < 15 < max(sa_whole.resets)
    if reset_on == "segment":
        assert sa_whole.resets == [12, 24, 36]
    else:
        for key, buf in sa_whole.detector.state_dict().items():
            torch.testing.assert_close(sa_res.detector.state_dict()[key], buf, equal_nan=True)
    for a, b in zip(sa_whole.core.stream_state()["s"], sa_res.core.stream_state()["s"]):
        torch.testing.assert_close(a, b)
    x = text_stream(tiny).test_sets[4][0]
    torch.testing.assert_close(sa_res(x), sa_whole(x))
    sa_res.reset_state(1)  # and the state matters: a fresh state answers differently
    assert not torch.allclose(sa_res(x), sa_whole(x))


def test_hf_detector_seeds_with_the_chance_loss(tiny, exports):
    st = text_stream(tiny)
    sa = hf_learner(exports["llama"], st, reset_on="detected",
                    detector={"window": 4, "alpha": 1.0, "grace": 2, "sigma_floor": 0.05})
    lows = [0.2, 0.22, 0.19, 0.21, 0.2, 0.22]
    assert [sa._shift(torch.tensor(v)) for v in [*lows, 3.0]] == [False] * len(lows) + [True]
    assert float(sa.detector.window[0, 0]) == pytest.approx(torch.log(torch.tensor(2.0)))


def test_cli_text_stream_on_a_tiny_random_llama(tiny, exports, tmp_path):
    """`adaptlab fit --config configs/stream_adapter/text_stream_tiny_cpu.yaml` end to end
    (oracle resets here, so the shift events are known): metrics.json, TensorBoard."""
    from adaptlab.cli import main

    logs = str(tmp_path / "logs")
    args = ["fit", "--config", str(ROOT / "configs/stream_adapter/text_stream_tiny_cpu.yaml"),
            "--model.init_args.adapter", exports["llama"],
            "--data.stream.init_args.model_path", tiny["llama"],
            "--data.stream.init_args.tasks_dir", tiny["tasks"],
            "--data.stream.init_args.examples_per_segment", "8",
            "--data.stream.init_args.n_test", "4",
            "--model.init_args.reset_on", "segment",
            "--trainer.callbacks+=adaptlab.strategies.SegmentReset",
            "--evaluator.print_table", "false",
            "--trainer.logger.init_args.save_dir", logs]
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code
    run = Path(logs) / "stream_adapter" / "text_stream_tiny_cpu"
    doc = json.load(open(run / "metrics.json"))
    assert doc["status"] == "completed"
    assert len(doc["accuracy_matrix"]["rows"]) == 4 and set(doc["per_segment"]) == {"0", "1", "4"}
    assert 0 <= doc["final"]["acc_online"] <= 1
    assert doc["shift_detection"]["detections"] == [8, 16, 24]  # the true changes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert "state_norm/layer0" in tags and any(t.startswith("dw_ratio/") for t in tags)
