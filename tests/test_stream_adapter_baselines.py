"""The paper's baselines (TempLoRA, multi-task LoRA, evicting KV) and the recency measure of
the gated recurrence (issue 18)."""

from __future__ import annotations

import pytest
import torch

from adaptlab.models import TinyGPT
from adaptlab.strategies.icl_families import family_loss, icl_outputs, zero_shot_outputs
from adaptlab.strategies.stream_adapter_baselines import (
    LoRA,
    attention_received,
    constant_outputs,
    evict_window,
    evicted_outputs,
    fit_constant,
    kv_bytes_per_position,
    lora_outputs,
    most_attended,
    templora_outputs,
    train_mt_lora,
)
from adaptlab.strategies.stream_adapter_nn import AdaptedGPT, ContextMapper
from adaptlab.streams.icl import ALL_FAMILIES, FamilyVocab, family_batch, value_dim

VOCAB = FamilyVocab(64, 16)


def tiny_base(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=VOCAB.size, n_positions=20, n_layer=2, d_model=32, n_head=4,
                   d_mlp=64, pad_id=VOCAB.pad, d_value=value_dim(), reg_head=True).eval()


def batch(k: int, families=("linreg", "tokcls4"), n: int = 4) -> dict[str, torch.Tensor]:
    return family_batch(list(families), n, k, 3, seed=0, vocab=VOCAB, key=5)


def test_lora_starts_as_the_base_and_is_removed_cleanly():
    base = tiny_base()
    b = batch(0)
    ref = zero_shot_outputs(base, b, VOCAB)
    lora = LoRA(base, rank=4, n_ctx=len(b["family"]))
    out = lora_outputs(base, lora, b, VOCAB)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))  # B = 0
    with torch.no_grad():
        for p in lora.b:
            p.normal_()
    assert not torch.allclose(lora_outputs(base, lora, b, VOCAB)[1], ref[1])
    lora.remove()
    assert torch.equal(zero_shot_outputs(base, b, VOCAB)[1], ref[1])


def test_templora_fits_its_own_context():
    """Trained on each episode's demos, the LoRA answers those demos better than the base."""
    base = tiny_base()
    b = batch(8)
    as_queries = {**b, "q_token": b["ctx_token"], "q_value": b["ctx_value"].clone(),
                  "q_label": torch.full_like(b["ctx_label"], VOCAB.none)}
    as_queries["q_value"][..., -2:] = 0
    target = torch.where(b["family"][:, None] == 0, b["ctx_value"][..., -2],
                         b["ctx_label"].float())
    before = family_loss(*zero_shot_outputs(base, as_queries, VOCAB), target, b["family"], VOCAB)
    after = family_loss(*templora_outputs(base, {**as_queries, "ctx_token": b["ctx_token"]},
                                          VOCAB, rank=4, steps=30, lr=3e-2), target,
                        b["family"], VOCAB)
    assert float(after) < 0.8 * float(before)
    # no demos: nothing to train on, TempLoRA is zero-shot
    b0 = batch(0)
    assert torch.equal(templora_outputs(base, b0, VOCAB)[0], zero_shot_outputs(base, b0,
                                                                                  VOCAB)[0])


def test_mt_lora_learns_the_seen_families_without_context():
    base = tiny_base()
    b = batch(0, families=("linreg",), n=64)
    before = family_loss(*zero_shot_outputs(base, b, VOCAB), b["target"], b["family"], VOCAB)
    lora = train_mt_lora(base, ["linreg"], VOCAB, "tiny", 3, rank=4, steps=40, per_family=16)
    after = family_loss(*lora_outputs(base, lora, b, VOCAB), b["target"], b["family"], VOCAB)
    assert float(after) < float(before)  # the best constant: predict E[y] = 0
    assert not any(p.requires_grad for p in lora.parameters())


def test_evicting_kv_budget_is_the_adapter_state():
    base = tiny_base()
    core = AdaptedGPT(base, n_slots=8, chunk_size=4, block_size=16)
    per_pos = kv_bytes_per_position(base)
    assert per_pos == 2 * 2 * 32 * 4
    m = evict_window(core.state_nbytes, base)
    assert m == core.state_nbytes // per_pos and m * per_pos <= core.state_nbytes
    b = batch(12)
    kept = icl_outputs(base, b, VOCAB, window=m)
    last = {**b, **{f: b[f][:, -m:] for f in ("ctx_token", "ctx_label", "ctx_value")}}
    assert torch.equal(kept[1], icl_outputs(base, last, VOCAB)[1])


@pytest.mark.parametrize("recurrence", ["ema", "additive"])
def test_chunk_weights_reconstruct_the_state(recurrence):
    torch.manual_seed(0)
    m = ContextMapper(2, 8, 3, recurrence=recurrence, gate_bias=0.5)
    with torch.no_grad():
        m.w_g.normal_()
    k, v = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    s, n = m(k, v, chunk_size=4)
    w = m.chunk_weights(k, v, chunk_size=4)
    outs = torch.stack([m.summarize(k[:, :, i:i + 4], v[:, :, i:i + 4])[0]
                        for i in range(0, 20, 4)], -1)  # (B, H, M, d, n)
    assert torch.allclose((outs * w[:, :, :, None]).sum(-1), s, atol=1e-6)
    if recurrence == "ema":
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-6)
    # gate bias +2 (α ≈ 0.88): the first chunk outweighs the last; −2: recent chunks dominate
    for bias, first_wins in ((2.0, True), (-2.0, False)):
        mm = ContextMapper(2, 8, 3, recurrence="ema", gate_bias=bias)
        ww = mm.chunk_weights(k, v, chunk_size=4)
        assert bool((ww[..., 0] > ww[..., -1]).all()) == first_wins


