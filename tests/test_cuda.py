"""Checks that need a CUDA device (marker `cuda`; excluded from the default run).
`tools/gpu_check.sh` runs them on a GPU machine; elsewhere they skip."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fit(learner, stream, accelerator, tmp_path, **dm_args):
    import pytorch_lightning as pl

    from adaptlab.data import StreamDataModule
    from adaptlab.evaluation import StreamEvaluator

    ev = StreamEvaluator(print_table=False, figures=False)
    trainer = pl.Trainer(max_epochs=1, accelerator=accelerator, devices=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, callbacks=[ev],
                         default_root_dir=str(tmp_path))
    trainer.fit(learner, datamodule=StreamDataModule(stream, **dm_args))
    return ev


def test_finetune_on_cuda_matches_cpu(tmp_path):
    from adaptlab.strategies import Finetune
    from adaptlab.streams import split

    st = split(max_samples_per_segment=100, test_samples_per_segment=40)
    runs = []
    for acc, cache in (("cpu", False), ("gpu", True)):
        learner = Finetune(input_shape=st.input_shape, n_classes=st.n_classes, seed=0)
        ev = _fit(learner, st, acc, tmp_path / acc, device_cache=cache)
        runs.append((torch.cat([p.detach().cpu().flatten() for p in learner.parameters()]),
                     ev.matrix()))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-4)
    assert abs(runs[0][1] - runs[1][1]).max() <= 1 / 40 + 1e-9  # one test sample at most


def test_tame_batched_vmap_matches_loop_on_cuda():
    from adaptlab.models import build_model
    from adaptlab.strategies.tame import ExpertPool

    pools = [ExpertPool(batched=b).cuda() for b in (False, True)]
    for seed in range(5):
        torch.manual_seed(seed)
        expert = build_model("mlp", (1, 8, 8), 10, hidden=(64,))
        for pool in pools:
            pool.add(copy.deepcopy(expert).cuda())
    x = torch.randn(128, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    loop, vmap = (pool.losses(pool.logits_all(x), y) for pool in pools)
    assert torch.allclose(loop, vmap, atol=1e-5)


def test_tame_runs_on_cuda_with_identical_decisions(tmp_path):
    from adaptlab.strategies import TAME
    from adaptlab.streams import split

    st = split(labels="local", repeats=10, order=[0, 1, 0])
    decisions = []
    for acc in ("cpu", "gpu"):
        learner = TAME(input_shape=st.input_shape, n_classes=st.n_classes, seed=0,
                       backbone_args={"hidden": [64]}, pruning={"when": "off"},
                       selector={"epochs": 5})
        _fit(learner, st, acc, tmp_path / acc)
        decisions.append((learner.shift_events(), learner.expert_ids().tolist()))
    assert decisions[0] == decisions[1]
