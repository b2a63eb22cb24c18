"""Speed work (issue 19) that must not change results: the bottom-k buffer's host-side
decisions against the tensor algorithm they replaced, the detector's Python counters through
a checkpoint, TAME's chunk-batched memory offers against per-batch offers, and Replay's
preallocated replay batch against the plain draw; the direct gradient reset and the graph
modes of TAME's helpers."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptlab.buffers import BottomKBuffer
from adaptlab.detect import ShiftDetector


class ReferenceBottomK(BottomKBuffer):
    """The tensor-only `add` / `set_groups` that `BottomKBuffer` had before its decisions
    moved to the host (commit 10398ad), kept verbatim as the reference."""

    _bar: float | None = None

    def __len__(self) -> int:
        return int(torch.isfinite(self.key).sum())

    def set_groups(self, n_groups: int) -> None:
        self.n_groups = max(self.n_groups, int(n_groups))
        self._bar = None
        if self.balance != "group":
            return
        q = self.quota()
        for g in torch.unique(self.group[torch.isfinite(self.key)]).tolist():
            slots = torch.nonzero((self.group == g) & torch.isfinite(self.key)).flatten()
            if len(slots) > q:
                order = torch.argsort(self.key[slots], stable=True)
                self.key[slots[order[q:]]] = float("inf")

    def add(
        self, x: torch.Tensor, y: torch.Tensor, label: int | torch.Tensor = 0,
        group: int | torch.Tensor | None = None, keys: torch.Tensor | None = None,
    ) -> None:
        keys = self.item_keys(x) if keys is None else keys
        if self._bar is not None and float(keys.min()) >= self._bar:
            return  # the common case once full: one host sync, nothing to store
        labels = torch.as_tensor(label, dtype=torch.int64).expand(len(x)).cpu()
        groups = labels if group is None else (
            torch.as_tensor(group, dtype=torch.int64).expand(len(x)).cpu())
        if self.balance == "group":
            new = int(groups.max()) + 1
            if new > self.n_groups:
                self.set_groups(new)
        # Repeats (within the batch, or of a stored item) are stored once: first label kept.
        uniq, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full_like(uniq, len(keys), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(keys), device=keys.device), "amin")
        first = first[~torch.isin(uniq, self.key)].cpu()
        groups = groups[first] if self.balance == "group" else torch.zeros_like(first)
        q = self.quota()
        for g in torch.unique(groups).tolist():
            new = first[groups == g].to(keys.device)  # batch rows, in key order
            held = torch.nonzero(torch.isfinite(self.key) & (
                (self.group == g) if self.balance == "group" else True)).flatten()
            merged = torch.cat([self.key[held], keys[new]])
            if len(held) == q and keys[new].min() >= merged[
                    : len(held)].max():
                continue  # nothing beats the group's current k-th key
            keep = torch.sort(merged, stable=True).indices[:q]
            evict = torch.ones(len(held), dtype=torch.bool, device=keys.device)
            evict[keep[keep < len(held)]] = False
            self.key[held[evict]] = float("inf")
            rows = new[keep[keep >= len(held)] - len(held)]
            if not len(rows):
                continue
            slots = torch.nonzero(~torch.isfinite(self.key)).flatten()[: len(rows)]
            dev = self.x.device
            self.key[slots] = keys[rows]
            self.x[slots.to(dev)] = x[rows.to(x.device)].to(dev, self.x.dtype)
            self.y[slots.to(self.y.device)] = y[rows.to(y.device)].to(self.y.device)
            self.label[slots] = labels[rows.cpu()].to(self.label.device)
            self.group[slots] = g
        # Full means every group is at its quota, so nothing at or above the max key enters.
        full = bool(torch.isfinite(self.key).all())
        self._bar = float(self.key.max()) if full else None


def _state(buf: BottomKBuffer) -> list[torch.Tensor]:
    return [buf.key, buf.x, buf.y, buf.label, buf.group]


@pytest.mark.parametrize("balance", ["group", "none"])
@pytest.mark.parametrize("grid", [None, 64])  # 64: coarse keys, so ties and repeats abound
def test_bottom_k_host_decisions_match_the_tensor_algorithm(balance: str, grid) -> None:
    g = torch.Generator().manual_seed(3)
    new, ref = (cls(40, (3,), balance=balance, seed=1) for cls in (BottomKBuffer,
                                                                     ReferenceBottomK))
    pool = torch.rand(300, 3, generator=g)
    verdicts = []
    for step in range(400):
        idx = torch.randint(0, 300, (int(torch.randint(1, 12, (1,), generator=g)),),
                            generator=g)
        x, y = pool[idx], idx % 7
        keys = new.item_keys(x) if grid is None else (idx % grid).double() / grid
        label = int(step // 60)  # a new group every 60 offers: quotas shrink
        group = y if step % 3 == 0 else None
        admits = new.admits(keys.tolist(), (y if group is not None else
                                            torch.full_like(y, label)).tolist())
        verdicts.append(admits)
        before = _state(new)
        for buf in (new, ref):
            buf.add(x, y, label=label, group=group, keys=keys)
        for a, b in zip(_state(new), _state(ref), strict=True):
            assert torch.equal(a, b), step
        assert len(new) == len(ref)
        if not admits:  # what `admits` refuses, an offer leaves unchanged
            assert all(torch.equal(a, b) for a, b in zip(before, _state(new), strict=True))
    assert any(verdicts) and not all(verdicts)
    for a, b in zip(new.items(), ref.items(), strict=True):
        assert torch.equal(a, b)
    assert len(new) == (new.quota() * new.n_groups if balance == "group" else new.capacity)


def test_bottom_k_host_copy_is_rebuilt_after_a_load() -> None:
    a = BottomKBuffer(20, (3,), balance="group")
    x = torch.rand(50, 3)
    a.add(x[:30], torch.zeros(30, dtype=torch.long), label=0)
    b = BottomKBuffer(20, (3,), balance="group")
    assert len(b) == 0  # builds b's (empty) host copy
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert len(b) == len(a) == 20
    for buf in (a, b):
        buf.add(x[30:], torch.ones(20, dtype=torch.long), label=1)
    for s, t in zip(_state(a), _state(b), strict=True):
        assert torch.equal(s, t)


def test_detector_counters_survive_a_checkpoint_and_old_checkpoints_load() -> None:
    det = ShiftDetector(window=5, grace=2)
    det.add_channel(0.7)
    det.add_channel(0.5)
    for v in (0.4, 0.3, 0.35, 0.2, 0.25, 0.3, 0.31):
        det.refresh_threshold(1)
        det.commit(1, v)
    sd = det.state_dict()
    assert sd["steps"].tolist() == [0, 7] and sd["count"].tolist() == [1, 5]
    assert sd["head"].tolist() == [1, (1 + 7) % 5]
    fresh = ShiftDetector(window=5, grace=2)
    fresh.load_state_dict(copy.deepcopy(sd))
    assert (fresh.steps, fresh.count, fresh.head) == (det.steps, det.count, det.head)
    for d in (det, fresh):
        d.refresh_threshold(1)
    assert torch.equal(fresh.tau, det.tau) and fresh._entries(1) == det._entries(1)
    with pytest.raises(RuntimeError, match="Missing key"):
        ShiftDetector(window=5).load_state_dict({k: v for k, v in sd.items() if k != "steps"})


# --------------------------------------------------------------------------- TAME


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, as the configs run: bit-equality is asked of one thread's arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tame_run(tmp_path, batches_per_step: int, batched_forward: str = "auto"):
    """TAME on a short Split-Digits stream (5 segments, shifts found) through Lightning,
    without evaluation work."""
    import pytorch_lightning as pl

    from adaptlab.data import StreamDataModule
    from adaptlab.strategies import TAME
    from adaptlab.streams import split
    from tests.helpers import learner_kwargs

    st = split(source="digits", labels="local", batch_size=10, repeats=4,
               max_samples_per_segment=200, seed=0)
    learner = TAME(**learner_kwargs(
        st, backbone="mlp", backbone_args={"hidden": [32]},
        experts={"lr": 0.1, "output": "sigmoid", "batched_forward": batched_forward},
        detector={"test": "threshold", "window": 30, "grace_steps": 10},
        memory={"selector_capacity": 120, "retrain_capacity": 10}, pruning={"when": "off"},
        selector={"schedule": "end"}, seed=0))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(learner, datamodule=StreamDataModule(st, batches_per_step=batches_per_step))
    return learner


def _same_state(a, b, moments_exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if name.startswith("moments.") and not moments_exact:
            assert torch.allclose(sa[name], sb[name], rtol=1e-12, atol=1e-9), name
        else:  # bit-equal (NaN where NaN)
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, equal_nan=True,
                                       msg=name)
    assert a.events == b.events and a.active_history == b.active_history
    assert a.history == b.history


def test_tame_chunked_offers_and_reused_forward_change_nothing(tmp_path, monkeypatch) -> None:
    """Offers batched over 25-batch chunks == offered batch by batch (chunks of 1); the
    active expert's evaluation forward reused for training == a second forward."""
    from adaptlab.strategies.tame import ExpertPool

    chunked = _tame_run(tmp_path / "a", 25)
    assert chunked.n_experts >= 3 and len(chunked.selector_buffer) > 0
    single = _tame_run(tmp_path / "b", 1)
    _same_state(chunked, single, moments_exact=False)  # moments: merged per chunk
    looped = _tame_run(tmp_path / "c", 25, batched_forward="loop")
    monkeypatch.setattr(ExpertPool, "mode_sensitive", lambda self: True)  # no reuse
    twice = _tame_run(tmp_path / "d", 25, batched_forward="loop")
    _same_state(looped, twice)
    # the stacked forward serves the other experts; the active expert's loss and every
    # update come from its own forward, so the runs take the same decisions
    assert looped.events == chunked.events


