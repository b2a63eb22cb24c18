"""StreamLearner contract, Finetune/Replay/Joint, the reservoir memory, models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy.stats import chisquare

from adaptlab.buffers import ReservoirBuffer
from adaptlab.data import StreamDataModule
from adaptlab.learner import NonFiniteLossError
from adaptlab.models import build_model
from adaptlab.strategies import Finetune, Replay
from adaptlab.streams import split
from tests.helpers import fit, learner_kwargs

SMALL = {"max_samples_per_segment": 80, "test_samples_per_segment": 30}


class _Host(pl.LightningModule):
    """Lets `observe` run outside a Trainer (manual_backward needs one)."""


def _attached(learner):
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    learner.trainer = trainer
    trainer.strategy.connect(learner)
    trainer.strategy._lightning_optimizers = []
    opt = learner.configure_optimizers()
    trainer.strategy.optimizers = [opt]
    return learner


def test_observe_returns_detached_pre_update_logits():
    st = split(**SMALL)
    learner = _attached(Finetune(**learner_kwargs(st)))
    x, y = st.x[:10], st.y[:10]
    before = learner(x).detach()
    logits, loss = learner.observe(x, y)
    assert not logits.requires_grad and not loss.requires_grad
    assert torch.allclose(logits, before)
    assert not torch.allclose(learner(x), before)  # and the weights did change
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(before, y))


def test_update_hooks_run_before_every_update():
    st = split(**SMALL)
    learner = _attached(Replay(**learner_kwargs(st)))
    seen = []
    learner.add_update_hook(seen.append)
    for i in range(3):
        learner.observe(st.x[i * 10:(i + 1) * 10], st.y[i * 10:(i + 1) * 10])
    assert seen == [0, 1, 2]


def test_seeded_initialisation_is_reproducible_and_isolated():
    st = split(**SMALL)
    torch.manual_seed(123)
    a = Finetune(**learner_kwargs(st, seed=4))
    global_after = torch.rand(1)
    b = Finetune(**learner_kwargs(st, seed=4))
    c = Finetune(**learner_kwargs(st, seed=5))
    torch.manual_seed(123)
    Finetune(**learner_kwargs(st, seed=4))
    assert torch.equal(torch.rand(1), global_after)  # building never touched the global RNG
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_reservoir_is_uniform_over_the_stream():
    # 2000 items, capacity 200, many seeds: kept items spread evenly over arrival bins.
    bins = np.zeros(10)
    for seed in range(150):
        buf = ReservoirBuffer(200, (1,), seed=seed)
        for s in range(0, 2000, 10):
            idx = torch.arange(s, s + 10)
            buf.add(idx.float().view(-1, 1), idx)
        kept = buf.y[: len(buf)].numpy()
        assert len(np.unique(kept)) == 200  # no duplicates
        bins += np.bincount(kept // 200, minlength=10)
    assert chisquare(bins).pvalue > 0.01
    fifo = np.zeros(10)
    fifo[-1] = bins.sum()  # a FIFO keeps only the last bin: the test must reject it
    assert chisquare(fifo).pvalue < 1e-6


def test_reservoir_state_round_trips():
    buf = ReservoirBuffer(20, (2,), seed=1)
    for s in range(0, 100, 10):
        buf.add(torch.randn(10, 2), torch.arange(s, s + 10))
    clone = ReservoirBuffer(20, (2,), seed=99)
    clone.load_state_dict(buf.state_dict())
    assert clone.n_seen == 100 and torch.equal(clone.y, buf.y)
    assert torch.equal(clone.sample(5)[1], buf.sample(5)[1])  # same generator state


def test_forgetting_and_its_cure_on_the_same_stream(tmp_path):
    st = split(repeats=2)
    accs = {}
    for name, cls, extra in [("finetune", Finetune, {}), ("replay", Replay, {"memory_size": 200})]:
        learner = cls(**learner_kwargs(st, lr=0.05, **extra))
        ev = fit(learner, StreamDataModule(st, batches_per_step=10), tmp_path / name)
        doc = json.load(open(os.path.join(ev.trainer_log_dir, "metrics.json")))
        assert doc["status"] == "completed"
        assert len(doc["accuracy_matrix"]["rows"]) == 5
        accs[name] = doc["final"]["acc_final"]
        # Finetune is near-perfect on the segment it just learnt.
        assert doc["accuracy_matrix"]["rows"][-1]["acc"][-1] > 0.9
    assert accs["finetune"] < 0.35
    assert accs["replay"] > accs["finetune"] + 0.3


def test_nan_loss_stops_with_a_clear_error_and_marks_the_run_failed(tmp_path):
    import dataclasses

    st = split(**SMALL)
    x = st.x.clone()
    x[50:60] = float("nan")
    bad = dataclasses.replace(st, x=x)
    learner = Finetune(**learner_kwargs(bad))
    with pytest.raises(NonFiniteLossError, match="NaN|nan"):
        fit(learner, StreamDataModule(bad), tmp_path)
    docs = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs
            if f == "metrics.json"]
    assert json.load(open(docs[0]))["status"] == "failed"


@pytest.mark.parametrize(("name", "shape"), [
    ("mlp", (1, 8, 8)), ("lenet", (1, 8, 8)), ("lenet", (1, 28, 28)), ("lenet", (3, 32, 32)),
    ("resnet18", (3, 32, 32)), ("resnet18", (1, 8, 8)),
])
def test_backbones_fit_their_inputs(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown 'vgg'"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="too small for lenet"):
        build_model("lenet", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model("mlp", (1, 8, 8), 1)


@pytest.mark.parametrize("cls", [Finetune, Replay])
def test_fast_update_matches_lightnings_own_path(tmp_path, cls):
    """The direct backward/step path computes exactly what manual_backward + step compute."""
    st = split(**SMALL)
    results = []
    for fast in (True, False):
        learner = cls(**learner_kwargs(st, seed=3, momentum=0.9))
        learner.fast_update = fast
        fit(learner, StreamDataModule(st, batches_per_step=4), tmp_path / str(fast))
        assert learner._fast_update is fast
        assert learner.trainer.global_step == learner.update_steps == len(st) // 10
        results.append(torch.cat([p.detach().flatten() for p in learner.parameters()]))
    assert torch.equal(results[0], results[1])


def test_lightning_path_is_kept_when_a_callback_hooks_backward(tmp_path):
    seen = []

    class GradProbe(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append(1)

    st = split(**SMALL)
    learner = Finetune(**learner_kwargs(st))
    fit(learner, StreamDataModule(st), tmp_path, callbacks_extra=[GradProbe()])
    assert not learner._fast_update and len(seen) == learner.update_steps > 0
