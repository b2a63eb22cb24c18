"""Test-time adaptation: a source model meets an unlabelled stream of shifted test batches.

Every learner here predicts a batch first (that prediction is scored: `tta_online_error`)
and then adapts on it, without labels (`observe` never reads `y`). They all start from a
source model exported by `SourceTraining` (`configs/tta/source_digits.yaml`) or from an
external state dict (e.g. RobustBench's CIFAR-10 `Standard.pt`, `source_format: state_dict`).

- `Source`: adapts nothing; the source model with its training statistics.
- `BNAdapt`: BN statistics from the test batch (Schneider et al. 2020, Nado et al. 2020);
  `alpha` < 1 mixes in the source statistics.
- `TENT`: norm affine parameters; minimise the mean prediction entropy (Wang et al. 2021).
- `EATA`: norm affine; weighted entropy of reliable, non-redundant samples plus a Fisher
  penalty (Niu et al. 2022).
- `SAR`: norm affine; reliable entropy, sharpness-aware step, recovery on collapse (Niu et
  al. 2023).
- `CoTTA`: all weights; mean teacher, augmentation-averaged pseudo-labels, stochastic
  restore (Wang et al. 2022).
- `LAME`: outputs only; Laplacian-regularised assignment over the batch (Boudiaf et al. 2022).

**Shift-aware resets** (every adapting learner, `reset:`): `shift` feeds the core
`ShiftDetector` one unsupervised number per batch (the mean prediction entropy, or one minus
the mean confidence) and restores the source weights and optimizer state when it fires;
`periodic` restores every `reset_every` batches (RDumb, Press et al. 2023); `none` never does.
The detector's firings are the learner's `shift_events()`, scored by the evaluator.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.detect import ShiftDetector
from adaptlab.learner import StreamLearner, make_optimizer
from adaptlab.models import build_model, norm_layers
from adaptlab.seeding import seeded

from .icl_families import save_atomic, state_hash
from .joint import Joint

# Learners that adapt no weights (Source, BNAdapt, LAME) have no optimizer, by design.
warnings.filterwarnings("ignore", message=r".*configure_optimizers` returned `None`")

SOURCE_FORMAT = "adaptlab-tta-source/1"
RESETS = ("none", "shift", "periodic")
# The detector on one mean entropy per batch (chosen on the continual digits stream, seed 0,
# with TENT: each upward jump of 0.25+ nats fires within one batch, the ~0.03-nat noise between
# batches never does). The window (12 batches) is shorter than a domain, so the spread of the
# previous domain's entropies does not hide the next jump; light smoothing, a 0.02-nat floor.
TTA_DETECTOR = {"window": 12, "alpha": 0.5, "n_sigma": 3.0, "sigma_floor": 0.02, "grace": 5}
STATISTICS = ("entropy", "confidence")
SOURCE_HINT = "; train and export one first: adaptlab fit --config configs/tta/source_digits.yaml"


# ----- the source model ----------------------------------------------------------------------


class SourceTraining(Joint):
    """Train the source model on clean, i.i.d. data (`Joint`) and export it for TTA.

    Args:
        export: where to write the record (backbone, arch, shapes, weights, a small clean
            sample for EATA's Fisher information); None: not exported.
        export_sample: clean training inputs kept in the record (no labels).
        **kwargs: `Finetune` arguments (backbone, optimizer, lr, ...).
    """

    def __init__(self, *, export: str | None = None, export_sample: int = 500,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export = export
        self.export_sample = export_sample
        self._sample: list[torch.Tensor] = []
        self._kept = 0

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kept < self.export_sample:  # the first inputs of an i.i.d. shuffle
            part = x[: self.export_sample - self._kept].detach().cpu()
            self._sample.append(part)
            self._kept += len(part)
        return super().observe(x, y)

    def on_train_end(self) -> None:
        if self.export and (self.host_trainer is None or self.host_trainer.is_global_zero):
            save_atomic(self.source_record(), self.export)

    def source_record(self) -> dict[str, Any]:
        """What a TTA learner needs to rebuild and check the source model."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        sample = torch.cat(self._sample) if self._sample else torch.zeros(0, *self.input_shape)
        return {"format": SOURCE_FORMAT, "backbone": self.backbone,
                "backbone_args": self.backbone_args, "input_shape": list(self.input_shape),
                "n_classes": self.n_classes, "state_dict": state, "sha256": state_hash(state),
                "sample": sample, "steps": self.update_steps, "seed": self.seed}

    def extra_state(self) -> dict[str, Any]:
        return {"sample": self._sample, "kept": self._kept}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._sample = list(state.get("sample", []))
        self._kept = int(state.get("kept", 0))


def _strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict as saved by others: nested under `state_dict`/`model`, `module.` prefixes
    from DataParallel."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()
            if torch.is_tensor(v)}