@pytest.mark.parametrize("backbone", ["mlp", "lenet"])
def test_stacked_forward_agrees_with_the_loop_and_follows_training(backbone) -> None:
    """MLP and conv experts: the stacked forward (concatenated / grouped convolutions,
    batched matmuls) gives the loop's logits on random weights, and follows training and
    pruning of one expert."""
    from adaptlab.models import build_model
    from adaptlab.strategies.tame import ExpertPool

    args = {"hidden": [32, 16]} if backbone == "mlp" else {"channels": [4, 6]}
    pools = [ExpertPool(stack=True), ExpertPool()]
    for seed in range(4):
        torch.manual_seed(seed)
        e = build_model(backbone, (1, 8, 8), 10, **args)
        with torch.no_grad():  # random weights and biases, larger than the default init
            for p in e.parameters():
                p.normal_(0, 0.5)
        for pool in pools:
            pool.add(copy.deepcopy(e))
    assert pools[0].stackable()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    first = [pool.logits_all(x) for pool in pools]
    assert first[0].shape == (4, 10, 10)
    torch.testing.assert_close(first[0], first[1], rtol=1e-5, atol=1e-4)
    for pool in pools:  # train expert 2, prune it gradually: the stacked slice follows
        e = pool.experts[2]
        opt = torch.optim.SGD(e.parameters(), lr=0.5)
        torch.nn.functional.cross_entropy(e(x), y).backward()
        opt.step()
        pool.sync_cache(2)
        pool.set_sparsity(2, 0.5, opt)
    after = [pool.logits_all(x) for pool in pools]
    torch.testing.assert_close(after[0], after[1], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(after[0][2], first[0][2])
    assert torch.equal(after[0][0], first[0][0])


def test_stackable_refuses_what_the_stacked_forward_cannot_compute() -> None:
    from torch import nn

    from adaptlab.models import build_model
    from adaptlab.strategies.tame import ExpertPool

    def pool_of(e: nn.Module) -> ExpertPool:
        pool = ExpertPool(stack=True)
        pool.add(e)
        return pool

    assert pool_of(build_model("lenet", (1, 8, 8), 10)).stackable()
    assert not pool_of(build_model("lenet_bn", (1, 8, 8), 10)).stackable()  # BatchNorm
    assert not pool_of(nn.Sequential(nn.Conv2d(1, 4, 3, groups=1), nn.Linear(6, 2))).stackable()
    assert not pool_of(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                                     nn.Linear(16, 2))).stackable()
    assert not pool_of(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(),
                                     nn.Linear(8, 2))).stackable()


