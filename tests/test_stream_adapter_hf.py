"""StreamAdapter on Hugging Face causal LMs (issue 18): tiny random Llama (grouped-query
attention, rotary) and GPT-2 (learned positions, `Conv1D`) models written offline, with the
properties TinyGPT's adapter has — identity at init, merge equivalence, streaming
equivalence, constant query cost — plus text tasks with option scoring and the CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adaptlab.hf_text import (  # noqa: E402
    PromptFormat,
    TextEpisodeDataModule,
    accuracy,
    draw_episode,
    load_task,
    option_scores,
)
from adaptlab.hf_tiny import make_text_tasks, make_tiny_llm  # noqa: E402
from adaptlab.strategies.stream_adapter_hf import (  # noqa: E402
    AdaptedHF,
    kv_layers,
    load_causal_lm,
)

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
