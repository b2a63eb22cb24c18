"""TinyGPT: causal, tied head, prefill (K, V) that continues a sequence exactly."""

from __future__ import annotations

import pytest
import torch

from adaptlab.models import TinyGPT


def tiny(**kw) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(40, n_positions=16, n_layer=2, d_model=16, n_head=2, d_mlp=32, **kw)


def test_shapes_tie_and_accessors():
    m = tiny(pad_id=39)
    x = torch.randint(0, 39, (3, 9))
    assert m(x).shape == (3, 9, 40)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert m.get_position_embeddings() is not m.get_input_embeddings()
    assert float(m.get_input_embeddings().weight[39].detach().abs().sum()) == 0.0
    assert m.initializer_range == 0.02
    untied = tiny(tie_head=False)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


def test_causal():
    m = tiny()
    x = torch.randint(0, 40, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 40
    torch.testing.assert_close(m(x)[:, :6], m(y)[:, :6])


def test_prefill_kv_continues_the_sequence():
    m = tiny()
    x = torch.randint(0, 40, (2, 12))
    logits, kv = m.prefill(x[:, :7])
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, 7, 8)
    rest, kv2 = m(x[:, 7:], past_kv=kv, return_kv=True)
    torch.testing.assert_close(rest, m(x)[:, 7:], atol=1e-5, rtol=1e-5)
    assert kv2[1][1].shape == (2, 2, 12, 8)


def test_values_and_errors():
    m = TinyGPT(20, n_positions=8, n_layer=1, d_model=8, n_head=2, d_mlp=16, d_value=5)
    out = m(torch.zeros(2, 4, dtype=torch.long), values=torch.randn(2, 4, 5))
    assert out.shape == (2, 4, 20)
    with pytest.raises(ValueError, match="n_positions"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="d_value=0"):
        tiny()(torch.zeros(1, 3, dtype=torch.long), values=torch.zeros(1, 3, 2))


def test_label_tokens_values_reg_head_and_incremental_prefill():
    """Input = E[token] + E[label_token] + R·value + E_pos (stream_adapter.md §1); prefilling
    in pieces equals one prefill, label tokens and values included."""
    torch.manual_seed(0)
    m = TinyGPT(30, n_positions=12, n_layer=2, d_model=16, n_head=2, d_mlp=32, d_value=3,
                reg_head=True, initializer_range=0.3)
    tok, lab = torch.randint(0, 30, (2, 10)), torch.randint(0, 30, (2, 10))
    val = torch.randn(2, 10, 3)
    whole, kv = m.prefill(tok, label_tokens=lab, values=val)
    _, kv1 = m.prefill(tok[:, :4], label_tokens=lab[:, :4], values=val[:, :4])
    rest, kv2 = m(tok[:, 4:], label_tokens=lab[:, 4:], values=val[:, 4:], past_kv=kv1,
                  return_kv=True)
    torch.testing.assert_close(rest, whole[:, 4:], atol=1e-5, rtol=1e-5)
    for (k_a, v_a), (k_b, v_b) in zip(kv, kv2):
        torch.testing.assert_close(k_a, k_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_a, v_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(tok, values=val), whole)  # label tokens change the input
    h, _ = m.hidden(tok, label_tokens=lab, values=val)
    assert m.regress(h).shape == (2, 10)
    with pytest.raises(ValueError, match="reg_head"):
        tiny().regress(h[..., :16])