def load_source(
    path: str | None, *, input_shape: tuple[int, ...], n_classes: int, backbone: str | None,
    backbone_args: dict[str, Any] | None, source_format: str = "export",
) -> tuple[nn.Module, dict[str, Any]]:
    """The source model a TTA learner starts from, checked against the stream: an adaptlab
    export (`export`) or a plain state dict for `backbone` (`state_dict`). Every failure is
    one line naming `source`."""
    if not path:
        raise ValueError("source: a TTA learner starts from a trained source model; set "
                         "--model.init_args.source to its file" + SOURCE_HINT)
    if source_format not in ("export", "state_dict"):
        raise ValueError(f"source_format: {source_format!r} is not 'export' or 'state_dict'")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: no source model at {path!r}" + SOURCE_HINT)
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"source: {path!r} is not readable ({type(err).__name__})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"source: {path!r} holds no state dict")
    info: dict[str, Any] = {"path": path, "sample": None}
    if source_format == "export":
        if rec.get("format") != SOURCE_FORMAT:
            raise ValueError(f"source: {path!r} is not an adaptlab source export (a plain "
                             "state dict loads with source_format: state_dict and a backbone)")
        shape, classes = tuple(rec["input_shape"]), int(rec["n_classes"])
        if classes != n_classes or shape != tuple(input_shape):
            raise ValueError(
                f"source: {path!r} was trained for {classes} classes on inputs {shape}, but the "
                f"stream has {n_classes} classes on inputs {tuple(input_shape)}; train a source "
                "model on this data")
        if backbone is not None and (backbone, dict(backbone_args or {})) != (
                rec["backbone"], dict(rec["backbone_args"])):
            raise ValueError(
                f"source: {path!r} is a {rec['backbone']!r} {dict(rec['backbone_args'])}, the "
                f"config names {backbone!r} {dict(backbone_args or {})}; drop backbone and "
                "backbone_args (an export carries its own)")
        backbone, backbone_args, state = rec["backbone"], dict(rec["backbone_args"]), \
            rec["state_dict"]
        info["sample"] = rec.get("sample")
    else:
        if backbone is None:
            raise ValueError("backbone: a plain state dict (source_format: state_dict) needs "
                             "the backbone it was saved from, e.g. backbone: wideresnet")
        state = _strip(rec)
    model = build_model(backbone, input_shape, n_classes, **dict(backbone_args or {}))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        what = "; ".join(f"{label} {keys[:3]}{' …' if len(keys) > 3 else ''}" for label, keys in (
            ("missing", missing), ("unexpected", extra), ("other shapes", shapes)) if keys)
        raise ValueError(f"source: {path!r} does not fit backbone {backbone!r} "
                         f"{dict(backbone_args or {})} for {n_classes} classes on inputs "
                         f"{tuple(input_shape)}: {what}")
    model.load_state_dict(state)
    info.update(backbone=backbone, backbone_args=dict(backbone_args or {}))
    return model, info


# ----- building blocks -----------------------------------------------------------------------


class AlphaBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that normalises with the current batch's statistics in train and eval mode
    alike (Lightning's train/eval switch changes nothing), mixed with the source statistics by
    `alpha` (1: the batch's alone, "BN-1"; 0: the source's alone, BN in eval mode):
    mean = alpha * batch + (1 - alpha) * source, and so the variance. The source statistics
    stay in `running_mean`/`running_var` (never updated), so state dicts keep BN's names."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, alpha: float = 1.0) -> None:
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=True, device=bn.weight.device if bn.affine else None)
        self.load_state_dict(bn.state_dict())
        self.alpha = float(alpha)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"AlphaBatchNorm: expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha >= 1.0:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.alpha <= 0.0:  # the source statistics alone: BN in eval mode
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *([1] * (x.dim() - 2))]
        mean = self.alpha * x.mean(dims) + (1 - self.alpha) * self.running_mean
        var = self.alpha * x.var(dims, unbiased=False) + (1 - self.alpha) * self.running_var
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def use_test_statistics(model: nn.Module, alpha: float = 1.0) -> int:
    """Replace every BatchNorm of `model` in place by `AlphaBatchNorm`; returns how many."""
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, AlphaBatchNorm):
            setattr(model, name, AlphaBatchNorm(child, alpha))
            n += 1
        else:
            n += use_test_statistics(child, alpha)
    return n


def norm_affine(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters (gamma, beta) of every normalisation layer: what TENT, EATA and
    SAR adapt."""
    return [p for m in norm_layers(model) for p in (m.weight, m.bias) if p is not None]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits), in nats."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al. 2021) around a base optimizer: `first_step`
    climbs to w + rho * g / |g|; `step` returns to w and takes the base step with the gradient
    found there."""

    def __init__(self, params: Any, base: type[torch.optim.Optimizer], rho: float = 0.05,
                 **kwargs: Any) -> None:
        if rho < 0:
            raise ValueError(f"rho: must be >= 0, got {rho!r}")
        super().__init__(params, {"rho": rho, **kwargs})
        self.base = base(self.param_groups, **kwargs)
        self.param_groups = self.base.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([q.norm(2) for q in grads]), 2) if grads else None
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12) if norm is not None else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                e_w = self.state[p].pop("e_w", None) if p in self.state else None
                if e_w is not None:
                    p.sub_(e_w)
        self.base.step()

    def reset_state(self) -> None:
        self.state.clear()
        self.base.state.clear()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum): what a resumed run needs."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


# ----- the learners --------------------------------------------------------------------------


