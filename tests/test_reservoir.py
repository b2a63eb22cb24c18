"""The reservoir memory: uniform over the stream at every length whatever the batching, and
`replay_batch` (Replay's step) exactly `sample_into` then `add`, through a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from adaptlab.buffers import ReservoirBuffer
from adaptlab.strategies import Replay
from adaptlab.streams import split


class HalfSlots(ReservoirBuffer):
    """A plausible bug: entries go to a uniform slot of the first half only."""

    def _entries(self, b: int) -> dict[int, int]:
        return {slot // 2: row for slot, row in super()._entries(b).items()}


def _batches(rng: np.random.Generator, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 18)))
    sizes[-1] -= sum(sizes) - n
    return sizes


def _inclusion(cls: type[ReservoirBuffer], seeds: int, cap: int = 20, n: int = 200,
               check_at: int = 60) -> tuple[np.ndarray, np.ndarray, int]:
    """Times each item is held at the end (and at `check_at` items) over many seeds with
    irregular batch sizes, and the count of consecutive items held together."""
    rng = np.random.default_rng(0)
    held, early, pairs = np.zeros(n), np.zeros(check_at), 0
    for seed in range(seeds):
        buf = cls(cap, (1,), seed=seed)
        t = 0
        for b in _batches(rng, n):
            if t < check_at <= t + b:  # split the batch at check_at to look inside
                first = check_at - t
                buf.add(torch.arange(t, check_at).float().view(-1, 1), torch.arange(t, check_at))
                early[buf.y[: len(buf)].numpy()] += 1
                t, b = check_at, b - first
                if not b:
                    continue
            buf.add(torch.arange(t, t + b).float().view(-1, 1), torch.arange(t, t + b))
            t += b
        kept = buf.y[: len(buf)].numpy()
        assert len(np.unique(kept)) == len(kept) == cap  # a sample without repeats
        held[kept] += 1
        mask = np.zeros(n, bool)
        mask[kept] = True
        pairs += int((mask[1:] & mask[:-1]).sum())
    return held, early, pairs


@pytest.mark.parametrize("cls,uniform", [(ReservoirBuffer, True), (HalfSlots, False)])
def test_every_item_is_held_with_probability_m_over_n(cls, uniform):
    seeds, cap, n, at = 2000 if uniform else 300, 20, 200, 60
    held, early, pairs = _inclusion(cls, seeds, cap, n, at)
    p_end, p_early = chisquare(held).pvalue, chisquare(early).pvalue
    # items held together: P(i and i+1 held) = M(M-1) / (n(n-1)) whatever the batching
    expected_pairs = seeds * (n - 1) * cap * (cap - 1) / (n * (n - 1))
    if uniform:
        assert p_end > 1e-3 and p_early > 1e-3
        assert np.isclose(held.mean(), seeds * cap / n) and np.isclose(early.mean(),
                                                                       seeds * cap / at)
        assert abs(pairs - expected_pairs) < 0.06 * expected_pairs
    else:  # the test can fail: slots never replaced keep early items forever
        assert p_end < 1e-6


def _ids(t: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(t, t + b)
    return ids.float().view(-1, 1).repeat(1, 3), ids


@pytest.mark.parametrize("cap,k,sizes", [(50, 10, [10]), (37, 7, [5, 5, 5, 3, 5]),
                                         (20, 30, [4]), (500, 10, [10])])
def test_replay_batch_is_sample_then_add(cap, k, sizes):
    """Every step's draws come from the memory as it was before that step (entries written
    into the block's later draws), and the memory equals one fed by `add` alone."""
    a, b = ReservoirBuffer(cap, (3,), seed=3), ReservoirBuffer(cap, (3,), seed=3)
    t, blocks = 0, 0
    for step in range(400):
        x, y = _ids(t, sizes[step % len(sizes)])
        n, t = len(y), t + len(y)
        if not b.n_seen:
            a.add(x, y)
            b.add(x, y)
            continue
        before = b.y[: len(b)].clone()
        full = b.n_seen >= cap
        inp, tgt = a.replay_batch(x, y, k)
        b.add(x, y)
        assert inp.shape == (n + k, 3) and torch.equal(inp[:n], x) and torch.equal(tgt[:n], y)
        drawn = tgt[n:]
        assert torch.equal(inp[n:, 0].long(), drawn)  # rows and labels travel together
        assert set(drawn.tolist()) <= set(before.tolist())
        if full:  # white-box: the block's draws for this step, read in `before`
            blk, blocks = a._block, blocks + (a._block.s == 1)
            s = blk.s - 1
            assert torch.equal(drawn, before[torch.tensor(blk.draws[s * k : (s + 1) * k])])
        if step % 7 == 0:
            a.flush()
            assert torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    assert blocks >= 10


def test_replay_batch_resumes_mid_block_and_old_states_load():
    a = ReservoirBuffer(30, (3,), seed=5)
    t = 0
    for _ in range(45):  # fills at step 3, blocks of 32 steps: the state is mid-block
        x, y = _ids(t, 10)
        t += 10
        a.replay_batch(x, y, 10) if a.n_seen else a.add(x, y)
    assert 0 < a._block.s < a._block.steps and a._block.pending
    state = a.state_dict()
    assert torch.equal(state["y"], a.y)  # saving flushed the held-back entries
    c = ReservoirBuffer(30, (3,), seed=99)
    c.load_state_dict(state)
    for _ in range(80):
        x, y = _ids(t, 10)
        t += 10
        ia, ta = a.replay_batch(x, y, 10)
        ic, tc = c.replay_batch(x, y, 10)
        assert torch.equal(ia, ic) and torch.equal(ta, tc)
    old = {k: v for k, v in state["_extra_state"].items() if k in ("n_seen", "gen")}
    d = ReservoirBuffer(30, (3,), seed=5)
    d.load_state_dict({**state, "_extra_state": old})  # written before the skip-ahead
    assert d.n_seen == a.n_seen - 800 and d.next_entry >= d.n_seen
    d.add(*_ids(t, 10))


def test_replay_trains_on_the_batch_and_as_many_memory_samples():
    """The bench's claim: Replay does one forward over 2B rows per step (B = batch)."""
    st = split(max_samples_per_segment=60, test_samples_per_segment=10)
    learner = Replay(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=10,
                     memory_size=50)
    rows = []
    learner.model.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    for s in range(0, 100, 10):
        logits, loss, n = learner.training_loss(st.x[s : s + 10], st.y[s : s + 10])
        assert logits.shape[0] == 10 and n == rows[-1]
    assert rows == [10] + [20] * 9
