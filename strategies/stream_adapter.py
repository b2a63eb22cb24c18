"""StreamAdapter's learners: Stage B meta-training and the test-time context stream.

StreamAdapter (Muhtar, Shen et al., 2024) turns streamed demonstrations into a temporary
low-rank update of a frozen causal transformer, so queries run with no context in the window
(docs/methods/stream_adapter.md). Its modules (`ContextMapper`, `WeightAbsorption`,
`AdaptedGPT`) are in `stream_adapter_nn.py`; here are the two learners over them:

- `StreamAdapter` (§5, Stage B): meta-trains the adapter on episodes of the seen families and
  exports it with the base's content hash.
- `TestTimeStreamAdapter` (§6): test-then-absorb over a context stream, resetting on a
  `ShiftDetector` firing, on oracle segment changes (`SegmentReset`) or never. Its loop is
  `TestThenAbsorb`, shared with the Hugging Face learner (`stream_adapter_hf.py`).

Stage A (the base learning in context) is `strategies/icl_families.py`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.detect import ShiftDetector
from adaptlab.episodes import EpisodeDataModule
from adaptlab.jsonio import metrics_document, write_json_atomic
from adaptlab.learner import StreamLearner
from adaptlab.oracle import SegmentChange
from adaptlab.seeding import seeded
from adaptlab.streams.core import Purpose, rng
from adaptlab.streams.icl import UNSEEN, FamilyVocab, value_dim

from .icl_families import (
    EpisodicTraining,
    distill_loss,
    family_loss,
    family_readout,
    icl_outputs,
    load_base,
    read_export,
    save_atomic,
)
from .stream_adapter_nn import (  # noqa: F401 - re-exported: the old import paths
    DEFAULT_TARGETS,
    GATES,
    RECURRENCES,
    TARGET_GROUPS,
    TARGETS,
    AdaptedGPT,
    AdaptedLM,
    ContextMapper,
    WeightAbsorption,
    _resolve_targets,
    check_base_hash,
    load_adapter_weights,
    read_state,
)

RESET_ON = ("detected", "none", "segment")
ADAPTER_FORMAT = "adaptlab.stream_adapter/1"


def load_adapter(path: str, base_path: str | None = None) -> tuple[AdaptedGPT, dict[str, Any]]:
    """A Stage B export on its base: the `AdaptedGPT` (base frozen) and the export record.

    The base is read from `base_path` (default: the path recorded at export); its content hash
    must equal the one the adapter was trained on.
    """
    rec = read_export(path, "adapter", ADAPTER_FORMAT, "no Stage B export")
    base, base_rec = load_base(base_path or rec["base_path"])
    check_base_hash(rec["base_sha256"], base_rec["sha256"], base_path or rec["base_path"])
    core = AdaptedGPT(base, **rec["adapter_args"])
    load_adapter_weights(core, rec, path)
    return core, rec


def adapted_outputs(
    core: AdaptedGPT, batch: dict[str, torch.Tensor], vocab: FamilyVocab
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorb every episode's context (one state per episode), answer its queries alone at
    position 0 through the side branches: label-block logits (B, q, L) and reals (B, q)."""
    core.reset_state(len(batch["family"]))
    if batch["ctx_token"].shape[1]:
        core.absorb(batch["ctx_token"], batch["ctx_value"], label_tokens=batch["ctx_label"])
    h = core.query_hidden(batch["q_token"], batch["q_value"], batch["q_label"])
    return family_readout(core.base, h, vocab)


