"""A run that crashes mid-stream and resumes from its last checkpoint writes the same
metrics.json as a run never interrupted (in-process crash; the SIGKILL variant is in
test_resume_kill.py)."""

from __future__ import annotations

import json
import os

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from adaptlab.data import StreamDataModule
from adaptlab.evaluation import StreamEvaluator
from adaptlab.strategies import Finetune, Replay
from adaptlab.streams import split
from tests.helpers import Crash

STREAM = {"max_samples_per_segment": 100, "test_samples_per_segment": 30, "repeats": 2}


def run(cls, log_dir, crash_at=None, ckpt_path=None, version=0):
    st = split(**STREAM)
    learner = cls(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=10, seed=1,
                  momentum=0.9)
    ckpt = ModelCheckpoint(dirpath=os.path.join(log_dir, "ckpt"), every_n_train_steps=7,
                           save_last=True, save_top_k=-1)
    callbacks = [StreamEvaluator(print_table=False, figures=False), ckpt]
    if crash_at:
        callbacks.append(Crash(crash_at))
    trainer = pl.Trainer(
        max_epochs=1, callbacks=callbacks, enable_progress_bar=False, num_sanity_val_steps=0,
        enable_model_summary=False,
        logger=TensorBoardLogger(log_dir, name="run", version=version, default_hp_metric=False),
    )
    trainer.fit(learner, datamodule=StreamDataModule(st, batches_per_step=3),
                ckpt_path=ckpt_path)
    return json.load(open(os.path.join(trainer.log_dir, "metrics.json")))


@pytest.mark.parametrize("cls", [Finetune, Replay])
def test_crash_and_resume_gives_identical_metrics(tmp_path, cls):
    whole = run(cls, str(tmp_path / "whole"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cls, str(tmp_path / "cut"), crash_at=45)  # mid-segment, between checkpoints
    partial = json.load(open(tmp_path / "cut" / "run" / "version_0" / "metrics.json"))
    assert partial["status"] == "failed"
    last = str(tmp_path / "cut" / "ckpt" / "last.ckpt")
    resumed = run(cls, str(tmp_path / "cut"), ckpt_path=last)
    assert resumed["status"] == "completed"
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed == whole


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    first = run(Replay, str(tmp_path / "a"))
    second = run(Replay, str(tmp_path / "b"))
    assert first == second
    assert first["status"] == "completed"