class TTALearner(StreamLearner):
    """What every test-time learner shares: the source model, label-free `observe`, resets.

    Args:
        source: the source model's file (a `SourceTraining` export, or a state dict with
            `source_format: state_dict` and `backbone`/`backbone_args`).
        source_format: `export` or `state_dict`.
        optimizer, lr, momentum, weight_decay: the adaptation optimizer.
        reset: `none`, `shift` (restore the source when the detector fires) or `periodic`.
        reset_every: batches between periodic resets (RDumb).
        reset_statistic: what the detector watches per batch: `entropy` (mean prediction
            entropy) or `confidence` (one minus the mean max-probability).
        detector: `ShiftDetector` arguments (over `TTA_DETECTOR`).
        **kwargs: `StreamLearner` arguments (shapes and batch size come from the stream).
    """

    adapts = True
    """Whether the learner changes weights or statistics (resets apply)."""
    needs_norm: tuple[type, ...] = ()
    """Normalisation layers the method cannot work without."""

    def __init__(
        self,
        *,
        source: str | None = None,
        source_format: str = "export",
        backbone: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        reset: str = "none",
        reset_every: int = 1000,
        reset_statistic: str = "entropy",
        detector: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone or "mlp", backbone_args=backbone_args, **kwargs)
        if reset not in RESETS:
            raise ValueError(f"reset: {reset!r} is not one of {RESETS}")
        if reset != "none" and not self.adapts:
            raise ValueError(f"reset: {type(self).__name__} adapts no weights, so there is "
                             "nothing to reset; use reset: none")
        if reset_statistic not in STATISTICS:
            raise ValueError(f"reset_statistic: {reset_statistic!r} is not one of {STATISTICS}")
        if not isinstance(reset_every, int) or reset_every < 1:
            raise ValueError(f"reset_every: must be a positive integer, got {reset_every!r}")
        make_optimizer(optimizer, [nn.Parameter(torch.zeros(1))], lr=lr)  # validate early
        self.optimizer_name, self.lr = optimizer, lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.reset, self.reset_every, self.reset_statistic = reset, reset_every, reset_statistic
        model, info = load_source(
            source, input_shape=self.input_shape, n_classes=self.n_classes, backbone=backbone,
            backbone_args=backbone_args, source_format=source_format)
        self.backbone, self.backbone_args = info["backbone"], info["backbone_args"]
        self.source_info = info
        if self.needs_norm and not norm_layers(model, self.needs_norm):
            kinds = ", ".join(k.__name__.lstrip("_") for k in self.needs_norm)
            raise ValueError(
                f"{type(self).__name__}: the source backbone {self.backbone!r} has no "
                f"normalisation layers ({kinds}) to adapt; train the source with a normalised "
                "backbone (lenet_bn, resnet18, wideresnet)")
        self.model = self.prepare_model(model)
        self._source_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.detector = ShiftDetector(**{**TTA_DETECTOR, **(detector or {})})
        self.detections: list[int] = []
        self.resets: list[int] = []
        self._since_reset = 0

    # -- what a method provides -----------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Prepare the source model for adaptation (which statistics, which parameters)."""
        return model

    def adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict on `x` (the scored prediction), then adapt; returns (logits, loss). A
        learner that adapts no weights (`adapts = False`) only predicts."""
        if self.adapts:
            raise NotImplementedError
        with torch.no_grad():
            return self.forward(x), None

    def params_to_adapt(self) -> list[nn.Parameter]:
        return norm_affine(self.model)

    def reset_method_state(self) -> None:
        """Method state beyond the weights and optimizer (EATA's mean probabilities, ...)."""

    # -- shared -----------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        params = self.params_to_adapt() if self.adapts else []
        if not params:
            return None
        return make_optimizer(self.optimizer_name, params, lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        del y  # an unsupervised stream: labels are never read
        logits, loss = self.adapt(x)
        self._after_batch(logits)
        return logits, loss

    def _after_batch(self, logits: torch.Tensor) -> None:
        """The reset policy, after the batch was predicted and adapted on."""
        if self.reset == "none":
            return
        self._since_reset += 1
        if self.reset == "periodic":
            if self._since_reset >= self.reset_every:
                self.restore_source()
            return
        if self.reset_statistic == "entropy":
            value = float(entropy(logits.float()).mean())
        else:
            value = 1.0 - float(logits.float().softmax(1).amax(1).mean())
        if self.detector.update(value):
            self.detections.append(self.batch_position)
            self.restore_source()

    def restore_source(self) -> None:
        """Back to the source: weights, statistics, optimizer state, method state."""
        self.model.load_state_dict(self._source_state)
        opt = self.optimizers() if self.host_trainer is not None else None
        if opt is not None and not isinstance(opt, list):
            inner = getattr(opt, "optimizer", opt)
            (inner.reset_state if hasattr(inner, "reset_state") else inner.state.clear)()
        self.reset_method_state()
        self.resets.append(self.batch_position)
        self._since_reset = 0

    def shift_events(self) -> list[int]:
        return list(self.detections)

    def model_size_modules(self) -> list[nn.Module]:
        return [self.model]

    def extra_state(self) -> dict[str, Any]:
        return {"detections": self.detections, "resets": self.resets,
                "since_reset": self._since_reset}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.detections = list(state.get("detections", []))
        self.resets = list(state.get("resets", []))
        self._since_reset = int(state.get("since_reset", 0))

    def step_generator(self, purpose: int) -> torch.Generator:
        """A generator for this batch's random draws, keyed by (seed, purpose, batch): the
        same draws in a resumed run without saving any RNG state."""
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + purpose) * 1_000_003 + self.observe_steps)
        return g