class AdaptedCoreLearner(StreamLearner):
    """A learner over an `AdaptedLM` core (TinyGPT or Hugging Face): the streaming API
    delegated to the core, the adapter as the model size, and no merged weights in a
    checkpoint."""

    core: AdaptedLM

    # -- the streaming API (spec §6), delegated to the core -----------------------------------
    def reset_state(self, batch: int = 1) -> None:
        self.core.reset_state(batch)

    def commit(self) -> None:
        self.core.commit()

    def uncommit(self) -> None:
        self.core.uncommit()

    def stream_state(self) -> dict[str, Any]:
        return self.core.stream_state()

    def load_stream_state(self, state: dict[str, Any]) -> None:
        self.core.load_stream_state(state)

    @property
    def state_nbytes(self) -> int:
        return self.core.state_nbytes

    def model_size_modules(self) -> list[nn.Module]:
        return [self.core.mappers, self.core.absorptions]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.core.committed:
            raise ValueError("checkpoint: the adapter is committed (merged weights); "
                             "uncommit() before saving")
        super().on_save_checkpoint(checkpoint)


class _AdapterLearner(AdaptedCoreLearner):
    """What both TinyGPT learners share: the base's task and vocabulary, absorbing with
    TinyGPT's inputs, and answering packed queries."""

    core: AdaptedGPT

    def _bind(self, base_rec: dict[str, Any]) -> None:
        self.base_record = {k: v for k, v in base_rec.items() if k != "state_dict"}
        self.task = dict(self.base_record["task"])
        self.vocab = FamilyVocab(self.task["n_items"], self.task["n_labels"])
        if self.n_classes != self.vocab.size:
            raise ValueError(f"data: vocabulary {self.n_classes} != the base's {self.vocab.size}")

    def absorb(self, tokens: torch.Tensor, values: torch.Tensor | None = None,
               mask: torch.Tensor | None = None,
               label_tokens: torch.Tensor | None = None) -> None:
        self.core.absorb(tokens, values, mask, label_tokens)

    # -- packed queries (a context stream's samples) ------------------------------------------
    def _unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed context-stream samples (B, 2 + dv) -> tokens (B,), values (B, dv)."""
        return x[:, 0].long(), x[:, 2:]

    def _restricted(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits, −inf outside the label block (the evaluator's argmax)."""
        logits, _ = family_readout(self.core.base, h, self.vocab)
        out = logits.new_full((*logits.shape[:-1], self.n_classes), float("-inf"))
        out[..., self.vocab.label_start:self.vocab.xvec] = logits
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Answer packed queries from the current state (no context in the window)."""
        tokens, values = self._unpack(x)
        none = torch.full_like(tokens, self.vocab.none)
        h = self.core.hidden(tokens[:, None], values[:, None], none[:, None])[:, 0]
        return self._restricted(h)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The spec's name for answering queries from the current state (`forward`)."""
        return self(x)


