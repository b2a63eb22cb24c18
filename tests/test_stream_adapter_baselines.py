"""The paper's baselines (TempLoRA, multi-task LoRA, evicting KV) and the recency measure of
the gated recurrence (issue 18)."""

from __future__ import annotations

import pytest
import torch

from adaptlab.models import TinyGPT
from adaptlab.strategies.icl_families import family_loss, icl_outputs, zero_shot_outputs
from adaptlab.strategies.stream_adapter_baselines import (
    LoRA,
    evict_window,
    kv_bytes_per_position,
    lora_outputs,
    templora_outputs,
    train_mt_lora,
)
from adaptlab.strategies.stream_adapter_nn import AdaptedGPT, ContextMapper
from adaptlab.streams.icl import FamilyVocab, family_batch, value_dim

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