class Source(TTALearner):
    """No adaptation: the source model with its training statistics (the baseline)."""

    adapts = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        use_test_statistics(model, alpha=0.0)  # the training statistics, in any mode
        return model.requires_grad_(False)


class BNAdapt(TTALearner):
    """Test-time normalisation: BatchNorm uses the test batch's statistics (`alpha` = 1, the
    benchmark's "BN-1"), or mixes them with the source's (`alpha` < 1, Schneider et al.'s
    prior). No gradient step, and nothing carried from batch to batch (nothing to reset)."""

    adapts = False
    needs_norm = (nn.modules.batchnorm._BatchNorm,)

    def __init__(self, *, alpha: float = 1.0, **kwargs: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        use_test_statistics(model, self.alpha)
        return model


class TENT(TTALearner):
    """TENT (Wang et al. 2021): BatchNorm on test-batch statistics, and one gradient step per
    batch on the mean prediction entropy, over the normalisation layers' affine parameters
    only. Defaults: Adam, lr 1e-3 (the paper's CIFAR setting)."""

    needs_norm = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        use_test_statistics(model)
        model.requires_grad_(False)
        for p in norm_affine(model):
            p.requires_grad_(True)
        return model

    def adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        loss = entropy(logits).mean()
        self.update(self.optimizers(), loss, n=len(x))
        return logits.detach(), loss.detach()


class EATA(TENT):
    """EATA (Niu et al. 2022): entropy minimisation on reliable (entropy < `e_margin` ln C) and
    non-redundant samples (|cosine| of the probabilities to their running mean < `d_margin`),
    each weighted by 1 / exp(entropy - E0), plus the anti-forgetting penalty
    `fisher_alpha` * sum F (theta - theta_source)^2, F the diagonal Fisher information of the
    norm parameters on clean source inputs with the model's own predictions as labels.

    Args:
        e_margin: E0 as a fraction of ln C (paper: 0.4).
        d_margin: redundancy threshold on the cosine similarity (paper: 0.05, for 1,000
            ImageNet classes; with 10 classes any confident prediction has cosine >= ~0.3 to
            a mean over classes, so configs on 10 classes use 0.4).
        fisher_alpha: weight of the Fisher penalty (paper: 2000); 0 turns it off.
        fisher_samples: clean source inputs for the Fisher (paper: 2000; the export keeps
            `export_sample` of them).
        prob_momentum: the running mean's update (code: 0.9 old + 0.1 new).
    """

    def __init__(self, *, e_margin: float = 0.4, d_margin: float = 0.05,
                 fisher_alpha: float = 2000.0, fisher_samples: int = 2000,
                 prob_momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.e0 = e_margin * math.log(self.n_classes)
        self.d_margin, self.fisher_alpha, self.prob_momentum = d_margin, fisher_alpha, \
            prob_momentum
        self.register_buffer("mean_probs", torch.zeros(self.n_classes))
        self.register_buffer("has_mean", torch.zeros((), dtype=torch.bool))
        params = dict(self.model.named_parameters())
        fisher = self._fisher(fisher_samples) if fisher_alpha > 0 else {}
        self._fisher_names = sorted(fisher)
        for i, name in enumerate(self._fisher_names):
            self.register_buffer(f"fisher_{i}", fisher[name])
            self.register_buffer(f"anchor_{i}", params[name].detach().clone())

    def _fisher(self, n: int) -> dict[str, torch.Tensor]:
        sample = self.source_info.get("sample")
        if sample is None or len(sample) == 0:
            raise ValueError("EATA: the Fisher penalty needs clean source inputs, and source "
                             f"{self.source_info['path']!r} holds none; set fisher_alpha: 0 "
                             "(EATA without anti-forgetting) or export the source with "
                             "export_sample > 0")
        x = sample[:n].float()
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}
        chunks = x.split(self.batch_size)
        for xb in chunks:  # the paper's code: CE against the model's own predictions
            logits = self.model(xb)
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, list(params.values()))
            for k, g in zip(params, grads):
                fisher[k] += g.detach() ** 2 / len(chunks)
        return fisher

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the reliable and non-redundant samples, and their entropies."""
        ent = entropy(logits)
        reliable = ent < self.e0
        probs = logits.softmax(1).detach()
        keep = reliable.clone()
        if bool(self.has_mean):
            cos = F.cosine_similarity(self.mean_probs[None], probs, dim=1)
            keep &= cos.abs() < self.d_margin
        idx = keep.nonzero().flatten()
        self._update_mean(probs[idx])
        return idx, ent[idx]

    def _update_mean(self, probs: torch.Tensor) -> None:
        if len(probs) == 0:
            return
        new = probs.mean(0)
        m = self.prob_momentum
        self.mean_probs.copy_(torch.where(self.has_mean, m * self.mean_probs + (1 - m) * new,
                                          new))
        self.has_mean.fill_(True)

    def adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        idx, ent = self.select(logits)
        weight = torch.exp(-(ent.detach() - self.e0))
        loss = (ent * weight).mean() if len(idx) else logits.sum() * 0.0
        if self._fisher_names:
            params = dict(self.model.named_parameters())
            loss = loss + self.fisher_alpha * sum(
                (getattr(self, f"fisher_{i}") * (params[n] - getattr(self, f"anchor_{i}")) ** 2
                 ).sum() for i, n in enumerate(self._fisher_names))
        if len(idx):  # the paper's code steps only when some sample was selected
            self.update(self.optimizers(), loss, n=len(x))
        return logits.detach(), loss.detach()

    def reset_method_state(self) -> None:
        self.mean_probs.zero_()
        self.has_mean.fill_(False)


class SAR(TENT):
    """SAR (Niu et al. 2023): entropy of reliable samples (entropy < `e_margin` ln C), minimised
    with a sharpness-aware step (SAM, radius `rho`) that drops samples unreliable after the
    climb; when the moving average (0.9) of that loss falls below `reset_constant` the model
    has collapsed and is restored to the source ("model recovery").
    Defaults: the paper's e_margin 0.4, rho 0.05, e_m 0.2, SGD momentum 0.9, lr 2.5e-4 (its
    batch-64 ImageNet setting)."""

    def __init__(self, *, e_margin: float = 0.4, rho: float = 0.05,
                 reset_constant: float = 0.2, optimizer: str = "sgd", lr: float = 2.5e-4,
                 **kwargs: Any) -> None:
        super().__init__(optimizer=optimizer, lr=lr, **kwargs)
        self.save_hyperparameters()
        self.e0 = e_margin * math.log(self.n_classes)
        self.rho, self.reset_constant = rho, reset_constant
        self.ema: float | None = None
        self.recoveries: list[int] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        base = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if self.optimizer_name not in base:
            raise ValueError(f"optimizer: unknown {self.optimizer_name!r}; choose one of "
                             f"{tuple(base)}")
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return SAM(self.params_to_adapt(), base[self.optimizer_name], rho=self.rho, **kwargs)

    def adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opt = self.optimizers()
        sam = getattr(opt, "optimizer", opt)
        logits = self.model(x)
        ent = entropy(logits)
        keep = ent < self.e0
        sam.zero_grad(set_to_none=True)
        if bool(keep.any()):
            ent[keep].mean().backward()
            sam.first_step()
        ent2 = entropy(self.model(x))[keep]
        ent2 = ent2[ent2 < self.e0]
        loss = ent2.mean() if len(ent2) else ent2.sum()
        if len(ent2):
            value = float(loss.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        self.update(opt, loss, n=len(x))  # back from the climb, then the base step
        if self.ema is not None and self.ema < self.reset_constant:
            self.recoveries.append(self.batch_position)
            self.restore_source()
        return logits.detach(), loss.detach()

    def reset_method_state(self) -> None:
        self.ema = None

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "ema": self.ema, "recoveries": self.recoveries}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.ema = state.get("ema")
        self.recoveries = list(state.get("recoveries", []))


def cotta_augmentations(input_shape: tuple[int, ...], hflip: bool = True) -> nn.Module:
    """CoTTA's test-time augmentations (its `get_tta_transforms`, CIFAR constants) from
    torchvision: colour jitter (RGB only), affine (±8°, translate 1/16, scale 0.95-1.05),
    Gaussian blur, horizontal flip, Gaussian noise (std 0.005), clipped to [0, 1]. One draw
    per call applies to the whole batch, as in CoTTA."""
    from torchvision.transforms import v2

    c, h, _ = input_shape
    steps: list[nn.Module] = []
    if c == 3:
        steps.append(v2.ColorJitter(brightness=(0.6, 1.4), contrast=(0.7, 1.3),
                                    saturation=(0.5, 1.5), hue=(-0.06, 0.06)))
    steps += [
        v2.Pad(h // 2, padding_mode="edge"),
        v2.RandomAffine(degrees=8, translate=(1 / 16, 1 / 16), scale=(0.95, 1.05),
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.GaussianBlur(kernel_size=5, sigma=(0.001, 0.25)),
        v2.CenterCrop(h),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps.append(v2.GaussianNoise(mean=0.0, sigma=0.005, clip=True))
    return v2.Compose(steps)


class CoTTA(TTALearner):
    """CoTTA (Wang et al. 2022): a student adapts all its weights to the pseudo-labels of an
    exponential-moving-average teacher (`teacher_momentum` 0.999); when the source model's mean
    confidence on the batch is below `confidence_threshold` (0.92 for CIFAR-10), the teacher's
    prediction is averaged over `n_augmentations` (32) augmented copies; after each step every
    weight is restored to its source value with probability `restore_prob` (0.01). The
    prediction is the teacher's. Defaults: Adam, lr 1e-3 (CIFAR-10).

    Args:
        hflip: include horizontal flips in the augmentations (CIFAR: yes; digits: no, a flip
            changes what a digit is).
    """

    def __init__(self, *, teacher_momentum: float = 0.999, confidence_threshold: float = 0.92,
                 n_augmentations: int = 32, restore_prob: float = 0.01, hflip: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.teacher_momentum, self.confidence_threshold = teacher_momentum, confidence_threshold
        self.n_augmentations, self.restore_prob = n_augmentations, restore_prob
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)
        self.augment = cotta_augmentations(self.input_shape, hflip)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        use_test_statistics(model)  # CoTTA's configure_model: batch statistics, all weights
        return model.requires_grad_(True)

    def params_to_adapt(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    @torch.no_grad()
    def pseudo_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, augmentation-averaged when the source model is unsure."""
        if float(self.anchor(x).softmax(1).amax(1).mean()) >= self.confidence_threshold:
            return self.teacher(x)
        seed = int(torch.randint(2**62, (1,), generator=self.step_generator(1)))
        with seeded(seed, cuda=x.is_cuda):  # GaussianNoise draws on x's device
            outs = [self.teacher(self.augment(x)) for _ in range(self.n_augmentations)]
        return torch.stack(outs).mean(0)

    def adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = self.model(x)
        target = self.pseudo_labels(x)
        loss = -(target.softmax(1) * student.log_softmax(1)).sum(1).mean()
        self.update(self.optimizers(), loss, n=len(x))
        self.update_teacher()
        self.stochastic_restore()
        return target.detach(), loss.detach()

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher = m * teacher + (1 - m) * student, parameter by parameter."""
        m = self.teacher_momentum
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(m).add_(s, alpha=1 - m)

    @torch.no_grad()
    def stochastic_restore(self) -> None:
        """Each student weight returns to its source value with probability `restore_prob`."""
        g = self.step_generator(2)
        for p, p0 in zip(self.model.parameters(), self.anchor.parameters()):
            mask = torch.rand(p.shape, generator=g).to(p.device) < self.restore_prob
            p.copy_(torch.where(mask, p0, p))

    def reset_method_state(self) -> None:
        self.teacher.load_state_dict(self._source_state)


def laplacian_optimization(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                           max_steps: int = 100) -> torch.Tensor:
    """LAME's fixed point: Y = softmax(-unary + lambda * W Y), iterated until the energy
    E(Y) = sum(unary * Y - lambda * (W Y) * Y + Y log Y) changes by <= 1e-8 relatively."""
    y = (-unary).softmax(-1)
    old = math.inf
    for i in range(max_steps):
        pairwise = bound_lambda * kernel @ y
        y = (-unary + pairwise).softmax(-1)
        energy = float((unary * y - bound_lambda * pairwise * y
                        + y * y.clamp_min(1e-20).log()).sum())
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


def knn_affinity(feats: torch.Tensor, knn: int) -> torch.Tensor:
    """W[i, j] = 1 when j is one of i's `knn` nearest neighbours (itself excluded)."""
    n = len(feats)
    dist = torch.cdist(feats, feats)
    idx = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[:, 1:]
    return torch.zeros(n, n, device=feats.device).scatter_(1, idx, 1.0)


