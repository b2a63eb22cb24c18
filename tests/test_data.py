"""StreamDataModule: ordered chunks, no per-sample work, task-free isolation, resume state."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from adaptlab.data import StreamDataModule, chunk_plan
from adaptlab.strategies import Finetune, Joint
from adaptlab.streams import split
from tests.helpers import fit, learner_kwargs

SMALL = {"max_samples_per_segment": 80, "test_samples_per_segment": 30}


def test_chunk_plan_never_crosses_eval_positions():
    evals = (25, 60, 97)
    starts, ends = chunk_plan(97, evals, 10)
    assert starts[0] == 0 and ends[-1] == 97
    assert all(b - a <= 10 for a, b in zip(starts, ends))
    assert all(s == e for s, e in zip(starts[1:], ends[:-1]))
    for e in evals:
        assert not any(a < e < b for a, b in zip(starts, ends))
    assert chunk_plan(97, evals, 10, start=60)[0][0] == 60


def test_loader_slices_chunks_without_per_sample_calls():
    st = split(batch_size=10, **SMALL)
    dm = StreamDataModule(st, batches_per_step=4)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert dm._loader_dataset.calls == len(batches)  # one __getitem__ per chunk, none per sample
    assert all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches)
    assert torch.equal(torch.cat([b[0] for b in batches]), st.x)
    assert torch.equal(torch.cat([b[1] for b in batches]), st.y)
    assert max(len(b[1]) for b in batches) == 40


class RecordingFinetune(Finetune):
    """Asserts the task-free contract on every call."""

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, (tuple, list)) and len(batch) == 2
        assert all(torch.is_tensor(t) for t in batch)
        return super().training_step(batch, batch_idx)

    def observe(self, x, y):
        assert x.shape[0] == y.shape[0] <= self.batch_size
        return super().observe(x, y)


def test_relabelled_segments_leave_the_learner_bit_identical(tmp_path):
    st = split(batch_size=10, **SMALL)
    g = torch.Generator().manual_seed(0)
    relabelled = dataclasses.replace(
        st, segment_ids=torch.randint(0, 5, st.segment_ids.shape, generator=g)
    )
    states, evs = [], []
    for i, stream in enumerate([st, relabelled]):
        learner = RecordingFinetune(**learner_kwargs(stream, seed=0))
        evs.append(fit(learner, StreamDataModule(stream, batches_per_step=3), tmp_path / str(i)))
        states.append(learner.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # the evaluator's numbers do depend on the segment ids
    on0 = json.load(open(os.path.join(evs[0].trainer_log_dir, "metrics.json")))["per_segment"]
    on1 = json.load(open(os.path.join(evs[1].trainer_log_dir, "metrics.json")))["per_segment"]
    assert [v["acc_online"] for v in on0.values()] != [v["acc_online"] for v in on1.values()]


def test_batches_per_step_does_not_change_the_result(tmp_path):
    st = split(batch_size=10, **SMALL)
    params = []
    for k in (1, 7):
        learner = Finetune(**learner_kwargs(st, seed=0))
        fit(learner, StreamDataModule(st, batches_per_step=k), tmp_path / str(k))
        params.append(torch.cat([p.detach().flatten() for p in learner.parameters()]))
        assert learner.observe_steps == len(st) // 10
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_joint_gets_an_iid_presentation(tmp_path):
    st = split(batch_size=10, **SMALL)
    dm = StreamDataModule(st)
    ev = fit(Joint(**learner_kwargs(st)), dm, tmp_path)
    assert dm.stream.eval_positions == (len(st),)
    assert not torch.equal(dm.stream.segment_ids, st.segment_ids)
    assert sorted(dm.stream.y.tolist()) == sorted(st.y.tolist())
    assert len(ev.rows) == 1


def test_state_dict_resumes_position_and_rejects_other_streams():
    st = split(**SMALL)
    dm = StreamDataModule(st, batches_per_step=4)
    dm.samples_consumed = 120
    state = dm.state_dict()
    dm2 = StreamDataModule(split(**SMALL), batches_per_step=4)
    dm2.load_state_dict(state)
    assert dm2.samples_consumed == 120
    loader = dm2.train_dataloader()
    chunks = [x for x, _ in loader]
    assert sum(len(x) for x in chunks) == len(st) - 120
    assert torch.equal(chunks[0], st.x[120:160])
    assert len(loader) == len(st) // 40  # Lightning sees the whole epoch's length
    other_bps = StreamDataModule(split(**SMALL), batches_per_step=7)
    other_bps.load_state_dict(state)
    with pytest.raises(ValueError, match="chunk boundary"):
        other_bps.train_dataloader()
    other = StreamDataModule(split(seed=5, **SMALL))
    with pytest.raises(ValueError, match="another stream"):
        other.load_state_dict(state)


def test_bad_datamodule_arguments():
    st = split(**SMALL)
    with pytest.raises(ValueError, match="batches_per_step"):
        StreamDataModule(st, batches_per_step=0)
    with pytest.raises(ValueError, match="presentation"):
        StreamDataModule(st, presentation="random")


def test_anytime_points_do_not_depend_on_batches_per_step(tmp_path):
    from adaptlab.evaluation import StreamEvaluator

    st = split(batch_size=10, **SMALL)
    curves = []
    for k in (1, 7):
        ev = StreamEvaluator(anytime_every=55, print_table=False, figures=False)
        fit(Finetune(**learner_kwargs(st, seed=0)), StreamDataModule(st, batches_per_step=k),
            tmp_path / str(k), evaluator=ev)
        curves.append(ev.anytime)
    assert [p for p, _ in curves[0]] == [p for p, _ in curves[1]]
    assert [p for p, _ in curves[0]][:3] == [60, 110, 170]  # 55, 110, 165 rounded to batches
    first = curves[0][0][1]  # at 60 only segment 0 has been seen: the rest are not pooled
    assert first[0] == first[0] and all(a != a for a in first[1:])  # NaN != NaN
