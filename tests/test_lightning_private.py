"""The private Lightning calls adaptlab makes, gathered in `adaptlab._lightning_private`:
after a Lightning upgrade this file says which one moved, before a run fails deep inside."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.core.optimizer import LightningOptimizer

from adaptlab import _lightning_private as private
from adaptlab.cli import AdaptLabCLI
from adaptlab.seeding import seeded


def test_every_private_call_exists_in_the_installed_lightning() -> None:
    from pytorch_lightning.cli import LightningCLI

    assert callable(getattr(LightningCLI, private.CLI_CKPT_HOOK))
    assert callable(EarlyStopping._run_early_stopping_check)
    opt = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    before, after = private.optimizer_step_hooks(opt)
    assert callable(before) and callable(after)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    private.count_optimizer_step(trainer)
    assert progress.total.completed == 1
    import importlib

    overrides = importlib.import_module("pytorch_lightning.overrides.distributed")
    assert callable(overrides._sync_module_states)


def test_the_cli_overrides_lightnings_checkpoint_hook() -> None:
    # Lightning calls the hook by its private name; a rename would silently skip the check
    assert getattr(AdaptLabCLI, private.CLI_CKPT_HOOK) is AdaptLabCLI._check_ckpt_path


def test_attached_trainer_is_none_outside_a_trainer() -> None:
    assert private.attached_trainer(pl.LightningModule()) is None


def test_seeded_draws_depend_on_the_seed_only_and_leave_the_global_state() -> None:
    import random

    import numpy as np

    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    expected_next = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    with seeded(7):
        a = torch.rand(4)
    with seeded(7):
        b = torch.rand(4)
    assert torch.equal(a, b)
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected_next[0]) and after[1:] == expected_next[1:]
