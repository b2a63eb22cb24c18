"""`StreamEvaluator`: judges a learner on its stream, logs to TensorBoard, writes metrics.json.

It is the only component that reads the truth about the stream (segment ids, boundaries,
test sets), through `datamodule.batch_meta()` and `datamodule.stream`. It evaluates every
segment's test set at each true boundary and at the end (the accuracy matrix), records one
test-then-train event per `observe` call, and turns both into the metrics of
`adaptlab.metrics`. Its own state is checkpointed, so a resumed run writes the same file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import sys
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from . import figures, metrics
from .jsonio import metrics_document, to_jsonable, write_json_atomic
from .learner import StreamLearner
from .streams import Stream
from .streams.core import require_positive


def _log_final(logger: Any, hparams: dict[str, Any], scalars: dict[str, float], step: int) -> None:
    """Final metrics with the hyper-parameters: TensorBoard's HPARAMS view pairs them (its
    `metrics=`); other loggers get the hyper-parameters, where they take them, and scalars."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(hparams, metrics=scalars)
    else:
        try:
            logger.log_hyperparams(hparams)
        except NotImplementedError:
            pass  # a logger without hyper-parameter support
        logger.log_metrics(scalars, step=step)
    logger.save()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
        self.init: list[float] | None = None
        self.rows: list[dict[str, Any]] = []
        self.anytime: list[tuple[int, list[float]]] = []
        self.curve: list[list[Any]] = []
        self.started_at: str | None = None
        self._events: list[np.ndarray] = []  # each (k, 4) int64: pos, n, n_correct, seg
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self._n = 0
        self._correct = 0
        self._next_anytime: int | None = None
        self._logged_at = -1
        self.done = False
        self.stopped_early = False

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

    def _flush(self) -> None:
        """Move pending per-batch correct counts to the host (one sync per flush)."""
        if not self._pending:
            return
        counts = torch.cat([c for _, c in self._pending]).cpu().numpy().astype(np.int64)
        meta = np.concatenate([m for m, _ in self._pending])
        ev = np.column_stack([meta[:, 0], meta[:, 1], counts, meta[:, 2]])
        self._events.append(ev)
        self._n += int(ev[:, 1].sum())
        self._correct += int(ev[:, 2].sum())
        self._pending = []

    def events(self) -> metrics.OnlineEvents:
        self._flush()
        ev = np.concatenate(self._events) if self._events else np.zeros((0, 4), np.int64)
        return metrics.OnlineEvents(ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 3])

    def _log(self, trainer: pl.Trainer, values: dict[str, float | None], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if not clean:
            return
        # under the logged names, monitorable by EarlyStopping and ModelCheckpoint(monitor=…)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in clean.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(clean, step=step)

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
        self.started_at = self.started_at or _now()
        pl_module.check_labels(self._stream(trainer).task_local_labels())
        self._log_dir = None
        self.log_dir(trainer)
        if self.anytime_every is not None and self._next_anytime is None:
            self._next_anytime = self.anytime_every
        st = self._stream(trainer)
        ids = st.segment_ids
        self._first_pos = np.array([int(torch.nonzero(ids == s.id)[0]) for s in st.segments])
        fresh = trainer.datamodule.samples_consumed == 0
        if fresh and self.init_eval and self.init is None:
            self.init = self._evaluate(trainer, pl_module)
            self._log(trainer, {
                f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}": a
                for j, a in enumerate(self.init)
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
        self._pending.append((np.column_stack([pos, n, seg]), per_batch))

        step = pl_module.observe_steps
        if step // self.log_every > self._logged_at // self.log_every:
            self._logged_at = step
            self._log_online(trainer, step)
        if self._next_anytime is not None and end >= self._next_anytime:
            pl_module.before_evaluation(False)
            acc = self._evaluate(trainer, pl_module)
            # a_t pools the segments seen so far only (metrics.md §3)
            seen = self._first_pos < end
            self.anytime.append((end, [a if ok else float("nan") for a, ok in zip(acc, seen)]))
            while self._next_anytime <= end:
                self._next_anytime += self.anytime_every
        if end in st.eval_positions:
            self._boundary(trainer, pl_module, end)

    def _log_online(self, trainer: pl.Trainer, step: int) -> None:
        self._flush()
        if not self._events:
            return
        keep = self.window // max(1, int(self._events[-1][0, 1])) + 2
        tail = np.concatenate(self._events[-keep:])
        ev = metrics.OnlineEvents(tail[:, 0], tail[:, 1], tail[:, 2], tail[:, 3])
        win = metrics.acc_online_windowed(ev, self.window)
        pos = int(tail[-1, 0])
        self.curve.append([pos, win])
        values = {
            "Top1_Acc_Online/train_phase/train_stream": self._correct / max(1, self._n),
            "Top1_Acc_Online_Window/train_phase/train_stream": win,
        }
        st = self._stream(trainer)
        if not st.supervised:
            err = 1 - self._correct / max(1, self._n)
            values["TTA_Online_Error/train_phase/train_stream"] = err
        learner = trainer.lightning_module
        if learner.has_experts:
            values["ShiftDetect_Count/train_phase/train_stream"] = len(learner.shift_events())
        self._log(trainer, values, step)

    def _boundary(self, trainer: pl.Trainer, learner: StreamLearner, pos: int) -> None:
        st = self._stream(trainer)
        i = len(self.rows)
        final = pos == len(st)
        learner.before_evaluation(final)
        acc = self._evaluate(trainer, learner)
        self.rows.append({
            "after_segment": st.row_segments[i], "position": pos,
            "observe_step": learner.observe_steps, "acc": acc,
        })
        step = learner.observe_steps
        R = self.matrix()
        first = list(st.first_rows)
        n = [s.n_test for s in st.segments]
        run = metrics.running_report(R, upto_row=i, first=first, b=self.init, n=n)
        fl = metrics.forgetting_last_curve(R, first=first)[i]
        values: dict[str, float | None] = {
            f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}": a for j, a in enumerate(acc)
        }
        values |= {
            "Top1_Acc_Stream/eval_phase/test_stream": run["acc_final_weighted"],
            "StreamForgetting/eval_phase/test_stream": fl,
            "StreamBWT/eval_phase/test_stream": None if fl is None else -fl,
            "Top1_Acc_Seen/eval_phase/test_stream": run["acc_final"],
            "Acc_IncrementalAvg/eval_phase/test_stream": run["acc_incremental_avg"],
            "Forgetting_Chaudhry/eval_phase/test_stream": run["forgetting_chaudhry"],
            "BWT_GEM/eval_phase/test_stream": run["bwt_gem"],
            "BWT_Pairwise/eval_phase/test_stream": run["bwt_pairwise"],
            "FWT_GEM/eval_phase/test_stream": run["fwt_gem"],
        }
        ev = self.events()
        k = st.row_segments[i]
        seg_acc = metrics.acc_online_per_segment(ev.select(ev.seg == k)).get(k)
        col = st.segment_index[k]
        values[f"Top1_Acc_Online/train_phase/train_stream/Exp{col:03d}"] = seg_acc
        if not st.supervised and seg_acc is not None:
            values[f"TTA_Online_Error/train_phase/train_stream/Exp{col:03d}"] = 1 - seg_acc
        self._log(trainer, values, step)
        # the names `adaptlab validate` logs, so a monitor works the same in fit and validate
        trainer.callback_metrics.update(
            {f"val/acc_exp{j:03d}": torch.tensor(a) for j, a in enumerate(acc)})
        trainer.callback_metrics["val/acc_seen"] = torch.tensor(run["acc_final"])
        self._early_stopping(trainer, pos)
        self._log_online(trainer, step)
        if not final:
            self._write(trainer, learner, "running")

    def _early_stopping(self, trainer: pl.Trainer, pos: int) -> None:
        """Segment ends are a stream run's validations: EarlyStopping callbacks check there.
        Lightning would check once, at the end of the single epoch; its check is private
        (`_run_early_stopping_check`), the one call made from outside the class."""
        if pos >= len(trainer.datamodule.stream):
            return
        for cb in trainer.early_stopping_callbacks:
            if cb.monitor in trainer.callback_metrics:
                cb._run_early_stopping_check(trainer)
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
        doc = self._write(trainer, pl_module, status)
        if (complete or stopped) and not self.done:  # an early stop reports what it reached
            self.done = True
            self._final_logs(trainer, pl_module, doc)

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
    def matrix(self) -> np.ndarray:
        return np.array([r["acc"] for r in self.rows], dtype=float)

    def final_metrics(
        self, trainer: pl.Trainer, learner: StreamLearner, with_learner: bool = True
    ) -> dict[str, Any]:
        """Everything `metrics.json` holds under `final`, `per_segment`, `shift_detection`.
        `with_learner=False` leaves `final.learner` null (its routing pass over every test
        set is for the end of a run, not every boundary)."""
        st = self._stream(trainer)
        R = self.matrix()
        first = list(st.first_rows)
        n = [s.n_test for s in st.segments]
        ev = self.events()
        final: dict[str, Any] = dict.fromkeys([
            "acc_final", "acc_final_weighted", "acc_incremental_avg", "forgetting_chaudhry",
            "forgetting_last", "bwt_gem", "bwt_pairwise", "fwt_gem",
        ])
        if len(R):
            full = len(R) == len(st.eval_positions)
            rep = metrics.matrix_report(R, first=first, b=self.init, n=n) if full else (
                metrics.running_report(R, upto_row=len(R) - 1, first=first, b=self.init, n=n)
            )
            final.update(rep)
        final["acc_online"] = metrics.acc_online(ev)
        rec = metrics.recovery_samples(ev, st.eval_positions)
        known = [r for r in rec if r is not None]
        final["recovery_samples"] = float(np.mean(known)) if known else None
        final["recovery_samples_per_occurrence"] = rec
        final["acc_anytime_auc"] = None
        if self.anytime:
            final["acc_anytime_auc"] = metrics.acc_anytime_auc(
                [p for p, _ in self.anytime], np.array([a for _, a in self.anytime]), n=n
            )
        final["tta_online_error"] = None
        final["tta_online_error_mean_domain"] = None
        if not st.supervised:
            final["tta_online_error"] = metrics.tta_online_error(ev)
            final["tta_online_error_mean_domain"] = metrics.tta_online_error_mean_domain(
                ev, {s.id: s.group for s in st.segments}
            )
        sized = learner.model_size_modules()
        final["params_total"] = metrics.params_total(sized)
        final["params_nonzero"] = metrics.params_nonzero(sized)
        final["learner"] = self._learner_metrics(trainer, learner, ev) if with_learner else (
            dict.fromkeys(metrics.EXPERT_METRICS))

        per_online = metrics.acc_online_per_segment(ev)
        f_ch = metrics.forgetting_chaudhry(R, first=first, per_segment=True) if len(R) else None
        f_last = metrics.forgetting_last(R, first=first, per_segment=True) if len(R) else None
        per_segment = {}
        for j, seg in enumerate(st.segments):
            on = per_online.get(seg.id)
            per_segment[str(seg.id)] = {
                "acc_online": on,
                "forgetting_chaudhry": f_ch[j] if f_ch else None,
                "forgetting_last": f_last[j] if f_last else None,
                "tta_online_error": None if (st.supervised or on is None) else 1 - on,
            }
        detection = None
        detections = learner.shift_events()
        if learner.has_experts or detections:
            rep = metrics.detection_report(
                list(st.true_shifts), sorted(detections), len(st), tolerance=self.tolerance,
                warmup=self.warmup, batch_size=st.batch_size,
            )
            detection = {"tolerance": rep.tolerance, "warmup": self.warmup,
                         "detections": sorted(detections), "report": dataclasses.asdict(rep)}
        return {"final": final, "per_segment": per_segment, "shift_detection": detection}

    def _learner_metrics(
        self, trainer: pl.Trainer, learner: StreamLearner, ev: metrics.OnlineEvents
    ) -> dict[str, Any]:
        """Expert learners' metrics (`metrics.EXPERT_METRICS`); all null for the others.

        An expert "belongs" to the segment it was active on most during training, and a
        segment's own expert is the one most active on it; test inputs are routed as
        `forward` routes them (`expert_ids(x)`)."""
        out: dict[str, Any] = dict.fromkeys(metrics.EXPERT_METRICS)
        active = learner.expert_ids()
        if active is None or len(ev) == 0:
            return out
        active = np.asarray(active.cpu() if torch.is_tensor(active) else active)[: len(ev)]
        st = self._stream(trainer)
        segment_of, expert_of = {}, {}
        for k in np.unique(active):
            segs, counts = np.unique(ev.seg[active == k], return_counts=True)
            segment_of[int(k)] = int(segs[np.argmax(counts)])
        for s in np.unique(ev.seg):
            ks, counts = np.unique(active[ev.seg == s], return_counts=True)
            expert_of[int(s)] = int(ks[np.argmax(counts)])
        dm = trainer.datamodule
        inferred, oracle, class_il, selector = [], [], [], []
        was = learner.training
        learner.eval()
        with torch.no_grad():
            for seg in st.segments:
                x, y = dm.test_set(seg.id)
                x, y = x.to(learner.device), y.to(learner.device)
                routed = learner.expert_ids(x).cpu().numpy()
                ok = (learner(x).argmax(-1) == y).cpu().numpy()
                right_expert = np.array([segment_of.get(int(r), -1) == seg.id for r in routed])
                own = learner.expert_logits(x, expert_of[seg.id]) if seg.id in expert_of else None
                inferred.append(ok.mean())
                oracle.append(float("nan") if own is None else
                              (own.argmax(-1) == y).float().mean().item())
                selector.append(right_expert.mean())
                class_il.append((ok & right_expert).mean())
        learner.train(was)
        out.update(acc_task_inferred=float(np.mean(inferred)),
                   acc_task_oracle=None if np.isnan(oracle).any() else float(np.mean(oracle)),
                   acc_class_il=float(np.mean(class_il)), selector_acc=float(np.mean(selector)),
                   n_experts=len(np.unique(active)))
        return out

    def document(self, trainer: pl.Trainer, learner: StreamLearner, status: str) -> dict[str, Any]:
        st = self._stream(trainer)
        backend = getattr(learner, "backend", "lightning")
        doc: dict[str, Any] = metrics_document(status, backend=backend) | {
            "stream": {
                **{k: v for k, v in st.describe().items() if k != "params"},
            },
            "accuracy_matrix": {
                "columns": [s.id for s in st.segments],
                "test_sizes": [s.n_test for s in st.segments],
                "init": self.init,
                "rows": self.rows,
            },
        }
        doc |= self.final_metrics(trainer, learner, with_learner=status != "running")
        doc["curves"] = {
            "acc_online_windowed": self.curve,
            "acc_anytime": metrics.acc_anytime_curve(
                [p for p, _ in self.anytime], np.array([a for _, a in self.anytime]),
                n=[s.n_test for s in st.segments],
            ) if self.anytime else [],
        }
        doc["definitions"] = metrics.DEFINITIONS
        return doc

    @rank_zero_only
    def _write_files(self, trainer: pl.Trainer, doc: dict[str, Any], status: str) -> None:
        d = self.log_dir(trainer)
        os.makedirs(d, exist_ok=True)
        write_json_atomic(os.path.join(d, "metrics.json"), doc)
        if status == getattr(self, "_run_status", None):
            return  # run.json changes only with the status
        self._run_status = status
        learner = trainer.lightning_module
        run = {
            "log_dir": d, "seed": getattr(learner, "seed", None),
            "learner": type(learner).__name__, "status": status,
            "started_at": self.started_at,
            "finished_at": _now() if status != "running" else None,
            "hparams": self.hparams(trainer, learner),
        }
        write_json_atomic(os.path.join(d, "run.json"), run)

    def _write(self, trainer: pl.Trainer, learner: StreamLearner, status: str) -> dict[str, Any]:
        doc = self.document(trainer, learner, status)
        self._write_files(trainer, doc, status)
        return doc

    @staticmethod
    def hparams(trainer: pl.Trainer, learner: StreamLearner) -> dict[str, Any]:
        st = trainer.datamodule.stream
        hp = {f"learner/{k}": v for k, v in dict(learner.hparams).items()
              if not k.startswith("_")}  # jsonargparse's _class_path, _instantiator
        hp |= {"learner/class": type(learner).__name__, "stream/name": st.name,
               "stream/fingerprint": st.fingerprint[:16], "stream/seed": st.seed,
               "stream/batch_size": st.batch_size, "stream/n_samples": len(st),
               "data/batches_per_step": trainer.datamodule.batches_per_step}
        return to_jsonable({k: (v if isinstance(v, (int, float, str, bool)) or v is None
                                else str(v)) for k, v in hp.items()})

    @rank_zero_only
    def _final_logs(self, trainer: pl.Trainer, learner: StreamLearner, doc: dict[str, Any]) -> None:
        st = self._stream(trainer)
        final = doc["final"]
        step = learner.observe_steps
        values = {
            "Model_Params_Total/train_phase/train_stream": final["params_total"],
            "Model_Params_NonZero/train_phase/train_stream": final["params_nonzero"],
            "Acc_Anytime_AUC/eval_phase/test_stream": final["acc_anytime_auc"],
        }
        if doc["shift_detection"]:
            rep = doc["shift_detection"]["report"]
            for tag, key in [("Delay", "detection_delay"), ("FalseAlarms", "false_alarms"),
                             ("Missed", "missed_detections"), ("FDR", "false_discovery_rate"),
                             ("MTFA", "mtfa")]:
                values[f"ShiftDetect_{tag}/train_phase/train_stream"] = rep[key]
        self._log(trainer, values, step)
        logger = trainer.logger
        writer = getattr(logger, "experiment", None) if logger is not None else None
        if self.figures and writer is not None and hasattr(writer, "add_figure"):
            R = self.matrix()
            writer.add_figure("Figures/accuracy_matrix", figures.accuracy_matrix(
                R, [f"{i}: {st.segments[st.segment_index[s]].name}"
                    for i, s in enumerate(st.row_segments[: len(R)])],
                [s.name for s in st.segments],
            ), global_step=step)
            writer.add_figure("Figures/online_accuracy", figures.online_accuracy(
                self.curve, st.true_shifts, self.window), global_step=step)
            active = learner.expert_ids()
            if active is not None:
                ev = self.events()
                writer.add_figure("Figures/expert_timeline", figures.expert_timeline(
                    ev.pos, np.asarray(active.cpu() if torch.is_tensor(active) else active)[
                        : len(ev)], ev.seg, st.true_shifts, sorted(learner.shift_events())),
                    global_step=step)
        for logger in trainer.loggers:
            scalars = {f"final/{k}": v for k, v in final.items()
                       if isinstance(v, (int, float)) and v is not None}
            scalars |= {f"final/learner/{k}": v for k, v in final["learner"].items()
                        if isinstance(v, (int, float)) and v is not None}
            _log_final(logger, self.hparams(trainer, learner), scalars, step)
        if self.print_table:
            print(format_table(doc, self.log_dir(trainer)), file=sys.stdout, flush=True)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ev = self.events()
        return {
            "init": self.init, "rows": self.rows, "anytime": self.anytime, "curve": self.curve,
            # a tensor, not a numpy array: checkpoints must load with weights_only=True
            "events": torch.from_numpy(np.column_stack([ev.pos, ev.n, ev.n_correct, ev.seg])),
            "next_anytime": self._next_anytime, "started_at": self.started_at,
            "logged_at": self._logged_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self.init, self.rows = state["init"], state["rows"]
        self.anytime, self.curve = state["anytime"], state["curve"]
        ev = torch.as_tensor(state["events"]).numpy().astype(np.int64).reshape(-1, 4)
        if len(ev):
            self._events = [ev]
            self._n, self._correct = int(ev[:, 1].sum()), int(ev[:, 2].sum())
        self._next_anytime = state["next_anytime"]
        self.started_at = state["started_at"]
        self._logged_at = state.get("logged_at", -1)


def format_table(doc: dict[str, Any], log_dir: str) -> str:
    """The final metrics and the accuracy matrix as a plain-text table."""
    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    final = doc["final"]
    keys = ["acc_final", "acc_final_weighted", "acc_incremental_avg", "forgetting_chaudhry",
            "forgetting_last", "bwt_gem", "fwt_gem", "acc_online", "tta_online_error",
            "params_total", "params_nonzero"]
    lines = [f"adaptlab — {doc['stream']['name']} ({doc['status']})", "-" * 44]
    lines += [f"{k:<24}{f(final[k]):>20}" for k in keys]
    lines += [f"{k:<24}{f(v):>20}" for k, v in final["learner"].items() if v is not None]
    if doc.get("shift_detection"):
        rep = doc["shift_detection"]["report"]
        lines += [f"{'detection_delay':<24}{f(rep['detection_delay']):>20}",
                  f"{'false_alarms':<24}{f(rep['false_alarms']):>20}",
                  f"{'missed_detections':<24}{f(rep['missed_detections']):>20}"]
    lines += ["-" * 44, "accuracy matrix (rows: after segment, columns: test set)"]
    for r in doc["accuracy_matrix"]["rows"]:
        lines.append(f"  seg {r['after_segment']:>3} | " + " ".join(
            "  —  " if a is None else f"{a:.3f}" for a in r["acc"]))
    lines.append(f"metrics.json: {os.path.join(log_dir, 'metrics.json')}")
    return "\n".join(lines)
