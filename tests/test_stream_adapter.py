"""AdaptedGPT, first slice (spec `stream_adapter.md` §8, items 1–8 minus checkpoints).

A random tiny TinyGPT (2 layers, d 16, 2 heads) with a large init, so keys and values differ
enough between positions for a broken mask, block or merge to show. `W1` is set non-zero
wherever an output comparison must be able to fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptlab.models import TinyGPT
from adaptlab.strategies.stream_adapter import AdaptedGPT, ContextMapper, read_state

torch.set_num_threads(1)

VOCAB, N_POS, D_VALUE = 24, 16, 3


def make_base(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(
        VOCAB, n_positions=N_POS, n_layer=2, d_model=16, n_head=2, d_mlp=32,
        d_value=D_VALUE, initializer_range=0.3,
    )


def make_adapter(seed: int = 0, perturb: bool = True, **kwargs) -> AdaptedGPT:
    """Adapter with C = 4, B_enc = 8; `perturb` gives every `W1` a random non-zero value."""
    base = make_base(seed)
    kwargs = {"n_slots": 2, "chunk_size": 4, "block_size": 8, **kwargs}
    adapter = AdaptedGPT(base, **kwargs)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for a in adapter.absorptions.values():
                a.w1.copy_(torch.randn(a.w1.shape, generator=gen) * 0.5)
    return adapter


def context(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=gen)
    return tokens, torch.randn(batch, length, D_VALUE, generator=gen)


QUERY = torch.tensor([[3], [7]])


def base_weights(adapter: AdaptedGPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.base.state_dict().items()}


# 1. identity at init -------------------------------------------------------------------------


def test_identity_at_init_zero_w1() -> None:
    adapter = make_adapter(perturb=False)
    tokens, values = context(1, 13)
    adapter.absorb(tokens, values)
    q = QUERY[:1]
    with torch.no_grad():
        ref = adapter.base(q)
        assert torch.equal(adapter(q), ref)
        adapter.commit()
        assert torch.equal(adapter(q), ref)


def test_identity_with_empty_state_and_change_with_context() -> None:
    adapter = make_adapter()  # W1 != 0
    q = QUERY[:1]
    with torch.no_grad():
        ref = adapter.base(q)
        torch.testing.assert_close(adapter(q), ref, atol=1e-6, rtol=0)
        adapter.commit()  # empty state: ΔW = 0
        torch.testing.assert_close(adapter(q), ref, atol=1e-6, rtol=0)
        adapter.absorb(*context(1, 6))
        assert (adapter(q) - ref).abs().max() > 1e-3  # the branch is live


# 2. merge equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [("v", "o", "fc1", "fc2"), "all"])
def test_merge_equals_side_branch_and_uncommit_is_bitwise(targets) -> None:
    adapter = make_adapter(targets=targets)
    adapter.absorb(*context(1, 11))
    original = base_weights(adapter)
    q = QUERY[:1]
    with torch.no_grad():
        side = adapter(q)
        assert (side - adapter.base(q)).abs().max() > 1e-3
        adapter.commit()
        assert adapter.committed
        assert any(not torch.equal(v, original[k]) for k, v in adapter.base.state_dict().items())
        torch.testing.assert_close(adapter(q), side, atol=1e-5, rtol=0)
        adapter.commit()  # re-commit replaces, never stacks
        torch.testing.assert_close(adapter(q), side, atol=1e-5, rtol=0)
    adapter.uncommit()
    adapter.uncommit()  # idempotent
    assert not adapter.committed
    for k, v in adapter.base.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_absorb_after_commit_uses_unadapted_base() -> None:
    tokens, values = context(1, 14)
    plain, committed = make_adapter(), make_adapter()
    with torch.no_grad():
        plain.absorb(tokens, values)
        committed.absorb(tokens[:, :6], values[:, :6])
        committed.commit()
        committed.absorb(tokens[:, 6:], values[:, 6:])
        assert not committed.committed
        (s1, n1), (s2, n2) = plain.effective_state(), committed.effective_state()
    assert torch.equal(n1, n2)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# 3. streaming equivalence --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_split_points_do_not_matter(seed: int) -> None:
    tokens, values = context(1, 29, seed)  # 3 blocks of 8 and a pending tail of 5
    one, split = make_adapter(seed), make_adapter(seed)
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(28, generator=gen)[:9].add(1).tolist())
    cuts = sorted({*cuts, 1, 2, 3})  # single demos included
    with torch.no_grad():
        one.absorb(tokens, values)
        for lo, hi in zip([0, *cuts], [*cuts, 29]):
            split.absorb(tokens[:, lo:hi], values[:, lo:hi])
        (s1, n1), (s2, n2) = one.effective_state(), split.effective_state()
        assert n1.tolist() == [8] and torch.equal(n1, n2)  # 7 full chunks + the folded tail
        for a, b in zip(s1, s2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        out = one(QUERY[:1])
        torch.testing.assert_close(split(QUERY[:1]), out, atol=1e-5, rtol=0)
        one.commit()
        split.commit()
        torch.testing.assert_close(split(QUERY[:1]), one(QUERY[:1]), atol=1e-5, rtol=0)


def test_pending_tail_is_not_consumed() -> None:
    adapter = make_adapter()
    tokens, values = context(1, 6)
    with torch.no_grad():
        adapter.absorb(tokens[:, :3], values[:, :3])
        assert adapter.pending == 3 and adapter.effective_state()[1].item() == 1
        assert adapter.effective_state()[1].item() == 1  # reading twice changes nothing
        adapter.absorb(tokens[:, 3:], values[:, 3:])
        assert adapter.pending == 2 and adapter.effective_state()[1].item() == 2


# 4. padding invariance -----------------------------------------------------------------------


def test_masked_keys_change_nothing() -> None:
    tokens, values = context(1, 11)
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[:, 9:] = False
    other_tokens, other_values = tokens.clone(), values.clone()
    other_tokens[:, 9:] = (tokens[:, 9:] + 5) % VOCAB
    other_values[:, 9:] += 3.0
    a, b = make_adapter(), make_adapter()
    with torch.no_grad():
        a.absorb(tokens, values, mask)
        b.absorb(other_tokens, other_values, mask)
        for x, y in zip(a.effective_state()[0], b.effective_state()[0]):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        # the same change with the mask off must show (the test can fail)
        a.reset_state()
        b.reset_state()
        a.absorb(tokens, values)
        b.absorb(other_tokens, other_values)
        diff = max((x - y).abs().max() for x, y in zip(a.effective_state()[0],
                                                       b.effective_state()[0]))
        assert diff > 1e-4


def test_fully_padded_chunk_leaves_state_unchanged() -> None:
    adapter = make_adapter()
    tokens, values = context(1, 12)
    with torch.no_grad():
        adapter.absorb(tokens[:, :8], values[:, :8])
        s0, n0 = adapter.effective_state()
        adapter.absorb(tokens[:, 8:], values[:, 8:], torch.zeros(1, 4, dtype=torch.bool))
        assert adapter.pending == 0  # the padded chunk was folded, not left waiting
        s1, n1 = adapter.effective_state()
    assert torch.equal(n0, n1)
    for a, b in zip(s0, s1):
        assert torch.equal(a, b)
    mapper = adapter.mappers["0"]
    k = torch.randn(2, 2, 4, 8)
    s, n = torch.randn(2, 2, 2, 8), torch.tensor([1, 3])
    mask = torch.tensor([[False] * 4, [True, False, False, False]])
    s_new, n_new = mapper.step(s, n, k, k, mask)
    assert torch.equal(s_new[0], s[0]) and n_new.tolist() == [1, 4]
    assert not torch.allclose(s_new[1], s[1])


def test_batch_of_unequal_contexts_equals_each_alone() -> None:
    lengths = (13, 21)
    tokens, values = context(2, 21, seed=3)
    mask = torch.arange(21)[None, :] < torch.tensor(lengths)[:, None]
    batched = make_adapter(seed=4)
    batched.reset_state(batch=2)
    with torch.no_grad():
        batched.absorb(tokens, values, mask)
        states, n = batched.effective_state()
        out = batched(QUERY)
        for i, length in enumerate(lengths):
            alone = make_adapter(seed=4)
            alone.absorb(tokens[i : i + 1, :length], values[i : i + 1, :length])
            s_alone, n_alone = alone.effective_state()
            assert n[i] == n_alone[0]
            for a, b in zip(states, s_alone):
                torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=0)
            torch.testing.assert_close(out[i : i + 1], alone(QUERY[i : i + 1]), atol=1e-5, rtol=0)


# 5. frozen base ------------------------------------------------------------------------------


def _stage_b_loss(adapter: AdaptedGPT) -> torch.Tensor:
    adapter.reset_state(batch=2)
    adapter.absorb(*context(2, 14, seed=5))  # 3 valid chunks and a pending tail: gates are used
    logits = adapter(QUERY)
    return torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([1, 2]))


def test_base_frozen_and_only_w1_moves_first() -> None:
    adapter = make_adapter(perturb=False)
    params = adapter.adapter_parameters()
    base_ids = {id(p) for p in adapter.base.parameters()}
    assert params and not base_ids & {id(p) for p in params}
    assert all(not p.requires_grad for p in adapter.base.parameters())
    _stage_b_loss(adapter).backward()
    assert all(p.grad is None for p in adapter.base.parameters())
    assert all(k.grad_fn is None and v.grad_fn is None for k, v in adapter._cache)
    for name, p in adapter.named_parameters():
        if name.startswith("base."):
            continue
        assert p.grad is not None, name
        if name.endswith(".w1"):
            assert p.grad.abs().sum() > 0, name
        else:
            assert torch.count_nonzero(p.grad) == 0, name
    torch.optim.SGD(params, lr=0.5).step()
    adapter.zero_grad()
    _stage_b_loss(adapter).backward()
    assert all(p.grad is None for p in adapter.base.parameters())
    for name, p in adapter.named_parameters():
        if not name.startswith("base."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_mode_keeps_base_in_eval() -> None:
    adapter = make_adapter()
    adapter.train()
    assert adapter.training and adapter.mappers.training and not adapter.base.training


# 6. constant query cost ----------------------------------------------------------------------


def _query_cost(adapter: AdaptedGPT, k: int) -> dict[str, object]:
    adapter.reset_state()
    seen: list[tuple] = []
    handle = adapter.base.blocks[0].register_forward_pre_hook(  # (B, T) and the KV past
        lambda m, args: seen.append((tuple(args[0].shape[:2]), args[1] if len(args) > 1 else None))
    )
    tokens, values = context(1, k, seed=k)
    max_cache = 0
    with torch.no_grad():
        for lo in range(0, k, 3):
            adapter.absorb(tokens[:, lo : lo + 3], values[:, lo : lo + 3])
            if adapter._cache is not None:
                max_cache = max(max_cache, adapter._cache[0][0].shape[2])
        seen.clear()
        with FlopCounterMode(display=False) as side:
            adapter(QUERY[:1])
        adapter.commit()
        with FlopCounterMode(display=False) as merged:
            adapter(QUERY[:1])
    handle.remove()
    return {
        "side": side.get_total_flops(), "merged": merged.get_total_flops(),
        "calls": seen, "nbytes": adapter.state_nbytes, "n": adapter.effective_state()[1].item(),
        "max_cache": max_cache,
    }


def test_query_cost_and_state_size_do_not_grow_with_demos() -> None:
    adapter = make_adapter()
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        adapter.base(QUERY[:1])
    few, many = _query_cost(adapter, 4), _query_cost(adapter, 256)
    assert few["n"] == 1 and many["n"] == 64  # the demos really were absorbed
    assert few["side"] == many["side"] > plain.get_total_flops()  # branch active, flat in k
    assert few["merged"] == many["merged"] == plain.get_total_flops()
    assert few["nbytes"] == many["nbytes"] > 0
    # the query runs alone at position 0: its input is the query, never the context
    assert few["calls"] == many["calls"] == [((1, 1), None)] * 2
    assert many["max_cache"] <= adapter.block_size


# 7. gate limits ------------------------------------------------------------------------------


def _chunks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)


@pytest.mark.parametrize("recurrence", ["ema", "additive"])
def test_gate_one_keeps_state_gate_zero_replaces(recurrence: str) -> None:
    torch.manual_seed(0)
    mapper = ContextMapper(2, 8, n_slots=3, recurrence=recurrence)
    assert torch.count_nonzero(mapper.w_g) == 0
    k, v = _chunks()
    summaries = [mapper.summarize(k[:, :, i : i + 4], v[:, :, i : i + 4])[0] for i in (0, 4, 8)]
    assert (summaries[0] - summaries[2]).abs().max() > 1e-3
    with torch.no_grad():
        mapper.b_g.fill_(30.0)  # α = 1
        s, n = mapper(k, v, chunk_size=4)
        assert n.tolist() == [3, 3]
        expected = summaries[0] if recurrence == "ema" else sum(summaries)
        torch.testing.assert_close(s, expected, atol=1e-5, rtol=0)
        mapper.b_g.fill_(-30.0)  # α = 0
        s, _ = mapper(k, v, chunk_size=4)
        torch.testing.assert_close(s, summaries[2], atol=1e-5, rtol=0)


def test_gate_zero_gives_last_chunk_computed_within_its_block() -> None:
    adapter = make_adapter()
    with torch.no_grad():
        for mapper in adapter.mappers.values():
            mapper.b_g.fill_(-30.0)
        tokens, values = context(1, 16)
        adapter.absorb(tokens, values)
        states, n = adapter.effective_state()
        assert n.item() == 4
        # block 2 encoded on its own, from position 0
        _, kvs = adapter.base(tokens[:, 8:], values=values[:, 8:], return_kv=True)
        for s, i in zip(states, adapter.layer_ids):
            k, v = kvs[i]
            last, _ = adapter.mappers[str(i)].summarize(k[:, :, 4:], v[:, :, 4:])
            torch.testing.assert_close(s, last, atol=1e-5, rtol=0)
        _, kvs = adapter.base(tokens, values=values, return_kv=True)  # one long sequence differs
        k, v = kvs[0]
        wrong, _ = adapter.mappers["0"].summarize(k[:, :, 12:], v[:, :, 12:])
        assert (wrong - states[0]).abs().max() > 1e-4


def test_read_state_is_normalised_and_zero_when_empty() -> None:
    s = torch.randn(2, 2, 3, 8) * 10
    h = read_state(s, torch.tensor([0, 2]))
    assert h.shape == (2, 6, 8)
    assert torch.count_nonzero(h[0]) == 0
    torch.testing.assert_close(h[1].pow(2).mean(-1), torch.ones(6), atol=1e-4, rtol=0)


# 8. errors and configuration -----------------------------------------------------------------


def test_readable_errors() -> None:
    with pytest.raises(ValueError, match="divide block_size"):
        AdaptedGPT(make_base(), chunk_size=3, block_size=8)
    with pytest.raises(ValueError, match="exceeds the base's n_positions"):
        AdaptedGPT(make_base(), chunk_size=4, block_size=32)
    with pytest.raises(ValueError, match="targets: unknown 'gate_proj'"):
        AdaptedGPT(make_base(), chunk_size=4, block_size=8, targets=["v", "gate_proj"])
    with pytest.raises(ValueError, match="layers"):
        AdaptedGPT(make_base(), chunk_size=4, block_size=8, layers=5)
    adapter = make_adapter()
    adapter.reset_state(batch=2)
    adapter.absorb(*context(2, 5))
    with pytest.raises(ValueError, match="batch 1"):
        adapter.commit()
    with pytest.raises(ValueError, match="reset_state"):
        adapter.absorb(*context(3, 5))


def test_last_n_layers_and_target_groups() -> None:
    adapter = make_adapter(layers=1, targets="out")
    assert adapter.layer_ids == (1,) and set(adapter.mappers) == {"1"}
    assert set(adapter.absorptions) == {"1_o", "1_fc2"}
    assert adapter.absorptions["1_o"].linear is adapter.base.blocks[1].proj