class StreamAdapter(EpisodicTraining, _AdapterLearner):
    """StreamAdapter's Stage B: meta-train the adapter on episodes of the seen families (§5).

    Per batch the frozen base prefills each episode's context in blocks, the mappers fold it
    into the state, and the queries — each alone at position 0, no context in the window — run
    through the base plus the side branches; the loss is Stage A's. The optimiser holds the
    adapter's parameters only; `W1 = 0` makes step 0 exactly zero-shot. The result is exported
    (`export:`) with the base's content hash, for `TestTimeStreamAdapter` and the benchmark.

    Args:
        base: the Stage A export (`FamilyInContextLearner(export=…)`).
        n_slots, chunk_size, block_size, targets, layers, gate, recurrence, gate_bias: the
            adapter (`AdaptedGPT`); `block_size` defaults to the base's window W.
        lr, betas, weight_decay, warmup_steps, clip: AdamW, warm-up then cosine to 0.
        allow_weak_base: train even if the base failed Stage A's `icl_check`.
        eval_every, eval_episodes, eval_ks, eval_seed: the StreamAdapter demo curve logged
            during Stage B (default k: 1, 4, W, 4W).
        export: where Stage B writes the trained adapter.
        distill: λ of the optional `λ·KL(ICL teacher ‖ adapted)` term for k ≤ W (spec §5;
            not from the paper; 0 disables it).
        allow_unseen: let Stage B train on families held out as unseen (spec §4).
        chunk_sizes: Stage B draws each step's `C` from this list (seeded by the step), so one
            adapter serves several chunkings; inference uses `chunk_size`. How a context is
            split into `absorb` calls needs no such sampling: any split gives the same state.
        mode, adapter, reset_on, detector, log_norms_every: deprecated and unused (a
            FutureWarning): `mode: meta_train` is this class; `mode: stream` is refused with a
            pointer to `TestTimeStreamAdapter`, which takes the other four.
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    def __init__(
        self, *, base: str, mode: str | None = None, adapter: str | None = None,
        n_slots: int = 4, chunk_size: int = 4, block_size: int | None = None,
        targets: str | Sequence[str] = DEFAULT_TARGETS, layers: str | int = "all",
        gate: str = "vector", recurrence: str = "ema", gate_bias: float = 2.0,
        lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.98), weight_decay: float = 0.01,
        warmup_steps: int = 200, clip: float | None = 1.0, allow_weak_base: bool = False,
        eval_every: int = 500, eval_episodes: int = 256, eval_ks: Sequence[int] | None = None,
        eval_seed: int = 4321, export: str | None = None, reset_on: str | None = None,
        detector: dict[str, Any] | None = None, log_norms_every: int | None = None,
        distill: float = 0.0, allow_unseen: bool = False,
        chunk_sizes: Sequence[int] | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if mode == "stream":
            raise ValueError("mode: `stream` moved to its own class: use class_path "
                             "adaptlab.strategies.TestTimeStreamAdapter (base, adapter, "
                             "reset_on, detector, log_norms_every)")
        if mode not in (None, "meta_train"):
            raise ValueError(f"mode: {mode!r} is not one of ('meta_train', 'stream')")
        if mode is not None or adapter or reset_on or detector or log_norms_every:
            warnings.warn("StreamAdapter: mode, adapter, reset_on, detector and log_norms_every "
                          "are deprecated and unused (StreamAdapter is the meta-training "
                          "learner; the test-time one is TestTimeStreamAdapter)", FutureWarning,
                          stacklevel=2)
        self.base_path = base
        model, base_rec = load_base(base)
        check = base_rec.get("icl_check") or {}
        if not check.get("passed") and not allow_weak_base:
            raise ValueError(
                f"base: {base!r} failed Stage A's icl_check (families "
                f"{check.get('failing') or 'unknown'} do not learn in context); the adapter "
                "can only absorb what the base uses: train Stage A longer, or set "
                "allow_weak_base: true"
            )
        self.adapter_args = {
            "n_slots": n_slots, "chunk_size": chunk_size,
            "block_size": block_size or base_rec["task"]["window"],
            "targets": list(_resolve_targets(targets)), "layers": layers, "gate": gate,
            "recurrence": recurrence, "gate_bias": gate_bias}
        with seeded(self.seed):
            self.core = AdaptedGPT(model, **self.adapter_args)
        self._bind(base_rec)
        self.allow_unseen = allow_unseen
        self.chunk_sizes = [int(c) for c in (chunk_sizes or [])]
        bad = [c for c in self.chunk_sizes if c < 1 or self.core.block_size % c]
        if bad:
            raise ValueError(f"chunk_sizes: {bad} do not divide block_size "
                             f"{self.core.block_size}")
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.clip = warmup_steps, clip
        self.eval_every, self.eval_episodes, self.eval_seed = eval_every, eval_episodes, eval_seed
        w = self.task["window"]
        self.eval_ks = sorted({int(k) for k in (eval_ks or (1, 4, w, 4 * w))})
        self.export = export
        if distill < 0:
            raise ValueError(f"distill: must be >= 0, got {distill!r}")
        self.distill = distill
        self.curves: list[dict[str, Any]] = []
        self.families: list[str] = []
        self.core.reset_state(1)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.host_trainer is not None else None
        if not isinstance(dm, EpisodeDataModule):
            raise ValueError("StreamAdapter: data must be an adaptlab.episodes.EpisodeDataModule "
                             "(data.class_path); the test-time learner on a context stream is "
                             "TestTimeStreamAdapter")
        info = dm.task_info()
        for key in ("size", "n_items", "n_labels"):
            if info[key] != self.task[key]:
                raise ValueError(f"data.{key}: {info[key]!r}, the base was trained with "
                                 f"{self.task[key]!r}")
        self.families = list(info["families"])
        unseen = [f for f in self.families if f in UNSEEN]
        if unseen and not self.allow_unseen:
            raise ValueError(
                f"data.families: {unseen} are held out as unseen (spec §4); meta-training "
                "on them voids the unseen-family comparison (allow_unseen: true overrides)")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.core.adapter_parameters()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas)

    def adapted_outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`adapted_outputs` of this learner's adapter (one state per episode)."""
        return adapted_outputs(self.core, batch, self.vocab)

    curve_prefix = "adapter"

    def episode_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stage A's loss on the adapted answers (+ the optional distillation term); `C` drawn
        from `chunk_sizes` per step when given."""
        if self.chunk_sizes:
            pick = int(rng(self.seed, Purpose.ICL_TASK, 2000, self.update_steps).integers(
                len(self.chunk_sizes)))
            self.core.chunk_size = self.chunk_sizes[pick]
        try:
            logits, reg = self.adapted_outputs(batch)
        finally:
            self.core.chunk_size = self.adapter_args["chunk_size"]
        loss = family_loss(logits, reg, batch["target"], batch["family"], self.vocab)
        if self.distill and batch["ctx_token"].shape[1] <= self.task["window"]:
            with torch.no_grad():  # the base with the context in its window: the ICL teacher
                t_logits, t_reg = icl_outputs(self.core.base, batch, self.vocab)
            loss = loss + self.distill * distill_loss(logits, reg, t_logits, t_reg,
                                                      batch["family"])
        return loss

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapted_outputs(batch)

    @property
    def curve_families(self) -> list[str]:
        return self.families

    @property
    def curve_ks(self) -> list[int]:
        return self.eval_ks

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.episodic_step(batch, batch_idx)
        self.core.reset_state(1)  # drop the graph-holding state
        return None

    def curve(self, families: Sequence[str] | None = None, episodes: int | None = None,
              ks: Sequence[int] | None = None) -> dict[str, dict[int, dict[str, float]]]:
        try:
            return super().curve(families, episodes, ks)
        finally:
            self.core.reset_state(1)

    def on_train_end(self) -> None:
        curve = self.evaluate_and_log()
        if not self.trainer.is_global_zero:
            return
        log_dir = self.trainer.log_dir
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            n_params = sum(p.numel() for p in self.core.adapter_parameters())
            write_json_atomic(os.path.join(log_dir, "metrics.json"), metrics_document(
                "completed", final={"adapter_params": n_params,
                                    "update_steps": self.update_steps},
                stage_b={"adapter_curve": curve, "curves": self.curves,
                         "families": self.families, "steps": self.update_steps,
                         "adapter_params": n_params,
                         "base_sha256": self.base_record["sha256"]}))
            self.log_curve_figure("adapter_curve", {"StreamAdapter": curve},
                                  "Stage B: adapter skill vs demonstrations")
        if self.export:
            save_atomic(self.adapter_record(), self.export)

    def adapter_record(self) -> dict[str, Any]:
        """The Stage B export: adapter weights, settings and the base they belong to."""
        state = {k: v.detach().cpu() for k, v in self.core.state_dict().items()
                 if not k.startswith("base.")}
        return {"format": ADAPTER_FORMAT, "adapter_args": self.adapter_args,
                "state_dict": state, "base_path": os.path.abspath(self.base_path),
                "base_sha256": self.base_record["sha256"], "base_record": self.base_record,
                "families": self.families, "steps": self.update_steps, "seed": self.seed}

    def extra_state(self) -> dict[str, Any]:
        return {"curves": self.curves, "families": self.families,
                "stream_state": self.core.stream_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.curves = list(state.get("curves", []))
        self.families = list(state.get("families", []))
        if state.get("stream_state") is not None:
            self.core.load_stream_state(state["stream_state"])


class TestThenAbsorb(AdaptedCoreLearner):
    """The test-time loop of StreamAdapter (§6), whatever the adapted LM: predict each batch
    from the absorbed state, then absorb its labelled examples as demonstrations; no
    optimiser, no gradients. The state resets on a core `ShiftDetector` firing on the
    pre-absorb loss (`reset_on: detected`), at oracle segment changes (`segment`,
    `SegmentReset`) or never (`none`: the gate forgets).

    A subclass builds `core`, calls `_init_stream` and provides `forward` (answers from the
    state), `stream_loss`, `absorb_examples` and `chance_loss` (the loss a reset state is
    assumed to have: the detector's seed).
    """

    resets: list[int]
    detector: ShiftDetector | None

    @staticmethod
    def check_reset_on(reset_on: str) -> None:
        """Refuse an unknown policy (before a subclass loads its model)."""
        if reset_on not in RESET_ON:
            raise ValueError(f"reset_on: {reset_on!r} is not one of {RESET_ON}")

    def _init_stream(self, reset_on: str, detector: dict[str, Any] | None,
                     log_norms_every: int) -> None:
        self.check_reset_on(reset_on)
        self.reset_on = reset_on
        self.detector = ShiftDetector(**(detector or {})) if reset_on == "detected" else None
        self.log_norms_every = log_norms_every
        self.resets = []
        self.core.reset_state(1)

    def _check_segment_callback(self) -> None:
        if self.reset_on == "segment" and self.host_trainer is not None and not any(
                isinstance(cb, SegmentReset) for cb in self.trainer.callbacks):
            raise ValueError("reset_on: segment needs the SegmentReset callback "
                             "(--trainer.callbacks+=adaptlab.strategies.SegmentReset)")

    @property
    def chance_loss(self) -> float:
        raise NotImplementedError

    def stream_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The pre-absorb loss of a batch's predictions (what the detector reads)."""
        raise NotImplementedError

    def absorb_examples(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Absorb the labelled batch, in order, into the current state (batch 1)."""
        raise NotImplementedError

    def configure_optimizers(self) -> None:
        return None

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-then-absorb: predict the batch from the state, then absorb it as demos."""
        with torch.no_grad():
            logits = self(x)
            loss = self.stream_loss(logits, y)
            if self.detector is not None and self._shift(loss):
                self.core.reset_state(1)
                self.resets.append(self.batch_position)
            self.absorb_examples(x, y)
            if (self.log_norms_every and self.observe_steps % self.log_norms_every == 0
                    and self.logger is not None):
                self.logger.log_metrics(self.core.norms(), step=self.observe_steps)
        self._count_step()  # absorbing is this learner's update: steps, checkpoints, max_steps
        self.__dict__["update_steps"] += 1
        return logits, loss

    def _shift(self, loss: torch.Tensor) -> bool:
        """The core detector on the pre-absorb loss, its window seeded with `chance_loss` at
        creation and after each firing (the reset state answers zero-shot again)."""
        return self.detector.update(loss, seed=self.chance_loss)

    def shift_events(self) -> list[int]:
        return list(self.resets)

    def extra_state(self) -> dict[str, Any]:
        return {"resets": self.resets, "stream_state": self.core.stream_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.resets = list(state.get("resets", []))
        if state.get("stream_state") is not None:
            self.core.load_stream_state(state["stream_state"])


class TestTimeStreamAdapter(_AdapterLearner, TestThenAbsorb):
    """StreamAdapter at test time on a context stream (§6): the `StreamLearner` contract.

    `observe(x, y)` predicts the labelled examples of a `streams.icl.ContextStream` from the
    current state, then absorbs them as demonstrations (`TestThenAbsorb`). The adapter comes
    from a Stage B export (`adapter:`), whose base must match.

    Args:
        base: the Stage A export the adapter was trained on (its hash is checked).
        adapter: the Stage B export (its adapter settings are used).
        reset_on: `detected` (a core `ShiftDetector` on the pre-absorb loss, its window seeded
            with the zero-shot loss ln L, resets the state), `none` (the gate forgets) or
            `segment` (oracle resets by `SegmentReset`, an upper bound only).
        detector: `ShiftDetector` options.
        log_norms_every: observe steps between ‖S‖ and ‖ΔW‖/‖W‖ logs.
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    __test__ = False  # not a pytest class, whatever its name

    def __init__(
        self, *, base: str, adapter: str | None = None, reset_on: str = "detected",
        detector: dict[str, Any] | None = None, log_norms_every: int = 50, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.check_reset_on(reset_on)
        self.base_path = base
        if not adapter:
            raise ValueError("adapter: the test-time StreamAdapter needs a Stage B export "
                             "(adapter: …)")
        self.core, rec = load_adapter(adapter, base)
        self.adapter_args = dict(rec["adapter_args"])
        self._bind(rec["base_record"])
        if self.input_shape != (2 + value_dim(self.task["size"]),):
            raise ValueError(
                f"data: samples of shape {self.input_shape} are not packed examples of the "
                f"base's size {self.task['size']!r} ({2 + value_dim(self.task['size'])} "
                "values); use a streams.icl.ContextStream of that size")
        self._init_stream(reset_on, detector, log_norms_every)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.host_trainer is not None else None
        if isinstance(dm, EpisodeDataModule):
            raise ValueError("TestTimeStreamAdapter: data must be a context stream, not "
                             "episodes; StreamAdapter meta-trains the adapter on episodes")
        params = getattr(getattr(dm, "stream", None), "params", None) or {}
        for key in ("size", "n_items", "n_labels"):
            if key in params and params[key] != self.task[key]:
                raise ValueError(f"data.stream.{key}: {params[key]!r}, the adapter's base was "
                                 f"trained with {self.task[key]!r}")
        self._check_segment_callback()

    @property
    def chance_loss(self) -> float:
        """ln L: the loss of a uniform guess over the L labels."""
        return math.log(self.vocab.n_labels)

    def stream_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lo, hi = self.vocab.label_start, self.vocab.xvec
        return F.cross_entropy(logits[:, lo:hi], y - lo)

    def absorb_examples(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Absorb labelled stream samples (packed `x` (B, 2 + dv), label ids `y`) as B demos,
        in order, into the current state (batch 1): the label goes into the label token."""
        tokens, values = self._unpack(x)
        demo_values = values.clone()
        demo_values[:, -1] = 1.0  # has_y (label families carry y in the label token)
        self.core.absorb(tokens[None], demo_values[None], label_tokens=y[None])


class SegmentReset(pl.Callback):
    """Oracle resets at true segment changes (`reset_on: segment`; an upper bound only).

    Reads `datamodule.batch_meta()` — segment ids a task-free learner never sees — and calls
    `reset_state()` before the first chunk of a new segment. Use `data.batches_per_step: 1`
    so a change is never inside a chunk. Records `oracle_segment_info=true` in hparams.
    """

    def __init__(self) -> None:
        self.change = SegmentChange()  # the core segment-change oracle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, TestThenAbsorb) or pl_module.reset_on != "segment":
            raise ValueError("SegmentReset: needs a test-time StreamAdapter (TestThenAbsorb) "
                             "with reset_on: segment")
        pl_module.hparams["oracle_segment_info"] = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.change.update_from(trainer.datamodule):
            pl_module.reset_state(1)
            pl_module.resets.append(int(trainer.datamodule.batch_meta()["start"]))

    def state_dict(self) -> dict[str, Any]:
        return self.change.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.change.load_state_dict(state)