def rbf_affinity(feats: torch.Tensor, knn: int, sigma: float | None = None) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2); sigma the mean distance to the `knn`-th neighbour unless given."""
    dist = torch.cdist(feats, feats)
    if sigma is None:
        sigma = float(dist.topk(min(knn, len(feats)), dim=-1, largest=False).values[:, -1]
                      .mean())
    return torch.exp(-dist**2 / (2 * sigma**2))


class LAME(TTALearner):
    """LAME (Boudiaf et al. 2022): no weight changes; the batch's class assignment Y maximises
    the source model's likelihood plus a Laplacian term that pulls samples with similar
    (L2-normalised penultimate) features to the same class, by the bounded fixed point
    `laplacian_optimization`. Defaults: kNN affinity, k 5, lambda 1 (the paper's)."""

    adapts = False

    def __init__(self, *, affinity: str = "knn", knn: int = 5, sigma: float | None = None,
                 bound_lambda: float = 1.0, max_steps: int = 100, **kwargs: Any) -> None:
        if affinity not in ("knn", "rbf"):
            raise ValueError(f"affinity: {affinity!r} is not 'knn' or 'rbf'")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.affinity, self.knn, self.sigma = affinity, knn, sigma
        self.bound_lambda, self.max_steps = bound_lambda, max_steps
        heads = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise ValueError(f"LAME: backbone {self.backbone!r} has no linear classifier "
                             "head to read features before")
        self._feats: list[torch.Tensor] = []
        heads[-1].register_forward_pre_hook(lambda _m, args: self._feats.append(args[0]))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        use_test_statistics(model, alpha=0.0)  # the source model as trained
        return model.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._feats.clear()
        logits = self.model(x)
        feats = F.normalize(self._feats.pop().flatten(1), dim=-1)
        unary = -logits.log_softmax(-1)
        if self.affinity == "knn":
            w = knn_affinity(feats, self.knn)
        else:
            w = rbf_affinity(feats, self.knn, self.sigma)
        w = 0.5 * (w + w.t())
        y = laplacian_optimization(unary, w, self.bound_lambda, self.max_steps)
        return y.clamp_min(1e-20).log()