@pytest.mark.parametrize("patience", [None, 3])
def test_fit_patience_bounds_the_epochs(patience) -> None:
    """Evaluation-time training: a converged loss takes the next LR milestone at once and
    stops after the last; without patience every epoch of the schedule runs."""
    from adaptlab.models import build_model
    from adaptlab.strategies.tame import _fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :5].sum(1) > 0).long()
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 2, hidden=[16])
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    acc = _fit(model, x, y, epochs=200, lr=0.1, momentum=0.9, weight_decay=0.01, batch_size=32,
               output="logits", gen=torch.Generator().manual_seed(1), milestones=(100, 150),
               patience=patience, tol=0.01)
    epochs = (len(calls) - 1) // 2  # two batches per epoch, one final evaluation forward
    assert acc == 1.0
    if patience is None:
        assert epochs == 200
    else:
        assert 3 * patience <= epochs < 100  # three plateaus: two milestones, then the stop


def test_grads_to_none_clears_grads_and_keeps_an_overridden_zero_grad() -> None:
    """The direct gradient reset of `StreamLearner.update` leaves what `zero_grad` leaves,
    and an optimizer with its own `zero_grad` still gets it called."""
    from adaptlab.learner import _grads_to_none

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _grads_to_none(opt)
    assert all(p.grad is None for p in model.parameters())

    class Custom(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            Custom.calls += 1
            super().zero_grad(set_to_none)

    model(torch.ones(1, 3)).sum().backward()
    _grads_to_none(Custom(model.parameters(), lr=0.1))
    assert Custom.calls == 1 and all(p.grad is None for p in model.parameters())


def test_with_grad_builds_a_graph_under_no_grad_and_accuracy_builds_none() -> None:
    """`_with_grad` keeps a graph whatever the caller's mode; `_accuracy` runs without one."""
    from adaptlab.strategies.tame import _accuracy, _with_grad

    model = torch.nn.Linear(3, 2)
    x = torch.ones(4, 3)
    with torch.no_grad():
        assert _with_grad(model, x).requires_grad
    assert _with_grad(model, x).requires_grad
    outs = []
    model.register_forward_hook(lambda _m, _i, out: outs.append(out))
    _accuracy(model, x, torch.zeros(4, dtype=torch.long))
    assert not outs[0].requires_grad
