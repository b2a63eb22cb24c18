"""StreamAdapter on any Hugging Face causal LM (the `llm` extra: `transformers`).

`AdaptedHF` is `AdaptedLM` (`stream_adapter_nn.py`) on a frozen `AutoModelForCausalLM` loaded
from a local folder:

- **Context mapping** reads the model's own per-layer key/value cache. Keys are read *after*
  the rotary rotation (the cache holds rotated keys; every encoding block starts at position
  0, so a chunk's rotation depends only on its place in its block, as TinyGPT's learned
  positions do). Grouped-query attention: the mapper has one query set per *key/value* head
  (`num_key_value_heads`), so the state is `M = H_kv·M_h` slots of width `head_dim`.
- **Absorption** targets the decoder layers' linears by name (relative to the layer:
  `v_proj`, `o_proj`, `up_proj`, `down_proj` for Llama/Qwen/Mistral; `attn.c_proj`,
  `mlp.c_fc`, `mlp.c_proj` for GPT-2, whose `Conv1D` stores its weight transposed), or `all`.
- The base is frozen (`requires_grad=False`, `eval()`); only mappers and absorptions train.

`HFStreamAdapter` meta-trains it (Stage B) on episodes of local JSONL text tasks
(`adaptlab.hf_text.TextEpisodeDataModule`), with option log-likelihood scoring, reports
StreamAdapter, ICL and zero-shot accuracy on seen and unseen tasks, and exports the adapter
with the content hash of the base's files. `HFTestTimeStreamAdapter` loads that export
(`load_hf_adapter`, the hash checked) and runs StreamAdapter's test-time loop
(`TestThenAbsorb`, shared with TinyGPT's learner) on a stream of text tasks
(`adaptlab.hf_text.TextStream`).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.hf_text import (
    DEFAULT_TEMPLATE,
    TextEpisode,
    TextEpisodeDataModule,
    accuracy,
    option_scores,
    pad_rows,
    unpack_rows,
)
from adaptlab.jsonio import metrics_document, write_json_atomic
from adaptlab.learner import warmup_cosine
from adaptlab.models import KV
from adaptlab.seeding import seeded

from .icl_families import read_export, save_atomic
from .stream_adapter import AdaptedCoreLearner, TestThenAbsorb
from .stream_adapter_nn import (
    AdaptedLM,
    check_base_hash,
    last_layers,
    linear_dims,
    load_adapter_weights,
)

DEFAULT_HF_TARGETS = ("v_proj", "o_proj", "up_proj", "down_proj",
                      "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
HF_ADAPTER_FORMAT = "adaptlab.stream_adapter_hf/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: str = "float32") -> nn.Module:
    """A causal LM from a local folder (`from_pretrained(path)`, no download), frozen."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_path: no folder {path!r} (save_pretrained output)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {tuple(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 dtype=DTYPES[dtype])
    return model.requires_grad_(False).eval()


MODEL_FILES = ("*.safetensors", "*.bin", "tokenizer.json", "tokenizer.model", "vocab.json",
               "merges.txt")
"""What `model_sha256` hashes in a model folder: the weights and the vocabulary."""


def model_sha256(path: str) -> str:
    """A content hash of a local model folder: sha256 over the names and contents of its
    weight and vocabulary files (`MODEL_FILES`), whatever dtype the model is later loaded in.
    What an adapter export records to refuse another base."""
    files = sorted({os.path.basename(f) for pat in MODEL_FILES
                    for f in glob.glob(os.path.join(glob.escape(path), pat))})
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise FileNotFoundError(f"model_path: no weight files (*.safetensors, *.bin) in {path!r}")
    digest = hashlib.sha256()
    for name in files:
        with open(os.path.join(path, name), "rb") as f:
            digest.update(f"{name}:{hashlib.file_digest(f, 'sha256').hexdigest()}".encode())
    return digest.hexdigest()


