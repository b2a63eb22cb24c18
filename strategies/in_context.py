"""`InContextLearner`: trains a `TinyGPT` on in-context sequences (docs/methods/forgetting.md).

The loss is taken at the query position only (the last token), over the label tokens when
`label_softmax` is set: item rows then get no softmax gradient through the tied head, which
would otherwise make never-trained holdout rows alike. The token table has its own optimizer
group, `embedding` (no weight decay, its own lr scale), so forgetting regimes can clear its
state or schedule its lr without touching the body. Every `eval_every` optimizer steps it
scores every evaluation set of the stream (`streams.icl.eval_sets_of`) and logs each as its
own TensorBoard curve: `icl/holdout`, `icl/flip_*` next to `iwl/flip_*`, `iwl/{head,tail}`;
each also as `*_matched`, under the scale control (`matched_item_rows`), the primary ICL
measure; and `emb_norm/{items,holdout,labels}`, the mean row norms that confound raw ICL.
`label_softmax: false` is the reference's full-vocabulary softmax: every row then gets
gradient through the tied head, held-out rows included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from adaptlab.jsonio import write_json_atomic
from adaptlab.learner import StreamLearner
from adaptlab.models import TinyGPT
from adaptlab.seeding import seeded
from adaptlab.streams.icl import EvalSet, eval_sets_of, label_block_of


def curve_name(set_name: str, field: str) -> str:
    """TensorBoard tag of an evaluation score: `icl_flip_head`/`alt` -> `iwl/flip_head`."""
    family, _, rest = set_name.partition("_")
    if family in ("icl", "iwl"):
        return f"{'iwl' if field == 'alt' else family}/{rest}"
    if family == "pos":  # masked part-of-speech sets; `alt` is the in-weights answer
        return f"{'pos_iwl' if field == 'alt' else 'pos'}/{rest}"
    return f"eval/{set_name}_{field}"


class InContextLearner(StreamLearner):
    """A TinyGPT trained with AdamW on the query-position loss; evaluated on ICL/IWL sets.

    Args:
        n_layer, d_model, n_head, d_mlp, tie_head, initializer_range: the `TinyGPT`
            (the vocabulary is `n_classes`, the positions `input_shape[0]`, both linked
            from the stream).
        lr, betas, weight_decay: AdamW; weight decay on matrices only (never on embeddings).
        emb_lr_scale: lr multiplier of the `embedding` group.
        warmup_steps: linear lr warm-up at the start of training.
        lr_schedule: `constant` after the warm-up, or `linear` decay to 0 at `decay_steps`
            (the reference's schedule, default the trainer's `max_steps`).
        decay_steps: the step where `linear` reaches 0.
        n_targets: 1 (the query position), or m: samples are packed `[sentence | m targets]`
            and the loss is taken at the sentence's last m positions (the masked
            part-of-speech task, `streams.pos`); the label is 1, "all m right".
        label_softmax: restrict the loss (and predictions) to the label tokens.
        label_block: `[lo, hi)` of the label tokens; default read from the stream's vocabulary.
        pad_id: the padding row (default: the last id, as in `streams.icl`).
        eval_every: optimizer steps between evaluations (and at step 0); 0 disables them.
        eval_batch_size: sequences per evaluation forward.
        eval_matched: also score every set under the scale control (`*_matched` curves,
            `matched_item_rows`): held-out rows never get gradient under `label_softmax` and
            keep their init scale while trained rows grow, so raw holdout ICL measures how
            unlike trained rows they look as much as the in-context circuit.
        init_from: a checkpoint whose TinyGPT weights start this run (fine-tuning, e.g. with
            `ProbabilisticEmbeddingForgetting`); optimizer and counters start fresh.
        **kwargs: `StreamLearner` arguments (shapes, batch size, seed).
    """

    def __init__(
        self,
        *,
        n_layer: int = 4,
        d_model: int = 64,
        n_head: int = 4,
        d_mlp: int = 256,
        tie_head: bool = True,
        initializer_range: float = 0.02,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.98),
        weight_decay: float = 0.01,
        emb_lr_scale: float = 1.0,
        warmup_steps: int = 200,
        lr_schedule: str = "constant",
        decay_steps: int | None = None,
        n_targets: int = 1,
        label_softmax: bool = True,
        label_block: Sequence[int] | None = None,
        pad_id: int | None = None,
        eval_every: int = 500,
        eval_batch_size: int = 1024,
        eval_matched: bool = True,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if lr <= 0 or emb_lr_scale < 0 or warmup_steps < 0 or eval_every < 0:
            raise ValueError("lr > 0, emb_lr_scale >= 0, warmup_steps >= 0, eval_every >= 0")
        if len(self.input_shape) != 1:
            raise ValueError(
                f"input_shape: token sequences are 1-D, got {self.input_shape}; use an "
                "in-context stream (adaptlab.streams.icl.BurstyTokenStream)"
            )
        vocab = self.n_classes
        self.pad_id = vocab - 1 if pad_id is None else pad_id
        with seeded(self.seed):
            self.model = TinyGPT(
                vocab, n_positions=self.input_shape[0], n_layer=n_layer, d_model=d_model,
                n_head=n_head, d_mlp=d_mlp, tie_head=tie_head, pad_id=self.pad_id,
                initializer_range=initializer_range,
            )
        if init_from:
            self._load_weights(init_from)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.emb_lr_scale, self.warmup_steps = emb_lr_scale, warmup_steps
        if lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule: {lr_schedule!r} is not 'constant' or 'linear'")
        self.lr_schedule, self.decay_steps = lr_schedule, decay_steps
        if not isinstance(n_targets, int) or n_targets < 1:
            raise ValueError(f"n_targets: a positive integer, got {n_targets!r}")
        self.n_targets = n_targets
        self.label_softmax = label_softmax
        self.label_block: tuple[int, int] | None = tuple(label_block) if label_block else None
        self.eval_every, self.eval_batch_size = eval_every, eval_batch_size
        self.eval_matched = eval_matched
        self.eval_sets: dict[str, EvalSet] | None = None
        self.vocab_groups: dict[str, list[int]] = {}
        self.curves: list[dict[str, float]] = []
        self._last_loss: torch.Tensor | None = None

    def _load_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from: no checkpoint at {path!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(own)
        except RuntimeError as err:
            raise ValueError(f"init_from: {path!r} does not fit this TinyGPT "
                             f"({str(err).splitlines()[0]})") from None

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self.host_trainer is not None else None
        stream = getattr(dm, "stream", None)
        if stream is not None:
            if self.label_block is None:
                self.label_block = label_block_of(stream)
            if self.eval_sets is None:
                self.eval_sets = eval_sets_of(stream)
            vocab = stream.params.get("vocab") if isinstance(stream.params, dict) else None
            self.vocab_groups = dict(vocab or {})
        if self.label_block is None:
            self.label_block = (0, self.n_classes)
        lo, hi = self.label_block
        if not 0 <= lo < hi <= self.n_classes:
            raise ValueError(f"label_block: [{lo}, {hi}) is outside the vocabulary "
                             f"[0, {self.n_classes})")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        emb = self.model.get_input_embeddings().weight
        pos = self.model.get_position_embeddings().weight
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p is emb:
                continue
            (decay if p.ndim >= 2 and p is not pos else no_decay).append(p)
        groups = [
            {"name": "embedding", "params": [emb], "weight_decay": 0.0,
             "base_lr": self.lr * self.emb_lr_scale},
            {"name": "decay", "params": decay, "weight_decay": self.weight_decay,
             "base_lr": self.lr},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "base_lr": self.lr},
        ]
        for g in groups:
            g["lr"], g["managed_lr"] = g["base_lr"], True
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)

    def lr_factor(self, step: int) -> float:
        """Warm-up, then constant or linear decay to 0 at `decay_steps` (or `max_steps`)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        total = self.decay_steps
        if total is None and self.host_trainer is not None and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        if not total or total <= self.warmup_steps:
            return 1.0
        return max(0.0, (total - step) / (total - self.warmup_steps))

    def _set_lrs(self, optimizer: Any) -> None:
        """lr = base_lr x schedule x `lr_factor` (a forgetting regime's episode schedule)."""
        factor = self.lr_factor(self.update_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor * g.get("lr_factor", 1.0)

    # -- the contract -------------------------------------------------------------------------
    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits at the query (last) position, or (n, m, V) at the last m
        positions under `n_targets` m > 1."""
        m = self.n_targets
        return self.model(x)[:, -1] if m == 1 else self.model(x)[:, -m:]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A packed sample `[sentence | m targets]` (n_targets > 1) into its two parts."""
        m = self.n_targets
        return (x, None) if m == 1 else (x[:, :-m], x[:, -m:])

    def _restricted(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.label_softmax:
            return logits
        lo, hi = self.label_block
        out = torch.full_like(logits, float("-inf"))
        out[..., lo:hi] = logits[..., lo:hi]
        return out

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        if self.label_softmax:
            lo, hi = self.label_block
            return F.cross_entropy(logits[:, lo:hi], y - lo)
        return F.cross_entropy(logits, y)

    def _solved(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, 2) scores whose argmax is 1 exactly when every target is right (the packed
        streams' label: hard accuracy is then what the evaluator scores)."""
        ok = (self._restricted(logits).argmax(-1) == targets).all(1)
        return torch.stack([~ok, ok], 1).float()

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = self._split(x)
        logits = self.query_logits(x)
        loss = self.loss_fn(logits, y if targets is None else targets)
        opt = self.optimizers()
        self._set_lrs(opt.optimizer if hasattr(opt, "optimizer") else opt)
        self.update(opt, loss)
        self._last_loss = loss.detach()
        if targets is not None:
            return self._solved(logits.detach(), targets), loss.detach()
        return self._restricted(logits.detach()), loss.detach()

    @property
    def last_loss(self) -> torch.Tensor | None:
        """The latest training loss (pre-update), for callbacks such as a shift detector."""
        return self._last_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, targets = self._split(x)
        if targets is not None:
            return self._solved(self.query_logits(x), targets)
        return self._restricted(self.query_logits(x))

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _logits_of(self, es: EvalSet) -> torch.Tensor:
        return torch.cat([self.query_logits(es.x[s:s + self.eval_batch_size].to(self.device))
                          for s in range(0, len(es), self.eval_batch_size)])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Scores of every evaluation set, raw and under the scale control, and the mean row
        norms of the embedding groups (no training state changes)."""
        if not self.eval_sets:
            return {}
        was = self.training
        self.eval()
        out = self._score_sets("")
        w = self.model.get_input_embeddings().weight
        norms = w.detach().float().norm(dim=1)
        for group in ("items", "holdout", "labels"):
            lo_hi = self.vocab_groups.get(group)
            if lo_hi:
                out[f"emb_norm/{group}"] = float(norms[lo_hi[0]:lo_hi[1]].mean())
        items, hold = self.vocab_groups.get("items"), self.vocab_groups.get("holdout")
        if self.eval_matched and items and hold:
            g = torch.Generator().manual_seed(self.seed + 7)
            with matched_item_rows(w, items, hold, g):
                out.update(self._score_sets("_matched"))
        self.train(was)
        return out

    def _score_sets(self, suffix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, es in self.eval_sets.items():
            logits = self._logits_of(es)
            if name.startswith("train_"):
                out[f"loss/{name[6:]}{suffix}"] = float(
                    self.loss_fn(logits, es.target.to(self.device)))
                out[f"eval/{name}_acc{suffix}"] = es.score(logits, self.label_block)["acc"]
                continue
            for field, val in es.score(logits, self.label_block).items():
                out[curve_name(name, field) + suffix] = val
        return out

    def _evaluate_and_log(self) -> None:
        evaluate_and_log(self, self.evaluate, dict)

    def on_train_start(self) -> None:
        if self.eval_every and self.update_steps == 0:
            self._evaluate_and_log()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.update_steps
        log_every = max(1, self.trainer.log_every_n_steps)
        if self._last_loss is not None and batch_idx % log_every == 0 and self.logger:
            self.logger.log_metrics({"train/loss": float(self._last_loss)}, step=step)
        # a chunk of several updates may step over a multiple of eval_every: evaluate once
        last = self.curves[-1]["step"] if self.curves else -1
        if self.eval_every and step // self.eval_every > last // self.eval_every:
            self._evaluate_and_log()

    def on_train_end(self) -> None:
        if self.eval_every and (not self.curves or self.curves[-1]["step"] != self.update_steps):
            self._evaluate_and_log()
        log_dir = self.trainer.log_dir if self.host_trainer is not None else None
        if log_dir and self.trainer.is_global_zero and self.curves:
            os.makedirs(log_dir, exist_ok=True)
            write_json_atomic(os.path.join(log_dir, "icl_curves.json"),
                              {"curves": self.curves, "hparams": dict(self.hparams)})
            self._log_figure()

    def _log_figure(self) -> None:
        """The `icl_iwl_curves` figure, with reset/re-arm markers of a forgetting callback."""
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_figure"):
            return
        from adaptlab.figures import plt

        marks = next((cb for cb in self.trainer.callbacks if hasattr(cb, "reset_steps")), None)
        fig = icl_iwl_figure(self.curves, marks)
        exp.add_figure("icl_iwl_curves", fig, global_step=self.update_steps)
        plt.close(fig)

    # -- checkpoint ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"curves": self.curves}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.curves = list(state.get("curves", []))


def evaluate_and_log(
    learner: StreamLearner, evaluate: Callable[[], dict[str, Any]],
    scalars: Callable[[dict[str, Any]], dict[str, float]], field: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate at most once per optimizer step, keep the result in `learner.curves` and log
    its finite scalars: the one path of every in-context learner's periodic evaluation.

    The entry is `{"step", **result}`, or `{"step", field: result}` for a nested result (a
    demo curve). Returns the step's entry, or None when `evaluate` gave nothing.
    """
    step = learner.update_steps
    if learner.curves and learner.curves[-1]["step"] == step:
        return learner.curves[-1]
    result = evaluate()
    if not result:
        return None
    entry = {"step": step, field: result} if field else {"step": step, **result}
    learner.curves.append(entry)
    if learner.logger is not None and learner.trainer.is_global_zero:
        learner.logger.log_metrics(
            {k: v for k, v in scalars(result).items() if math.isfinite(v)}, step=step)
    return entry


@contextmanager
def matched_item_rows(weight: torch.Tensor, items: Sequence[int], holdout: Sequence[int],
                      generator: torch.Generator) -> Iterator[None]:
    """Temporarily put every item row on one scale: the scale control of `forgetting.md` §5.3.

    Held-out rows are redrawn from N(mean, std) of the trained rows (the shared mean vector
    and scalar std), then every item row, trained and held-out, is rescaled to the mean
    trained row norm, direction kept. Row scale then carries no information about how often
    (or whether) an item was trained; label rows are untouched. The rows are restored on exit.
    """
    (i0, i1), (h0, h1) = items, holdout
    idx = torch.cat([torch.arange(i0, i1), torch.arange(h0, h1)]).to(weight.device)
    saved = weight[idx].detach().clone()
    trained = saved[: i1 - i0].float().cpu()
    try:
        with torch.no_grad():
            draw = torch.randn(h1 - h0, weight.shape[1], generator=generator)
            rows = torch.cat([trained, trained.mean(0) + trained.std() * draw])
            target = trained.norm(dim=1).mean()
            rows = rows * (target / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
            weight[idx] = rows.to(weight)
        yield
    finally:
        with torch.no_grad():
            weight[idx] = saved


CURVES = ("icl/holdout_matched", "icl/flip_head_matched", "iwl/flip_head_matched",
          "iwl/head_matched", "iwl/tail_matched", "icl/holdout")


def icl_iwl_figure(curves: list[dict[str, float]], marks: Any = None, title: str = "") -> Any:
    """ICL/IWL curves against steps; grey lines at resets, red at re-arms, [0, N) shaded."""
    from adaptlab.figures import plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [c["step"] for c in curves]
    for tag in CURVES:
        if curves and tag in curves[0]:
            ax.plot(steps, [c.get(tag, float("nan")) for c in curves], label=tag)
    if marks is not None:
        for s in getattr(marks, "reset_steps", []):
            ax.axvline(s, color="grey", lw=0.5, alpha=0.5)
        for s in getattr(marks, "rearm_steps", []):
            ax.axvline(s, color="red", lw=0.8)
        window = getattr(marks, "window", None)
        if callable(window) and window() is not None:
            ax.axvspan(0, window(), color="grey", alpha=0.08)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
