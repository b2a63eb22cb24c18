"""Every use of a private Lightning API, in one place, each with why and what public API
was missing. Tested with pytorch-lightning 2.6.x (the range setup.cfg pins); after an
upgrade, `tests/test_lightning_private.py` says at once which of these moved.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.core.optimizer import LightningOptimizer

#: `LightningCLI._parse_ckpt_path`: adaptlab's CLI overrides it to check a checkpoint against
#: the config instead of merging the checkpoint's hyper-parameters into it. Lightning has no
#: public hook between parsing and instantiation for `ckpt_path`.
CLI_CKPT_HOOK = "_parse_ckpt_path"


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """`module._trainer`: the Trainer, or None outside one (in a Fabric, in plain Python).
    The public `module.trainer` raises when detached and returns Fabric's shim inside a
    Fabric, which has no strategy or precision plugin to ask."""
    return module._trainer


def run_early_stopping_check(callback: EarlyStopping, trainer: pl.Trainer) -> None:
    """`EarlyStopping._run_early_stopping_check`: a stream run's validations are its segment
    ends, inside the single training epoch; Lightning checks only at epoch or validation
    end and offers no public way to ask a callback to check now."""
    callback._run_early_stopping_check(trainer)


def optimizer_step_hooks(optimizer: LightningOptimizer) -> tuple[Any, Any]:
    """`LightningOptimizer._on_before_step` / `_on_after_step`: the step bookkeeping (step
    counter, profiler) of `LightningOptimizer.step` without its closure and strategy
    dispatch, which cost more than a tiny online update. No public split exists."""
    return optimizer._on_before_step, optimizer._on_after_step


def count_optimizer_step(trainer: pl.Trainer) -> None:
    """Count an update of an optimizer Lightning does not manage (created at run time)
    toward `trainer.global_step`. `global_step` is read-only and derived from this progress
    tracker of the manual-optimization loop; there is no public increment."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def fabric_optimizers(module: pl.LightningModule) -> list[Any]:
    """`module._fabric_optimizers`: the optimizers a `Fabric.setup` attached to a
    LightningModule (what `module.optimizers()` returns inside a Fabric, wrapped); Fabric
    has no public accessor for them."""
    return list(module._fabric_optimizers)


def sync_module_states(module: torch.nn.Module) -> None:
    """`pytorch_lightning.overrides.distributed._sync_module_states`: broadcast rank 0's
    parameters and buffers, what `DistributedDataParallel` does when it wraps a module.
    adaptlab's DDP strategy does not wrap (experts appear at run time) and Lightning has no
    public function for the broadcast alone."""
    from pytorch_lightning.overrides.distributed import _sync_module_states

    _sync_module_states(module)


def _check() -> None:
    """Fail at import, naming the call, if an upgrade removed one of them."""
    missing = [name for owner, name in [
        (LightningCLI, CLI_CKPT_HOOK), (EarlyStopping, "_run_early_stopping_check"),
    ] if not hasattr(owner, name)]  # `_on_before/after_step` are set per instance
    if missing:
        raise ImportError(f"adaptlab: this pytorch-lightning ({pl.__version__}) lacks "
                          f"{missing}; install the tested range (setup.cfg)")


_check()