# ----- evicting KV: the most attended demos (H2O) -------------------------------------------


def spotlight_base(special: int, c: float = 20.0) -> TinyGPT:
    """One layer, one head, whose every query attends (almost) only to the positions holding
    token `special`: its embedding alone has a component along `a`, the key direction."""
    torch.manual_seed(0)
    d = 8
    base = TinyGPT(vocab_size=VOCAB.size, n_positions=20, n_layer=1, d_model=d, n_head=1,
                   d_mlp=8, pad_id=VOCAB.pad, d_value=value_dim(), reg_head=True).eval()
    a = torch.zeros(d)
    a[0], a[1] = 1.0, -1.0
    with torch.no_grad():
        base.wpe.weight.zero_()
        base.value_in.weight.zero_()
        base.value_in.bias.zero_()
        base.wte.weight[:, :2] = 0.0  # LayerNorm keeps a·x = 0 for every other token
        base.wte.weight[VOCAB.none] = 0.0
        base.wte.weight[special] = 10.0 * a
        blk = base.blocks[0]
        blk.qkv.weight.zero_()
        blk.qkv.bias.zero_()
        blk.qkv.bias[0] = c  # q = c·e0 at every position
        blk.qkv.weight[d] = a  # k = (LN(h)·a)·e0
    return base


def context(tokens: list[int]) -> dict[str, torch.Tensor]:
    t = torch.tensor([tokens])
    return {"ctx_token": t, "ctx_label": torch.full_like(t, VOCAB.none),
            "ctx_value": torch.zeros(1, len(tokens), value_dim()),
            "q_token": torch.tensor([[1]]), "q_label": torch.tensor([[VOCAB.none]]),
            "q_value": torch.zeros(1, 1, value_dim()), "family": torch.tensor([3])}


def test_attention_received_is_the_attention_of_later_positions():
    """With all-zero query/key weights attention is uniform: key j of T receives
    Σ_{i>j} 1/(i+1) per head and layer."""
    base = tiny_base()
    with torch.no_grad():
        for blk in base.blocks:
            blk.qkv.weight[: 2 * 32].zero_()
            blk.qkv.bias[: 2 * 32].zero_()
    b = batch(7)
    got = attention_received(base, b["ctx_token"], label_tokens=b["ctx_label"],
                             values=b["ctx_value"])
    want = torch.tensor([sum(1 / (i + 1) for i in range(j + 1, 7)) for j in range(7)])
    assert torch.allclose(got, (len(base.blocks) * 4 * want).expand_as(got), atol=1e-5)


def test_most_attended_keeps_the_positions_the_attention_favours():
    special = 5
    base = spotlight_base(special)
    tokens = [9, 10, special, 11, 12, 13, 14, special, 15, 16, 17, 18]
    b = context(tokens)
    # passes of 6 positions: the two spotlit demos survive every eviction
    assert most_attended(base, b, m=2, window=6).tolist() == [[2, 7]]
    assert most_attended(base, b, m=3, window=6)[0, :].tolist().count(2) == 1
    # at k <= m every demo is kept; the budget must leave room for new demos
    assert most_attended(base, context(tokens[:2]), m=2, window=6).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="window"):
        most_attended(base, b, m=6, window=6)
    # the ICL answer is the one on the kept demos; `last` keeps the final two instead
    kept = {**b, "ctx_token": b["ctx_token"][:, [2, 7]], "ctx_label": b["ctx_label"][:, [2, 7]],
            "ctx_value": b["ctx_value"][:, [2, 7]]}
    got = evicted_outputs(base, b, VOCAB, 2, "attended", window=6)
    assert torch.equal(got[0], icl_outputs(base, kept, VOCAB)[0])
    assert torch.equal(evicted_outputs(base, b, VOCAB, 2, "last")[0],
                       icl_outputs(base, b, VOCAB, window=2)[0])
    with pytest.raises(ValueError, match="policy"):
        evicted_outputs(base, b, VOCAB, 2, "random")


def test_constant_answer_is_each_familys_majority():
    table = fit_constant(["tokcls4", "bool_conj", "linreg"], VOCAB, "tiny", 3, seed=0,
                         episodes=256)
    b = batch(0, families=("bool_conj", "linreg"), n=64)
    logits, reg = constant_outputs(table, b, VOCAB)
    conj = b["family"] == ALL_FAMILIES.index("bool_conj")
    ones = (b["target"][conj] == VOCAB.label_start + 1).float().mean()
    assert table[ALL_FAMILIES.index("bool_conj")][0] == int(ones > 0.5)
    assert (logits[conj].argmax(-1) == table[ALL_FAMILIES.index("bool_conj")][0]).all()
    assert abs(table[ALL_FAMILIES.index("linreg")][1]) < 0.1  # E[y] = 0
    assert torch.equal(reg[~conj], torch.full_like(reg[~conj],
                                                   table[ALL_FAMILIES.index("linreg")][1]))
