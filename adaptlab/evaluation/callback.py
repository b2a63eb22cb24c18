"""`StreamEvaluator`: the Lightning hooks of an evaluation.

It is the only component that reads the truth about the stream (segment ids, boundaries,
test sets), through `datamodule.batch_meta()` and `datamodule.stream`. It evaluates every
segment's test set at each true boundary and at the end (the accuracy matrix) and records
one test-then-train event per `observe` call into a `Record`; the numbers come from
`document` (shared with the Avalanche bridge), the files from `RunFiles`, the figures from
`tensorboard`. Its own state is checkpointed, so a resumed run writes the same file.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from .._lightning_private import run_early_stopping_check
from ..jsonio import to_jsonable
from ..learner import StreamLearner
from ..streams import Stream
from ..streams.core import require_positive
from . import document
from .files import RunFiles, now
from .record import Record
from .summary import LearnerSummary, summarize
from .table import format_table
from .tensorboard import log_final, run_figures


class StreamEvaluator(pl.Callback):
    """Accuracy matrix, online accuracy, detection and size metrics for one run.

    Args:
        init_eval: evaluate once before training (gives b[j] for forward transfer).
        window: samples in the windowed online accuracy.
        log_every: log online accuracy every this many observed mini-batches (one host
            sync each); independent of how many batches a Lightning step holds.
        anytime_every: also evaluate every this many samples (costly; anytime AUC).
        tolerance: detection tolerance in samples (default 20·B).
        warmup: detections before this position are not false alarms.
        figures: log the accuracy-matrix, online-accuracy (and expert-timeline) figures.
        print_table: print the final metrics to the terminal.
    """

    def __init__(
        self,
        init_eval: bool = True,
        window: int = 500,
        log_every: int = 50,
        anytime_every: int | None = None,
        tolerance: int | None = None,
        warmup: int = 0,
        figures: bool = True,
        print_table: bool = True,
    ) -> None:
        require_positive("evaluator.window", window)
        require_positive("evaluator.anytime_every", anytime_every, allow_none=True)
        self.init_eval = init_eval
        self.window = window
        require_positive("evaluator.log_every", log_every)
        self.log_every = log_every
        self.anytime_every = anytime_every
        self.tolerance = tolerance
        self.warmup = warmup
        self.figures = figures
        self.print_table = print_table
        self._reset()

    def _reset(self) -> None:
        self.record = Record()
        self.started_at: str | None = None
        self._next_anytime: int | None = None
        self._logged_at = -1
        self._files: RunFiles | None = None
        self.done = False
        self.stopped_early = False

    # the record's parts, under the names callers and tests have always used
    @property
    def init(self) -> list[float] | None:
        return self.record.init

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.record.rows

    @property
    def anytime(self) -> list[tuple[int, list[float]]]:
        return self.record.anytime

    @property
    def curve(self) -> list[list[Any]]:
        return self.record.curve

    def matrix(self) -> np.ndarray:
        return self.record.matrix()

    def events(self) -> Any:
        return self.record.events.events()

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _stream(trainer: pl.Trainer) -> Stream:
        return trainer.datamodule.stream

    def log_dir(self, trainer: pl.Trainer) -> str:
        # `trainer.log_dir` is a collective under DDP: read it once on every rank, early.
        if getattr(self, "_log_dir", None) is None:
            self._log_dir = trainer.log_dir or trainer.default_root_dir
        return self._log_dir

    def _evaluate(self, trainer: pl.Trainer, learner: StreamLearner) -> list[float]:
        """Accuracy on every segment's held-out test set; leaves training state untouched."""
        dm, st = trainer.datamodule, self._stream(trainer)
        was = learner.training
        learner.eval()
        accs = []
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for seg in st.segments:
                x, y = dm.test_set(seg.id)
                correct = 0
                for s in range(0, len(y), dm.eval_batch_size):
                    xb = x[s : s + dm.eval_batch_size].to(learner.device, non_blocking=True)
                    yb = y[s : s + dm.eval_batch_size].to(learner.device, non_blocking=True)
                    correct += (learner(xb).argmax(-1) == yb).sum()
                accs.append(float(correct) / len(y))
        learner.train(was)
        return accs

    def _log(self, trainer: pl.Trainer, values: dict[str, float | None], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if not clean:
            return
        # under the logged names, monitorable by EarlyStopping and ModelCheckpoint(monitor=…)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in clean.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(clean, step=step)

    def summary(self, trainer: pl.Trainer, learner: StreamLearner,
                with_metrics: bool = True) -> LearnerSummary:
        st, dm = self._stream(trainer), trainer.datamodule
        return summarize(learner, [s.id for s in st.segments], dm.test_set,
                         self.record.events.events(), with_metrics=with_metrics)

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Chunks end at every anytime evaluation point, so when it happens does not depend on
        # `batches_per_step` (a speed setting).
        if stage == "fit" and self.anytime_every is not None and trainer.datamodule is not None:
            trainer.datamodule.stop_periods.add(self.anytime_every)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, StreamLearner):
            raise ValueError(
                f"model: the StreamEvaluator needs a StreamLearner, got {type(pl_module).__name__}"
            )
        self.started_at = self.started_at or now()
        pl_module.check_labels(self._stream(trainer).task_local_labels())
        self._log_dir = None
        self._files = RunFiles(self.log_dir(trainer))
        if self.anytime_every is not None and self._next_anytime is None:
            self._next_anytime = self.anytime_every
        st = self._stream(trainer)
        ids = st.segment_ids
        self._first_pos = np.array([int(torch.nonzero(ids == s.id)[0]) for s in st.segments])
        fresh = trainer.datamodule.samples_consumed == 0
        if fresh and self.init_eval and self.record.init is None:
            self.record.init = self._evaluate(trainer, pl_module)
            self._log(trainer, {
                f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}": a
                for j, a in enumerate(self.record.init)
            }, step=0)
        self._write(trainer, pl_module, "running")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        dm, st = trainer.datamodule, self._stream(trainer)
        meta = dm.batch_meta()
        start, end = meta["start"], meta["end"]
        preds = outputs["preds"]
        b = pl_module.batch_size
        pos = np.arange(start, end, b, dtype=np.int64)
        n = np.minimum(pos + b, end) - pos
        seg = st.segment_ids[pos].numpy()
        world = trainer.world_size
        if world == 1:
            y = st.y[start:end].to(preds.device, non_blocking=True)
            correct = (preds == y).to(torch.int32)
            if (end - start) % b == 0:
                per_batch = correct.view(-1, b).sum(1)
            else:
                per_batch = torch.stack([c.sum() for c in correct.split(b)])
        else:  # this process scored its share of each batch; the counts are summed
            index = meta["index"]
            correct = (preds == st.y[index].to(preds.device)).to(torch.int64)
            batch_of = torch.as_tensor((index.numpy() - start) // b, device=preds.device)
            per_batch = torch.zeros(len(pos), dtype=torch.int64, device=preds.device)
            per_batch.index_add_(0, batch_of, correct)
            per_batch = trainer.strategy.all_sum(per_batch)
        self.record.events.add(np.column_stack([pos, n, seg]), per_batch)

        step = pl_module.observe_steps
        if step // self.log_every > self._logged_at // self.log_every:
            self._logged_at = step
            self._log_online(trainer, step)
        if self._next_anytime is not None and end >= self._next_anytime:
            pl_module.before_evaluation(False)
            acc = self._evaluate(trainer, pl_module)
            # a_t pools the segments seen so far only (metrics.md §3)
            seen = self._first_pos < end
            self.record.anytime.append(
                (end, [a if ok else float("nan") for a, ok in zip(acc, seen)]))
            while self._next_anytime <= end:
                self._next_anytime += self.anytime_every
        if end in st.eval_positions:
            self._boundary(trainer, pl_module, end)

    def _log_online(self, trainer: pl.Trainer, step: int) -> None:
        if not self.record.events:
            return
        learner = trainer.lightning_module
        count = len(learner.shift_events()) if learner.has_experts else None
        point, values = document.online_scalars(self._stream(trainer), self.record,
                                                self.window, count)
        self.record.curve.append(point)
        self._log(trainer, values, step)

    def _boundary(self, trainer: pl.Trainer, learner: StreamLearner, pos: int) -> None:
        st = self._stream(trainer)
        i = len(self.record.rows)
        final = pos == len(st)
        learner.before_evaluation(final)
        acc = self._evaluate(trainer, learner)
        self.record.rows.append({
            "after_segment": st.row_segments[i], "position": pos,
            "observe_step": learner.observe_steps, "acc": acc,
        })
        step = learner.observe_steps
        values = document.boundary_scalars(st, self.record, i)
        self._log(trainer, values, step)
        # the names `adaptlab validate` logs, so a monitor works the same in fit and validate
        trainer.callback_metrics.update(
            {f"val/acc_exp{j:03d}": torch.tensor(a) for j, a in enumerate(acc)})
        trainer.callback_metrics["val/acc_seen"] = torch.tensor(
            values["Top1_Acc_Seen/eval_phase/test_stream"])
        self._early_stopping(trainer, pos)
        self._log_online(trainer, step)
        if not final:
            self._write(trainer, learner, "running")

    def _early_stopping(self, trainer: pl.Trainer, pos: int) -> None:
        """Segment ends are a stream run's validations: EarlyStopping callbacks check there
        (Lightning would check once, at the end of the single epoch)."""
        if pos >= len(trainer.datamodule.stream):
            return
        for cb in trainer.early_stopping_callbacks:
            if cb.monitor in trainer.callback_metrics:
                run_early_stopping_check(cb, trainer)
        if trainer.should_stop and trainer.early_stopping_callbacks:
            self.stopped_early = True
            print(f"adaptlab: stopped early at sample {pos} by EarlyStopping "
                  f"({', '.join(cb.monitor for cb in trainer.early_stopping_callbacks)})",
                  file=sys.stderr, flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        st = self._stream(trainer)
        complete = bool(self.rows) and self.rows[-1]["position"] == len(st)
        stopped = not complete and self.stopped_early
        status = "completed" if complete else "stopped_early" if stopped else "interrupted"
        doc, summary = self._write(trainer, pl_module, status)
        if (complete or stopped) and not self.done:  # an early stop reports what it reached
            self.done = True
            self._final_logs(trainer, pl_module, doc, summary)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.started_at is None:  # not a run this evaluator judged (validate, predict)
            return
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        try:
            self._write(trainer, pl_module, status)
        except Exception:  # never mask the original error
            pass

    # -- results ------------------------------------------------------------------------------
    def document(self, trainer: pl.Trainer, learner: StreamLearner, status: str) -> dict[str, Any]:
        """The `metrics.json` document now (`final.learner` only once the run has ended)."""
        return self._document(trainer, learner, status)[0]

    def _document(self, trainer: pl.Trainer, learner: StreamLearner,
                  status: str) -> tuple[dict[str, Any], LearnerSummary]:
        summary = self.summary(trainer, learner, with_metrics=status != "running")
        doc = document.build_document(
            self._stream(trainer), self.record, summary, status,
            backend=getattr(learner, "backend", "lightning"), tolerance=self.tolerance,
            warmup=self.warmup)
        return doc, summary

    def _write(self, trainer: pl.Trainer, learner: StreamLearner,
               status: str) -> tuple[dict[str, Any], LearnerSummary]:
        doc, summary = self._document(trainer, learner, status)
        self._write_files(trainer, learner, doc)
        return doc, summary

    @rank_zero_only
    def _write_files(self, trainer: pl.Trainer, learner: StreamLearner,
                     doc: dict[str, Any]) -> None:
        if self._files is None:
            self._files = RunFiles(self.log_dir(trainer))
        self._files.write(doc, learner=learner, started_at=self.started_at,
                          hparams=self.hparams(trainer, learner))

    @staticmethod
    def hparams(trainer: pl.Trainer, learner: StreamLearner) -> dict[str, Any]:
        st = trainer.datamodule.stream
        groups = getattr(learner, "settings", {})  # grouped settings (TAME's `detector`, …)
        hp: dict[str, Any] = {}
        for k, v in dict(learner.hparams).items():
            if k.startswith("_"):  # jsonargparse's _class_path, _instantiator
                continue
            if k in groups and isinstance(v, dict):  # one column per setting: detector.window
                hp |= {f"learner/{k}.{field}": value for field, value in v.items()}
            else:
                hp[f"learner/{k}"] = v
        hp |= {"learner/class": type(learner).__name__, "stream/name": st.name,
               "stream/fingerprint": st.fingerprint[:16], "stream/seed": st.seed,
               "stream/batch_size": st.batch_size, "stream/n_samples": len(st),
               "data/batches_per_step": trainer.datamodule.batches_per_step}
        return to_jsonable({k: (v if isinstance(v, (int, float, str, bool)) or v is None
                                else str(v)) for k, v in hp.items()})

    @rank_zero_only
    def _final_logs(self, trainer: pl.Trainer, learner: StreamLearner, doc: dict[str, Any],
                    summary: LearnerSummary) -> None:
        step = learner.observe_steps
        values, scalars = document.final_scalars(doc)
        self._log(trainer, values, step)
        logger = trainer.logger
        writer = getattr(logger, "experiment", None) if logger is not None else None
        if self.figures and writer is not None and hasattr(writer, "add_figure"):
            figs = run_figures(self._stream(trainer), self.record, self.window, summary)
            for tag, fig in figs.items():
                writer.add_figure(tag, fig, global_step=step)
        hp = self.hparams(trainer, learner)
        for logger in trainer.loggers:
            log_final(logger, hp, scalars, step)
        if self.print_table:
            print(format_table(doc, self.log_dir(trainer)), file=sys.stdout, flush=True)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "init": r.init, "rows": r.rows, "anytime": r.anytime, "curve": r.curve,
            "events": r.events.state(),
            "next_anytime": self._next_anytime, "started_at": self.started_at,
            "logged_at": self._logged_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        r = self.record
        r.init, r.rows = state["init"], state["rows"]
        r.anytime, r.curve = state["anytime"], state["curve"]
        r.events.load(state["events"])
        self._next_anytime = state["next_anytime"]
        self.started_at = state["started_at"]
        self._logged_at = state.get("logged_at", -1)
