"""Small shared helpers for tests that run a real Lightning Trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from adaptlab.data import StreamDataModule
from adaptlab.evaluation import StreamEvaluator
from adaptlab.streams import Stream


def learner_kwargs(stream: Stream, **extra) -> dict:
    return {"input_shape": stream.input_shape, "n_classes": stream.n_classes,
            "batch_size": stream.batch_size, **extra}


def fit(learner: pl.LightningModule, dm: StreamDataModule, log_dir: Path,
        evaluator: StreamEvaluator | None = None, callbacks_extra: list | None = None,
        **trainer_kwargs) -> StreamEvaluator:
    """One pass over the stream with the evaluator; returns the evaluator."""
    ev = evaluator or StreamEvaluator(print_table=False, figures=False)
    trainer = pl.Trainer(
        max_epochs=1, logger=TensorBoardLogger(str(log_dir), name="t", default_hp_metric=False),
        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_model_summary=False, callbacks=[ev, *(callbacks_extra or [])], **trainer_kwargs,
    )
    trainer.fit(learner, datamodule=dm)
    ev.trainer_log_dir = trainer.log_dir
    return ev


class Crash(pl.Callback):
    """Test aid: raise once the run has made `at_step` optimizer steps (a crash mid-stream)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


class SlowAfter(pl.Callback):
    """Test aid: sleep after each Lightning step past `step`, so a test can kill the run
    at a known stage (after a mid-stream checkpoint, before the end)."""

    def __init__(self, step: int = 10, seconds: float = 0.2) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import time

            time.sleep(self.seconds)


class DumpDecisions(pl.Callback):
    """Test aid: each process writes its learner's detector firings and active expert per
    batch to `<folder>/decisions_rank<r>.json` at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        import os

        ids = pl_module.expert_ids()
        doc = {"shift_events": [int(p) for p in pl_module.shift_events()],
               "active": [] if ids is None else [int(i) for i in ids],
               "observe_steps": pl_module.observe_steps}
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"decisions_rank{trainer.global_rank}.json")
        with open(path, "w") as fh:
            json.dump(doc, fh)


def fit_resumable(learner: pl.LightningModule, stream: Stream, log_dir: str,
                  crash_at: int | None = None, ckpt_path: str | None = None,
                  callbacks_extra: list | None = None) -> dict:
    """One pass with a checkpoint every 5 steps (in `log_dir/ckpt`), optionally crashing at
    `crash_at` or resuming from `ckpt_path`; returns the run's metrics.json."""
    ckpt = ModelCheckpoint(dirpath=os.path.join(log_dir, "ckpt"), every_n_train_steps=5,
                           save_last=True, save_top_k=-1)
    callbacks = [StreamEvaluator(print_table=False, figures=False), ckpt,
                 *(callbacks_extra or [])]
    if crash_at:
        callbacks.append(Crash(crash_at))
    tr = pl.Trainer(max_epochs=1, callbacks=callbacks, enable_progress_bar=False,
                    num_sanity_val_steps=0, enable_model_summary=False,
                    logger=TensorBoardLogger(log_dir, name="run", version=0))
    tr.fit(learner, datamodule=StreamDataModule(stream, batches_per_step=1), ckpt_path=ckpt_path)
    with open(os.path.join(tr.log_dir, "metrics.json")) as f:
        return json.load(f)