def kv_layers(cache: Any) -> list[KV]:
    """Per-layer (K, V) (B, H_kv, T, d_h) of a transformers cache, any version: `layers[i]`
    (transformers ≥ 4.54), `key_cache`/`value_cache` (older `DynamicCache`) or tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def to_cache(kvs: list[KV] | None) -> Any:
    """A `DynamicCache` holding `kvs` (None: an empty one)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kvs or []):
        cache.update(k, v, i)
    return cache


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the `nn.ModuleList` of `num_hidden_layers` blocks."""
    n = model.config.num_hidden_layers
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")


def _is_linear(mod: nn.Module) -> bool:
    try:
        linear_dims(mod)
    except ValueError:
        return False
    return True


def resolve_hf_targets(
    layers: nn.ModuleList, layer_ids: Sequence[int], targets: str | Sequence[str]
) -> list[tuple[str, int, nn.Module, None]]:
    """`(key, layer, linear, None)` per adapted layer and target name.

    A name matches a linear of the layer whose relative name is it or ends with `.name`;
    `all` takes every linear. Names of the default list that a family lacks are skipped;
    a name given explicitly must match in every adapted layer.
    """
    explicit = targets != DEFAULT_HF_TARGETS and list(targets) != list(DEFAULT_HF_TARGETS)
    names = [targets] if isinstance(targets, str) else list(targets)
    found: list[tuple[str, int, nn.Module, None]] = []
    for i in layer_ids:
        linears = {n: m for n, m in layers[i].named_modules() if n and _is_linear(m)}
        for name in names:
            hits = sorted(linears) if name == "all" else [
                n for n in linears if n == name or n.endswith("." + name)]
            if len(hits) > 1 and name != "all":
                raise ValueError(f"targets: {name!r} is ambiguous in layer {i}: {hits}; "
                                 "use the longer name")
            if not hits and explicit:
                raise ValueError(f"targets: unknown {name!r} in layer {i}; its linears are "
                                 f"{sorted(linears)} (or 'all')")
            for n in hits:
                key = f"{i}_{n.replace('.', '_')}"
                if all(key != f[0] for f in found):
                    found.append((key, i, linears[n], None))
    if not found:
        raise ValueError(f"targets: none of {names} is a linear of the decoder layers")
    return found


class AdaptedHF(AdaptedLM):
    """`AdaptedLM` on a frozen Hugging Face causal LM (see the module docstring).

    Args:
        base: an `AutoModelForCausalLM` (frozen here).
        n_slots: `M_h`, queries per key/value head.
        chunk_size: `C`, tokens per chunk; must divide `block_size`.
        block_size: `B_enc`, tokens per encoding block (default: min(n_positions, 512)).
        targets: linear names relative to a decoder layer, or `all`.
        layers: `all`, or an int `n` for the last `n` layers.
        gate, recurrence, gate_bias: see `ContextMapper`.
    """

    def __init__(
        self, base: nn.Module, n_slots: int = 4, chunk_size: int = 16,
        block_size: int | None = None, targets: str | Sequence[str] = DEFAULT_HF_TARGETS,
        layers: str | int = "all", gate: str = "vector", recurrence: str = "ema",
        gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        cfg = base.config
        n_pos = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        block_size = min(n_pos, 512) if block_size is None else int(block_size)
        if block_size > n_pos:
            raise ValueError(f"block_size {block_size} exceeds the model's {n_pos} positions")
        blocks = decoder_layers(base)
        layer_ids = last_layers(layers, len(blocks))
        n_head = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        found = resolve_hf_targets(blocks, layer_ids, targets)
        self.targets = [key.split("_", 1)[1] for key, *_ in found]
        self._build_adapter(base, layer_ids, n_kv, head_dim, found, n_slots, chunk_size,
                            block_size, gate, recurrence, gate_bias)
        self.max_positions = n_pos

    def _encode(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor],
                past: list[KV] | None) -> list[KV]:
        out = self.base(input_ids=tokens, past_key_values=to_cache(past), use_cache=True)
        return kv_layers(out.past_key_values)

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               per_context: int = 1) -> torch.Tensor:
        """Logits (N, T, V) of queries at positions from 0, no context in the window: merged
        weights if committed, else side branches (row `i` reads context `i // per_context`)."""
        with self.side_branches(per_context):
            return self.base(input_ids=ids, attention_mask=attention_mask,
                             use_cache=False).logits

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.logits(ids, attention_mask)


def build_adapted_hf(base: nn.Module, adapter_args: dict[str, Any], seed: int) -> AdaptedHF:
    """`AdaptedHF` on `base` with its adapter initialised from `seed` and kept in float32
    (whatever the base's dtype)."""
    with seeded(seed):
        core = AdaptedHF(base, **adapter_args)
    core.mappers.float()
    core.absorptions.float()
    return core


def load_hf_adapter(path: str, model_path: str | None = None, dtype: str | None = None
                    ) -> tuple[AdaptedHF, dict[str, Any]]:
    """An `HFStreamAdapter` export on its base: the `AdaptedHF` (base frozen) and the record.

    The base is read from `model_path` (default: the folder recorded at export) in `dtype`
    (default: Stage B's); the content hash of its files must equal the one recorded.
    """
    rec = read_export(path, "adapter", HF_ADAPTER_FORMAT, "no Stage B export",
                      "; run HFStreamAdapter with export: … first")
    folder = model_path or rec["model_path"]
    if "base_sha256" not in rec:
        raise ValueError(f"adapter: {path!r} records no base hash (exported before hashes "
                         "were kept); re-run Stage B")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model_path: no folder {folder!r} (the adapter's base)")
    check_base_hash(rec["base_sha256"], model_sha256(folder), folder)
    core = build_adapted_hf(load_causal_lm(folder, dtype or rec.get("dtype", "float32")),
                            rec["adapter_args"], int(rec.get("seed", 0)))
    load_adapter_weights(core, rec, path)
    return core, rec


class HFStreamAdapter(AdaptedCoreLearner):
    """StreamAdapter's Stage B on a Hugging Face causal LM and local JSONL text tasks.

    Per batch (episodes of the seen tasks, one k per batch) the frozen LM prefills each
    context in blocks, the mappers fold its cache into the state, and every query option runs
    alone from position 0 through the side branches; the loss is the cross-entropy of the
    right option over the options' summed log-likelihoods. At the end: accuracy of
    StreamAdapter, ICL (demos in the window, where they fit) and zero-shot per evaluation task
    and k in `metrics.json`, and the adapter exported (`export:`).

    Args:
        model_path: the local model folder (`save_pretrained` output).
        dtype: the base's weights (`float32`, `bfloat16`, `float16`); the adapter is float32.
        n_slots, chunk_size, block_size, targets, layers, gate, recurrence, gate_bias:
            `AdaptedHF`.
        lr, betas, weight_decay, warmup_steps, clip: AdamW, warm-up then cosine to 0.
        eval_ks, eval_episodes, eval_seed: the final evaluation (k = 0 is zero-shot).
        export: where the trained adapter goes.
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    def __init__(
        self, *, model_path: str, dtype: str = "float32", n_slots: int = 4,
        chunk_size: int = 16, block_size: int | None = None,
        targets: str | Sequence[str] = DEFAULT_HF_TARGETS, layers: str | int = "all",
        gate: str = "vector", recurrence: str = "ema", gate_bias: float = 2.0,
        lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.98), weight_decay: float = 0.01,
        warmup_steps: int = 20, clip: float | None = 1.0,
        eval_ks: Sequence[int] = (0, 1, 4, 16), eval_episodes: int = 16, eval_seed: int = 4321,
        export: str | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.model_path, self.dtype_name = model_path, dtype
        base = load_causal_lm(model_path, dtype)
        self.adapter_args = {"n_slots": n_slots, "chunk_size": chunk_size,
                             "block_size": block_size, "targets": targets if isinstance(
                                 targets, str) else list(targets), "layers": layers,
                             "gate": gate, "recurrence": recurrence, "gate_bias": gate_bias}
        self.core = build_adapted_hf(base, self.adapter_args, self.seed)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.clip = warmup_steps, clip
        self.eval_ks = sorted({int(k) for k in eval_ks})
        self.eval_episodes, self.eval_seed, self.export = eval_episodes, eval_seed, export
        self.results: dict[str, Any] = {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.core.adapter_parameters()
        return torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas)

    @property
    def pad(self) -> int:
        return self.trainer.datamodule.pad

    def adapted_scores(self, episodes: Sequence[TextEpisode], pad: int) -> torch.Tensor:
        """Absorb each episode's context (one state per episode) and score its queries'
        options with no context in the window: (B, q, n_opt)."""
        self.core.reset_state(len(episodes))
        if any(ep.context for ep in episodes):
            ids, mask = pad_rows([ep.context for ep in episodes], pad)
            self.core.absorb(ids.to(self.device), mask.to(self.device))
        n_opt = max(len(o) for ep in episodes for o in ep.options)
        per = len(episodes[0].prompts) * n_opt
        return option_scores(lambda i, m: self.core.logits(i, m, per_context=per), episodes,
                             pad, with_context=False, device=self.device)

    def icl_scores(self, episodes: Sequence[TextEpisode], pad: int) -> torch.Tensor:
        """The frozen base with the demos in its window before each prompt: (B, q, n_opt)."""
        self.core.uncommit()
        return option_scores(lambda i, m: self.core.base(input_ids=i, attention_mask=m,
                                                          use_cache=False).logits,
                             episodes, pad, with_context=True, device=self.device)

    def episode_loss(self, episodes: Sequence[TextEpisode], pad: int) -> torch.Tensor:
        scores = self.adapted_scores(episodes, pad)
        answers = torch.tensor([ep.answers for ep in episodes], device=scores.device)
        return F.cross_entropy(scores.flatten(0, 1), answers.flatten())

    def training_step(self, batch: list[TextEpisode], batch_idx: int) -> None:
        opt = self.optimizers()
        factor = warmup_cosine(self.update_steps, self.warmup_steps, self.trainer.max_steps)
        for g in opt.optimizer.param_groups:
            g["lr"] = self.lr * factor
        loss = self.episode_loss(batch, self.pad)
        self._check_finite(loss.detach()[None])
        self.update(opt, loss, clip=self.clip)
        self.samples_seen += len(batch)
        self.core.reset_state(1)
        if self.logger is not None and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.logger.log_metrics({"train/loss": float(loss.detach()),
                                     "train/lr": self.lr * factor}, step=self.update_steps)

    @torch.no_grad()
    def evaluate(self, dm: Any) -> dict[str, dict[str, dict[int, float]]]:
        """Accuracy per method, task and k on fixed episodes (ICL only where the longest
        sequence fits the model's positions)."""
        was = self.training
        self.eval()
        out: dict[str, dict[str, dict[int, float]]] = {"StreamAdapter": {}, "ICL": {}}
        try:
            for task in dm.eval_tasks:
                for method in out:
                    out[method][task] = {}
                for k in self.eval_ks:
                    eps = dm.eval_episodes(task, k, self.eval_episodes, self.eval_seed)
                    acc = accuracy(self.adapted_scores(eps, dm.pad), eps)
                    out["StreamAdapter"][task][k] = float(acc.mean())
                    longest = max(len(ep.context) + len(p) + max(map(len, o))
                                  for ep in eps for p, o in zip(ep.prompts, ep.options))
                    if longest <= self.core.max_positions:
                        acc = accuracy(self.icl_scores(eps, dm.pad), eps)
                        out["ICL"][task][k] = float(acc.mean())
        finally:
            self.core.reset_state(1)
            self.train(was)
        return out

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        self.results = self.evaluate(dm)
        if self.trainer.is_global_zero and self.trainer.log_dir:
            os.makedirs(self.trainer.log_dir, exist_ok=True)
            n_params = sum(p.numel() for p in self.core.adapter_parameters())
            write_json_atomic(os.path.join(self.trainer.log_dir, "metrics.json"),
                              metrics_document(
                "completed", final={"adapter_params": n_params,
                                    "update_steps": self.update_steps},
                stage_b={"accuracy": self.results, "seen": dm.tasks,
                         "eval_tasks": dm.eval_tasks, "steps": self.update_steps,
                         "adapter_params": n_params, "state_nbytes": self.core.state_nbytes,
                         "model_path": os.path.abspath(self.model_path)}))
        if self.export:
            save_atomic(self.adapter_record(dm), self.export)

    def adapter_record(self, dm: TextEpisodeDataModule) -> dict[str, Any]:
        """The Stage B export: adapter weights and settings, the base's folder, the content
        hash of its files and the dtype it ran in, and the prompt template."""
        state = {k: v.detach().cpu() for k, v in self.core.state_dict().items()
                 if not k.startswith("base.")}
        return {"format": HF_ADAPTER_FORMAT, "adapter_args": self.adapter_args,
                "state_dict": state, "model_path": os.path.abspath(self.model_path),
                "base_sha256": model_sha256(self.model_path), "dtype": self.dtype_name,
                "template": dm.fmt.prefix + "{output}" + dm.fmt.suffix,
                "tasks": list(dm.tasks), "steps": self.update_steps, "seed": self.seed}

    def extra_state(self) -> dict[str, Any]:
        return {"results": self.results}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.results = dict(state.get("results", {}))


BASE_PREFIX = "core.base."
"""The frozen base's keys in the learner's state dict: left out of checkpoints (the base is
reloaded from its folder, its hash checked), so a checkpoint holds the adapter and state."""


class HFTestTimeStreamAdapter(TestThenAbsorb):
    """StreamAdapter at test time on a Hugging Face causal LM and a stream of text tasks.

    `observe(x, y)` scores each example's options from the absorbed state (no context in the
    window: the prompt and each option from position 0, through the side branches), then
    absorbs the batch's demonstrations (each example's template filled with its answer) in
    order; the loop and the resets are `TestThenAbsorb`'s, as TinyGPT's learner has them.
    Samples are `adaptlab.hf_text.TextStream` rows (packed token ids), `y` the answer option.

    Args:
        adapter: the `HFStreamAdapter` export (adapter weights and settings, the base's folder
            and the content hash of its files, checked).
        model_path: the base's folder (default: the one recorded in the export).
        dtype: the base's weights (default: Stage B's dtype); the adapter is float32.
        reset_on: `detected` (a core `ShiftDetector` on the pre-absorb loss, seeded with the
            chance loss ln n_options), `none` (the gate forgets) or `segment` (oracle resets
            by `SegmentReset`, an upper bound only).
        detector: `ShiftDetector` options.
        log_norms_every: observe steps between ‖S‖ and ‖ΔW‖/‖W‖ logs (0: never).
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    def __init__(
        self, *, adapter: str, model_path: str | None = None, dtype: str | None = None,
        reset_on: str = "detected", detector: dict[str, Any] | None = None,
        log_norms_every: int = 50, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.check_reset_on(reset_on)
        if len(self.input_shape) != 1:
            raise ValueError(f"data: samples of shape {self.input_shape} are not packed text "
                             "examples; use an adaptlab.hf_text.TextStream")
        self.core, rec = load_hf_adapter(adapter, model_path, dtype)
        self.adapter_args = dict(rec["adapter_args"])
        self.model_path = model_path or rec["model_path"]
        self.base_sha256 = rec["base_sha256"]
        self.template = rec.get("template", DEFAULT_TEMPLATE)
        pad = self.core.base.config.pad_token_id
        self.pad = int(pad) if pad is not None else 0  # right padding: never attended
        self._init_stream(reset_on, detector, log_norms_every)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.host_trainer is not None else None
        stream = getattr(dm, "stream", None)
        if stream is None:
            raise ValueError("HFTestTimeStreamAdapter: data must be a stream of text tasks "
                             "(data.stream: adaptlab.hf_text.TextStream)")
        vocab = self.core.base.get_input_embeddings().num_embeddings
        if int(stream.x.max()) >= vocab:
            raise ValueError(f"data.stream: token ids up to {int(stream.x.max())}, the model "
                             f"has {vocab}; tokenise with the model's own folder "
                             "(data.stream.init_args.model_path)")
        template = (stream.params or {}).get("template")
        if template is not None and template != self.template:
            warnings.warn(f"data.stream.template {template!r} is not Stage B's "
                          f"{self.template!r}: the adapter meets prompts it was not trained "
                          "on", stacklevel=2)
        self._check_segment_callback()

    @property
    def chance_loss(self) -> float:
        """ln n_options: the loss of a uniform guess over the options."""
        return math.log(self.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Option log-likelihoods (B, n_classes) of packed examples from the current state,
        no context in the window; −inf for options an example lacks."""
        rows = unpack_rows(x)
        ep = TextEpisode("", [], [r.prompt for r in rows], [r.options for r in rows],
                         [0] * len(rows))
        scores = option_scores(self.core.logits, [ep], self.pad, with_context=False,
                               device=self.device)[0]
        out = scores.new_full((len(rows), self.n_classes), -math.inf)
        out[:, :scores.shape[1]] = scores
        return out

    def stream_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the answer over the options' log-likelihoods (Stage B's loss)."""
        return F.cross_entropy(logits, y)

    def absorb_examples(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Absorb each example's demonstration (its answer's filled template), in order, as
        one span of the context stream."""
        ids = [t for r, a in zip(unpack_rows(x), y.tolist()) for t in r.demos[int(a)]]
        self.core.absorb(torch.tensor([ids], dtype=torch.long, device=self.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict") or {}
        for key in [k for k in state if k.startswith(BASE_PREFIX)]:
            del state[key]
        checkpoint["adaptlab_learner"]["base_sha256"] = self.base_sha256

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("adaptlab_learner") or {}).get("base_sha256")
        if saved is not None and saved != self.base_sha256:
            raise ValueError(f"checkpoint: written on base {saved[:12]}…, this run's is "
                             f"{self.base_sha256[:12]}…; resume with the same model")
        super().on_load_checkpoint(checkpoint)
        if "state_dict" in checkpoint:  # the base is not in checkpoints: this run's own
            checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items()
                                             if k.startswith(BASE_PREFIX)})
