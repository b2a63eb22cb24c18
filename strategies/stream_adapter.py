"""StreamAdapter: context mapping, weight absorption, the streaming API and the learner.

StreamAdapter (Muhtar, Shen et al., 2024) turns streamed demonstrations into a temporary
low-rank update of a frozen causal transformer, so queries run with no context in the window
(spec `stream_adapter.md` §1–§3, §5, §6):

- `ContextMapper` (§2): one layer's prefill (K, V), cut into chunks, is read by learnable
  multi-head queries and folded by a gated recurrence into a fixed-size state `(S, n)`.
- `WeightAbsorption` (§3): `W' = W + s·W1·hᵀ·W2` on one target linear, as a per-sample side
  branch (training) or merged into the weight (inference); `W1 = 0` at init, so the adapted
  model starts as the base.
- `AdaptedGPT` (§6): a frozen `TinyGPT`, one mapper per adapted layer and the absorptions,
  with `reset_state` / `absorb` / `commit` / `uncommit` / `forward` / `stream_state`.
- `StreamAdapter` (§5, §6): the LightningModule — Stage B meta-training on episodes
  (`mode: meta_train`) and test-then-absorb over a context stream (`mode: stream`), resetting
  on a `ShiftDetector` firing, on oracle segment changes (`SegmentReset`) or never.

Stage A (the base learning in context) is `strategies/icl_families.py`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.detect import ShiftDetector
from adaptlab.episodes import EpisodeDataModule
from adaptlab.jsonio import metrics_document, write_json_atomic
from adaptlab.learner import StreamLearner
from adaptlab.models import KV, TinyGPT
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

GATES = ("vector", "scalar", "fixed")
RECURRENCES = ("ema", "additive")
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "out": ("o", "fc2"),
    "mlp": ("fc1", "fc2"),
    "all": ("q", "k", "v", "o", "fc1", "fc2"),
}
TARGETS = TARGET_GROUPS["all"]
DEFAULT_TARGETS = ("v", "o", "fc1", "fc2")


class ContextMapper(nn.Module):
    """Maps one layer's KV chunks to a fixed-size state (spec §2).

    Learnable queries `Q (H, M_h, d_h)` cross-attend within a chunk,
    `O_i = softmax(Q·K_iᵀ/√d_h)·V_i`, so a chunk costs the same whatever came before; a gate
    `α_i = σ(w_g·O_i + b_g)` (per head and slot) blends chunks, `ema`:
    `S_i = α_i·S_{i−1} + (1−α_i)·O_i` (the first valid chunk sets `S = O_1`), or `additive`:
    `S_i = α_i·S_{i−1} + O_i`. The state `(S, n)`, `n` the count of valid chunks, has the same
    size at any stream length; a fully padded chunk leaves it unchanged.

    Args:
        n_head, d_head: the base layer's heads and head width (the shape of its K, V).
        n_slots: `M_h`, queries per head.
        gate: `vector` (`σ(w_g·O + b_g)`), `scalar` (`σ(b_g)`, learned), `fixed` (`σ(b_g)`).
        recurrence: `ema` (bounded state) or `additive` (the summaries' form; norm grows).
        gate_bias: initial `b_g` (+2 gives `α ≈ 0.88`, favouring the running state).
    """

    def __init__(
        self, n_head: int, d_head: int, n_slots: int = 4, gate: str = "vector",
        recurrence: str = "ema", gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate: unknown {gate!r}; choose one of {GATES}")
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence: unknown {recurrence!r}; choose one of {RECURRENCES}")
        if n_head < 1 or d_head < 1 or n_slots < 1:
            raise ValueError(
                f"ContextMapper: sizes must be >= 1, got {n_head}, {d_head}, {n_slots}"
            )
        self.n_head, self.d_head, self.n_slots = n_head, d_head, n_slots
        self.gate, self.recurrence = gate, recurrence
        self.queries = nn.Parameter(torch.randn(n_head, n_slots, d_head) / math.sqrt(d_head))
        b_g = torch.full((n_head,), float(gate_bias))
        if gate == "fixed":
            self.register_buffer("b_g", b_g)
        else:
            self.b_g = nn.Parameter(b_g)
        self.w_g = nn.Parameter(torch.zeros(n_head, d_head)) if gate == "vector" else None

    def empty_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`S = 0` of shape (B, H, M_h, d_h) and `n = 0` (B,): the state before any chunk."""
        dtype = dtype or self.queries.dtype
        device = device or self.queries.device
        s = torch.zeros(batch, self.n_head, self.n_slots, self.d_head, device=device, dtype=dtype)
        return s, torch.zeros(batch, dtype=torch.long, device=device)

    def summarize(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Intra-chunk cross-attention: `O` (B, H, M_h, d_h) and which chunks are valid (B,).

        `k`, `v`: (B, H, c, d_h); `mask` (B, c), True for real positions. Masked keys get −∞;
        a fully padded chunk gets `O = 0` and is marked invalid (no NaN enters the graph).
        """
        scores = torch.einsum("hmd,bhcd->bhmc", self.queries, k) / math.sqrt(self.d_head)
        if mask is None:
            valid = torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
        else:
            mask = mask.to(torch.bool)
            valid = mask.any(dim=-1)
            safe = mask | ~valid[:, None]  # all-masked rows would give NaN softmax
            scores = scores.masked_fill(~safe[:, None, None, :], float("-inf"))
        out = torch.einsum("bhmc,bhcd->bhmd", scores.softmax(dim=-1), v)
        return out * valid[:, None, None, None].to(out.dtype), valid

    def alpha(self, o: torch.Tensor) -> torch.Tensor:
        """The gate `α` (B, H, M_h, 1) for a chunk summary `o`."""
        logits = self.b_g[None, :, None].expand(o.shape[0], -1, o.shape[2])
        if self.w_g is not None:
            logits = logits + torch.einsum("bhmd,hd->bhm", o, self.w_g)
        return torch.sigmoid(logits)[..., None]

    def step(
        self, state: torch.Tensor, count: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold one chunk into `(S, n)`; invalid chunks (all padding) leave both unchanged."""
        o, valid = self.summarize(k, v, mask)
        a = self.alpha(o)
        if self.recurrence == "ema":
            new = a * state + (1 - a) * o
            new = torch.where((count == 0)[:, None, None, None], o, new)
        else:
            new = a * state + o
        new = torch.where(valid[:, None, None, None], new, state)
        return new, count + valid.long()

    def forward(
        self, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
        mask: torch.Tensor | None = None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold a whole (K, V) of (B, H, T, d_h) chunk by chunk; a short tail is one chunk."""
        s, n = state if state is not None else self.empty_state(k.shape[0], k.device, k.dtype)
        for lo in range(0, k.shape[2], chunk_size):
            hi = lo + chunk_size
            m = None if mask is None else mask[:, lo:hi]
            s, n = self.step(s, n, k[:, :, lo:hi], v[:, :, lo:hi], m)
        return s, n


def read_state(s: torch.Tensor, n: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`h = RMSNorm(concat_heads(S))` over `d_h`, no weight, (B, M, d_h); empty state → 0.

    The norm keeps `ΔW`'s scale independent of the chunk count (which matters for `additive`).
    """
    b, n_head, n_slots, d_head = s.shape
    h = s.reshape(b, n_head * n_slots, d_head)
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return h * (n > 0)[:, None, None].to(h.dtype)


class WeightAbsorption(nn.Module):
    """A low-rank, state-dependent update `ΔW = s·W1·hᵀ·W2` of one target linear (spec §3).

    `u = W2·x` scores the `M` state slots, `hᵀu` mixes them (a linear attention over the state)
    and `W1` writes out; `s = γ/√M`. During training it is a side branch added by a forward hook,
    so every sample of a batch may use its own context and no per-sample `ΔW` is built; at
    inference `merge` adds `ΔW` to the weight (rows `rows` only) and `unmerge` restores the
    saved original bitwise. `W1 = 0` at init: the adapted model starts exactly as the base.

    Args:
        linear: the base's `nn.Linear` (not registered here, so it stays the base's parameter).
        d_state: `d_h`, the width of a state slot.
        n_slots: `M`, the number of state slots (`H·M_h`).
        rows: the output rows this update owns (e.g. the `v` third of a fused `qkv`); all if None.
    """

    def __init__(
        self, linear: nn.Linear, d_state: int, n_slots: int, rows: slice | None = None
    ) -> None:
        super().__init__()
        self._linear = (linear,)  # a tuple: not a submodule, the base owns it
        self.rows = rows if rows is not None else slice(0, linear.out_features)
        d_in = linear.in_features
        d_out = len(range(linear.out_features)[self.rows])
        self.w2 = nn.Parameter(torch.randn(n_slots, d_in) / math.sqrt(d_in))
        self.w1 = nn.Parameter(torch.zeros(d_out, d_state))
        self.gamma = nn.Parameter(torch.ones(()))
        self.n_slots = n_slots
        self.h: torch.Tensor | None = None  # the state the side branch reads, (B, M, d_h)
        self._saved: torch.Tensor | None = None
        self._handle = linear.register_forward_hook(self._hook)

    @property
    def linear(self) -> nn.Linear:
        return self._linear[0]

    @property
    def merged(self) -> bool:
        return self._saved is not None

    def scale(self) -> torch.Tensor:
        return self.gamma / math.sqrt(self.n_slots)

    def side(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`s·((x·W2ᵀ)·h)·W1ᵀ`: (B, T, d_in), (B or 1, M, d_h) → (B, T, d_out)."""
        return self.scale() * ((x @ self.w2.T) @ h) @ self.w1.T

    def delta_weight(self, h: torch.Tensor) -> torch.Tensor:
        """`ΔW = s·W1·hᵀ·W2` (d_out, d_in) for one context's `h` (M, d_h)."""
        return self.scale() * (self.w1 @ h.T) @ self.w2

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.h is None or self.merged:
            return None
        side = self.side(inputs[0], self.h)
        start, stop, _ = self.rows.indices(output.shape[-1])
        return output + nn.functional.pad(side, (start, output.shape[-1] - stop))

    @torch.no_grad()
    def merge(self, h: torch.Tensor) -> None:
        """Add `ΔW` for `h` (M, d_h) into the weight, keeping an exact copy of its rows."""
        if self.merged:
            self.unmerge()
        weight = self.linear.weight
        self._saved = weight[self.rows].clone()
        weight[self.rows] += self.delta_weight(h).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the rows saved by `merge` bitwise; a no-op when not merged."""
        if self._saved is not None:
            self.linear.weight[self.rows] = self._saved
            self._saved = None

    def remove(self) -> None:
        """Unmerge and detach the hook: the base is left as it was found."""
        self.unmerge()
        self._handle.remove()


def _target_linear(block: nn.Module, name: str, d_model: int) -> tuple[nn.Linear, slice | None]:
    """Where TinyGPT's `_Block` keeps each target: q, k, v are thirds of the fused `qkv`."""
    if name in ("q", "k", "v"):
        i = "qkv".index(name)
        return block.qkv, slice(i * d_model, (i + 1) * d_model)
    return {"o": block.proj, "fc1": block.mlp[0], "fc2": block.mlp[2]}[name], None


def _resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    names = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for name in names:
        for t in TARGET_GROUPS.get(name, (name,)):
            if t not in TARGETS:
                raise ValueError(
                    f"targets: unknown {name!r}; choose from {TARGETS} or {sorted(TARGET_GROUPS)}"
                )
            if t not in out:
                out.append(t)
    if not out:
        raise ValueError("targets: at least one target linear is required")
    return tuple(out)


class AdaptedGPT(nn.Module):
    """A frozen `TinyGPT` whose target linears absorb a streamed context (spec §6).

    `absorb` encodes demos with the *unadapted* base in encoding blocks of `block_size`
    positions, each starting at position 0 (no attention across blocks), and feeds every full
    chunk of `chunk_size` positions to the layer's `ContextMapper`. Positions not yet filling a
    chunk wait with their KV; the *effective state* folds them in as a masked chunk without
    consuming them, so it depends only on the demo sequence, never on how it was split into
    calls. `forward` answers queries at positions from 0 with no context in the window, through
    the side branches (per-sample contexts) or, after `commit`, through merged weights.

    Args:
        base: the TinyGPT; frozen here (`requires_grad=False`, `eval()`).
        n_slots: `M_h`, queries per head (`M = H·M_h` slots per layer).
        chunk_size: `C`, positions per chunk; must divide `block_size`.
        block_size: `B_enc`, positions per encoding block (default: the base's `n_positions`).
        targets: names among `q k v o fc1 fc2`, or groups `attn out mlp all`.
        layers: `all`, or an int `n` for the last `n` layers.
        gate, recurrence, gate_bias: see `ContextMapper`.
    """

    def __init__(
        self, base: TinyGPT, n_slots: int = 4, chunk_size: int = 4, block_size: int | None = None,
        targets: str | Sequence[str] = DEFAULT_TARGETS, layers: str | int = "all",
        gate: str = "vector", recurrence: str = "ema", gate_bias: float = 2.0,
    ) -> None:
        super().__init__()
        block_size = base.n_positions if block_size is None else int(block_size)
        if chunk_size < 1 or block_size < 1 or block_size % chunk_size:
            raise ValueError(
                f"chunk_size {chunk_size} must be >= 1 and divide block_size {block_size}"
            )
        if block_size > base.n_positions:
            raise ValueError(
                f"block_size {block_size} exceeds the base's n_positions {base.n_positions}"
            )
        n_layer = len(base.blocks)
        if layers == "all":
            first = 0
        elif isinstance(layers, int) and 1 <= layers <= n_layer:
            first = n_layer - layers
        else:
            raise ValueError(f"layers: 'all' or an int in 1..{n_layer} (last n), got {layers!r}")
        self.base = base.requires_grad_(False).eval()
        self.chunk_size, self.block_size = int(chunk_size), block_size
        self.targets = _resolve_targets(targets)
        self.layer_ids = tuple(range(first, n_layer))
        n_head = base.blocks[0].n_head
        d_model = base.d_model
        d_head = d_model // n_head
        self.mappers = nn.ModuleDict({
            str(i): ContextMapper(n_head, d_head, n_slots, gate, recurrence, gate_bias)
            for i in self.layer_ids
        })
        self.absorptions = nn.ModuleDict()
        for i in self.layer_ids:
            for t in self.targets:
                linear, rows = _target_linear(base.blocks[i], t, d_model)
                self.absorptions[f"{i}_{t}"] = WeightAbsorption(
                    linear, d_head, n_head * n_slots, rows
                )
        self.reset_state()

    def train(self, mode: bool = True) -> AdaptedGPT:
        """Adapter modules follow `mode`; the frozen base stays in `eval()`."""
        super().train(mode)
        self.base.eval()
        return self

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What an optimiser should hold: mappers and absorptions, never the base."""
        return [*self.mappers.parameters(), *self.absorptions.parameters()]

    # ----- streaming state -------------------------------------------------------------------

    def reset_state(self, batch: int = 1) -> None:
        """Clear `S`, `n`, the pending positions and the encoder cache; uncommit."""
        self.uncommit()
        self.batch = int(batch)
        first = self.mappers[str(self.layer_ids[0])]
        states = [self.mappers[str(i)].empty_state(self.batch) for i in self.layer_ids]
        self._s = [s for s, _ in states]
        self._n = states[0][1]
        self._cache: list[KV] | None = None  # current encoding block's per-layer (K, V)
        self._cache_mask = torch.zeros(self.batch, 0, dtype=torch.bool, device=first.queries.device)
        self._consumed = 0  # positions of the current block already folded into S

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> AdaptedGPT:
        """`.to()`, `.cuda()`, `.half()` … also move the streaming state (plain tensors)."""
        super()._apply(fn, recurse)
        if hasattr(self, "_s"):
            self._s = [fn(s) for s in self._s]
            self._n = fn(self._n)
            self._cache_mask = fn(self._cache_mask)
            if self._cache is not None:
                self._cache = [(fn(k), fn(v)) for k, v in self._cache]
        return self

    @property
    def state_nbytes(self) -> int:
        """Bytes of the fast state `(S, n)`: fixed by the config, whatever the stream length."""
        return sum(s.numel() * s.element_size() for s in self._s) + (
            self._n.numel() * self._n.element_size()
        )

    @property
    def pending(self) -> int:
        """Positions encoded but not yet folded (they wait for their chunk to fill)."""
        return self._cache_mask.shape[1] - self._consumed

    def absorb(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, label_tokens: torch.Tensor | None = None,
    ) -> None:
        """Append a span of demos (B, T) to the stream; any split of a sequence is equivalent.

        Uncommits first: context is encoded by the unadapted base (`no_grad`). Gradients flow
        into the mappers if enabled (Stage B). `mask` (B, T) is True for real positions; padding
        must come after a context's last real position (the base has no attention mask).
        """
        if tokens.dim() != 2 or tokens.shape[0] != self.batch:
            raise ValueError(
                f"absorb: tokens must be (batch={self.batch}, T), got {tuple(tokens.shape)}; "
                "call reset_state(batch) for another batch size"
            )
        self.uncommit()
        if mask is None:
            mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        pos, total = 0, tokens.shape[1]
        while pos < total:
            room = self.block_size - self._cache_mask.shape[1]
            take = min(room, total - pos)
            piece_v = None if values is None else values[:, pos : pos + take]
            piece_l = None if label_tokens is None else label_tokens[:, pos : pos + take]
            with torch.no_grad():
                _, kvs = self.base.hidden(
                    tokens[:, pos : pos + take], label_tokens=piece_l, values=piece_v,
                    past_kv=self._cache,
                )
            self._cache = kvs
            self._cache_mask = torch.cat([self._cache_mask, mask[:, pos : pos + take].bool()], 1)
            pos += take
            self._fold_full_chunks()

    def _fold_full_chunks(self) -> None:
        c = self.chunk_size
        while self._cache is not None and self.pending >= c:
            lo, hi = self._consumed, self._consumed + c
            m = self._cache_mask[:, lo:hi]
            n_new = self._n
            for j, i in enumerate(self.layer_ids):
                k, v = self._cache[i]
                self._s[j], n_new = self.mappers[str(i)].step(
                    self._s[j], self._n, k[:, :, lo:hi], v[:, :, lo:hi], m
                )
            self._n = n_new
            self._consumed = hi
            if self._consumed == self.block_size:
                self._cache = None
                self._cache_mask = self._cache_mask[:, :0]
                self._consumed = 0

    def effective_state(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per adapted layer `S` and the count `n`, with pending positions folded in as a
        masked chunk (not consumed): what queries and `commit` read."""
        if self._cache is None or self.pending == 0:
            return list(self._s), self._n
        lo = self._consumed
        m = self._cache_mask[:, lo:]
        out, n_new = [], self._n
        for j, i in enumerate(self.layer_ids):
            k, v = self._cache[i]
            s, n_new = self.mappers[str(i)].step(self._s[j], self._n, k[:, :, lo:], v[:, :, lo:], m)
            out.append(s)
        return out, n_new

    def state_h(self) -> dict[int, torch.Tensor]:
        """`h` (B, M, d_h) per adapted layer, read from the effective state."""
        states, n = self.effective_state()
        return {i: read_state(s, n) for i, s in zip(self.layer_ids, states)}

    # ----- merge / query ---------------------------------------------------------------------

    @property
    def committed(self) -> bool:
        return any(a.merged for a in self.absorptions.values())

    def commit(self) -> None:
        """Merge `ΔW` from the effective state into the base's weights (one context only)."""
        if self.batch != 1:
            raise ValueError(
                f"commit: merging needs one context (batch 1), the state holds {self.batch}; "
                "use the side branch (forward without commit) for batches of contexts"
            )
        self.uncommit()
        hs = self.state_h()
        with torch.no_grad():
            for key, absorption in self.absorptions.items():
                absorption.merge(hs[int(key.split("_")[0])][0])

    def uncommit(self) -> None:
        """Restore the original weights bitwise; idempotent."""
        for absorption in getattr(self, "absorptions", {}).values():
            absorption.unmerge()

    def hidden(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        label_tokens: torch.Tensor | None = None, per_context: int = 1,
    ) -> torch.Tensor:
        """Final hidden states (N, T, d) of queries at positions from 0, no context in the window.

        Committed: the merged weights alone. Otherwise each sample's side branch reads its
        context's `h`: row `i` of the queries belongs to context `i // per_context` (a state of
        batch 1 is shared by all queries).
        """
        if self.committed:
            return self.base.hidden(tokens, label_tokens=label_tokens, values=values)[0]
        hs = self.state_h()
        try:
            for key, absorption in self.absorptions.items():
                h = hs[int(key.split("_")[0])]
                absorption.h = h.repeat_interleave(per_context, 0) if per_context > 1 else h
            return self.base.hidden(tokens, label_tokens=label_tokens, values=values)[0]
        finally:
            for absorption in self.absorptions.values():
                absorption.h = None

    def forward(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        label_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for queries at positions from 0, with no context in the window."""
        return self.base.head(self.hidden(tokens, values, label_tokens))

    def predict(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        label_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The spec's name for `forward` (§6)."""
        return self(tokens, values, label_tokens)

    def query_hidden(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        label_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries (B, q) of B contexts, each answered alone at position 0: hidden (B, q, d)."""
        b, q = tokens.shape
        flat = [None if t is None else t.reshape(b * q, 1, *t.shape[2:])
                for t in (tokens, values, label_tokens)]
        per = q if self.batch == b else 1
        if self.batch not in (1, b):
            raise ValueError(f"query_hidden: {b} query rows for a state of batch {self.batch}")
        return self.hidden(flat[0], flat[1], flat[2], per_context=per).reshape(b, q, -1)

    # ----- the fast state as data (checkpoints) ----------------------------------------------

    def stream_state(self) -> dict[str, object]:
        """Everything `reset_state` clears, as tensors and ints (saved in checkpoints)."""
        if self.committed:
            raise ValueError("stream_state: uncommit() first (the merged weights are not state)")
        return {
            "batch": self.batch, "s": [s.detach().clone() for s in self._s],
            "n": self._n.clone(), "consumed": self._consumed,
            "cache": None if self._cache is None else [
                (k.detach().clone(), v.detach().clone()) for k, v in self._cache],
            "cache_mask": self._cache_mask.clone(),
        }

    def load_stream_state(self, state: dict[str, object]) -> None:
        """Restore what `stream_state` returned (to this module's device)."""
        dev = self.mappers[str(self.layer_ids[0])].queries.device
        self.reset_state(int(state["batch"]))
        saved = list(state["s"])
        mask, consumed, cache = state["cache_mask"], int(state["consumed"]), state["cache"]
        length = mask.shape[1]
        if (len(saved) != len(self._s) or saved[0].shape != self._s[0].shape
                or not 0 <= consumed <= length <= self.block_size
                or consumed % self.chunk_size
                or (cache is None) != (length == 0)
                or (cache is not None and cache[0][0].shape[2] != length)):
            raise ValueError("load_stream_state: the state was written by an adapter of "
                             "another shape (slots, chunk or block size)")
        self._s = [s.to(dev) for s in saved]
        self._n = state["n"].to(dev)
        self._consumed = int(state["consumed"])
        cache = state["cache"]
        self._cache = None if cache is None else [(k.to(dev), v.to(dev)) for k, v in cache]
        self._cache_mask = state["cache_mask"].to(dev)

    def norms(self) -> dict[str, float]:
        """‖S‖ per adapted layer and ‖ΔW‖/‖W‖ per target (of the effective state, batch 1)."""
        states, n = self.effective_state()
        out = {f"state_norm/layer{i}": float(s[0].norm()) for i, s in zip(self.layer_ids, states)}
        hs = {i: read_state(s, n) for i, s in zip(self.layer_ids, states)}
        with torch.no_grad():
            for key, a in self.absorptions.items():
                dw = a.delta_weight(hs[int(key.split("_")[0])][0])
                out[f"dw_ratio/{key}"] = float(dw.norm() / a.linear.weight[a.rows].norm())
        return out


# ===================================================================== the LightningModule

MODES = ("meta_train", "stream")
RESET_ON = ("detected", "none", "segment")
ADAPTER_FORMAT = "adaptlab.stream_adapter/1"


def load_adapter(path: str, base_path: str | None = None) -> tuple[AdaptedGPT, dict[str, Any]]:
    """A Stage B export on its base: the `AdaptedGPT` (base frozen) and the export record.

    The base is read from `base_path` (default: the path recorded at export); its content hash
    must equal the one the adapter was trained on.
    """
    rec = read_export(path, "adapter", ADAPTER_FORMAT, "no Stage B export")
    base, base_rec = load_base(base_path or rec["base_path"])
    if base_rec["sha256"] != rec["base_sha256"]:
        raise ValueError(
            f"adapter: trained on base {rec['base_sha256'][:12]}…, but "
            f"{base_path or rec['base_path']!r} is {base_rec['sha256'][:12]}…; use the base "
            "the adapter was trained on"
        )
    core = AdaptedGPT(base, **rec["adapter_args"])
    missing, unexpected = core.load_state_dict(rec["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise ValueError(f"adapter: {path!r} does not fit its settings (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
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


class StreamAdapter(EpisodicTraining, StreamLearner):
    """StreamAdapter as a learner: Stage B meta-training and the test-time context stream.

    `mode: meta_train` (spec §5, Stage B): episodes of an `EpisodeDataModule` (seen families);
    per batch the frozen base prefills the context in blocks, the mappers fold it into the
    state, and the queries — each alone at position 0, no context in the window — run through
    the base plus the side branches; the loss is Stage A's. The optimiser holds the adapter's
    parameters only; `W1 = 0` makes step 0 exactly zero-shot. The result is exported
    (`export:`) with the base's content hash.

    `mode: stream` (spec §6): the `StreamLearner` contract over a context stream
    (`streams.icl.ContextStream`): `observe(x, y)` predicts the labelled examples from the
    current state, then absorbs them as demonstrations; no optimiser, no gradients. The
    adapter comes from a Stage B export (`adapter:`), whose base must match. `reset_on`:
    `detected` (a core `ShiftDetector` on the pre-absorb loss resets the state), `none` (the
    gate forgets) or `segment` (oracle resets by `SegmentReset`, upper bound only).

    Args:
        base: the Stage A export (`FamilyInContextLearner(export=…)`).
        mode: `meta_train` or `stream`.
        adapter: the Stage B export to run in `stream` mode (its adapter settings are used).
        n_slots, chunk_size, block_size, targets, layers, gate, recurrence, gate_bias: the
            adapter (`AdaptedGPT`); `block_size` defaults to the base's window W.
        lr, betas, weight_decay, warmup_steps, clip: AdamW, warm-up then cosine to 0.
        allow_weak_base: train even if the base failed Stage A's `icl_check`.
        eval_every, eval_episodes, eval_ks, eval_seed: the StreamAdapter demo curve logged
            during Stage B (default k: 1, 4, W, 4W).
        export: where Stage B writes the trained adapter.
        reset_on, detector, grace: the stream-mode reset (detector: `ShiftDetector` options).
        log_norms_every: observe steps between ‖S‖ and ‖ΔW‖/‖W‖ logs in `stream` mode.
        distill: λ of the optional `λ·KL(ICL teacher ‖ adapted)` term for k ≤ W (spec §5;
            not from the paper; 0 disables it).
        allow_unseen: let Stage B train on families held out as unseen (spec §4).
        chunk_sizes: Stage B draws each step's `C` from this list (seeded by the step), so one
            adapter serves several chunkings; inference uses `chunk_size`. How a context is
            split into `absorb` calls needs no such sampling: any split gives the same state.
        **kwargs: `StreamLearner` arguments (linked shapes, seed).
    """

    def __init__(
        self, *, base: str, mode: str = "meta_train", adapter: str | None = None,
        n_slots: int = 4, chunk_size: int = 4, block_size: int | None = None,
        targets: str | Sequence[str] = DEFAULT_TARGETS, layers: str | int = "all",
        gate: str = "vector", recurrence: str = "ema", gate_bias: float = 2.0,
        lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.98), weight_decay: float = 0.01,
        warmup_steps: int = 200, clip: float | None = 1.0, allow_weak_base: bool = False,
        eval_every: int = 500, eval_episodes: int = 256, eval_ks: Sequence[int] | None = None,
        eval_seed: int = 4321, export: str | None = None, reset_on: str = "detected",
        detector: dict[str, Any] | None = None, log_norms_every: int = 50, distill: float = 0.0,
        allow_unseen: bool = False, chunk_sizes: Sequence[int] | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        for name, val, choices in (("mode", mode, MODES), ("reset_on", reset_on, RESET_ON)):
            if val not in choices:
                raise ValueError(f"{name}: {val!r} is not one of {choices}")
        self.mode, self.base_path, self.reset_on = mode, base, reset_on
        if mode == "stream":
            if not adapter:
                raise ValueError("adapter: `mode: stream` needs a Stage B export (adapter: …)")
            self.core, rec = load_adapter(adapter, base)
            self.adapter_args = dict(rec["adapter_args"])
            base_rec = rec["base_record"]
        else:
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.core = AdaptedGPT(model, **self.adapter_args)
        self.base_record = {k: v for k, v in base_rec.items() if k != "state_dict"}
        self.task = dict(self.base_record["task"])
        self.vocab = FamilyVocab(self.task["n_items"], self.task["n_labels"])
        if self.n_classes != self.vocab.size:
            raise ValueError(f"data: vocabulary {self.n_classes} != the base's {self.vocab.size}")
        if mode == "stream" and self.input_shape != (2 + value_dim(self.task["size"]),):
            raise ValueError(
                f"data: samples of shape {self.input_shape} are not packed examples of the "
                f"base's size {self.task['size']!r} ({2 + value_dim(self.task['size'])} "
                "values); use a streams.icl.ContextStream of that size")
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
        # stream mode
        self.detector = ShiftDetector(**(detector or {})) if reset_on == "detected" else None
        self.log_norms_every = log_norms_every
        self.resets: list[int] = []
        self.core.reset_state(1)

    # -- the streaming API (spec §6), delegated to the core -----------------------------------
    def reset_state(self, batch: int = 1) -> None:
        self.core.reset_state(batch)

    def absorb(self, tokens: torch.Tensor, values: torch.Tensor | None = None,
               mask: torch.Tensor | None = None,
               label_tokens: torch.Tensor | None = None) -> None:
        self.core.absorb(tokens, values, mask, label_tokens)

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

    # -- Stage B ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.mode == "meta_train":
            if not isinstance(dm, EpisodeDataModule):
                raise ValueError("StreamAdapter(mode: meta_train): data must be an "
                                 "adaptlab.episodes.EpisodeDataModule (data.class_path)")
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
            return
        if isinstance(dm, EpisodeDataModule):
            raise ValueError("StreamAdapter(mode: stream): data must be a context stream, not "
                             "episodes; use mode: meta_train to train the adapter")
        params = getattr(getattr(dm, "stream", None), "params", None) or {}
        for key in ("size", "n_items", "n_labels"):
            if key in params and params[key] != self.task[key]:
                raise ValueError(f"data.stream.{key}: {params[key]!r}, the adapter's base was "
                                 f"trained with {self.task[key]!r}")
        if self.reset_on == "segment" and self._trainer is not None and not any(
                isinstance(cb, SegmentReset) for cb in self.trainer.callbacks):
            raise ValueError("reset_on: segment needs the SegmentReset callback "
                             "(--trainer.callbacks+=adaptlab.strategies.SegmentReset)")

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if self.mode != "meta_train":
            return None
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
        if self.mode == "stream":
            return super().training_step(batch, batch_idx)
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
        if self.mode != "meta_train":
            return
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

    # -- stream mode: the StreamLearner contract ----------------------------------------------
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

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-then-absorb: predict the batch from the state, then absorb it as demos."""
        with torch.no_grad():
            logits = self(x)
            lo, hi = self.vocab.label_start, self.vocab.xvec
            loss = F.cross_entropy(logits[:, lo:hi], y - lo)
            if self.detector is not None and self._shift(loss):
                self.core.reset_state(1)
                self.resets.append(self.batch_position)
            self.absorb_examples(x, y)
        self._count_step()  # absorbing is this learner's update: steps, checkpoints, max_steps
        self.__dict__["update_steps"] += 1
        if (self.log_norms_every and self.observe_steps % self.log_norms_every == 0
                and self.logger is not None):
            self.logger.log_metrics(self.core.norms(), step=self.observe_steps)
        return logits, loss

    def _shift(self, loss: torch.Tensor) -> bool:
        """The core detector on the pre-absorb loss, its window seeded with the zero-shot loss
        (ln of the label count); after a reset the channel is re-seeded the same way."""
        det = self.detector
        zero_shot = math.log(self.vocab.n_labels)
        if det.n_channels == 0:
            det.add_channel(zero_shot)
        det.refresh_threshold(0)
        value = float(loss)
        c = det.candidate(torch.tensor([value], device=det.sbar.device))[0]
        if det.fired(0, c, value):
            det.reset_channel(0, seed=zero_shot)
            return True
        det.commit(0, value)
        return False

    def absorb_examples(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Absorb labelled stream samples (packed `x` (B, 2 + dv), label ids `y`) as B demos,
        in order, into the current state (batch 1): the label goes into the label token."""
        tokens, values = self._unpack(x)
        demo_values = values.clone()
        demo_values[:, -1] = 1.0  # has_y (label families carry y in the label token)
        self.core.absorb(tokens[None], demo_values[None], label_tokens=y[None])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The spec's name for answering queries from the current state (`forward`)."""
        return self(x)

    def shift_events(self) -> list[int]:
        return list(self.resets)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.core.committed:
            raise ValueError("checkpoint: the adapter is committed (merged weights); "
                             "uncommit() before saving")
        super().on_save_checkpoint(checkpoint)

    def extra_state(self) -> dict[str, Any]:
        return {"curves": self.curves, "families": self.families, "resets": self.resets,
                "stream_state": self.core.stream_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.curves = list(state.get("curves", []))
        self.families = list(state.get("families", []))
        self.resets = list(state.get("resets", []))
        if state.get("stream_state") is not None:
            self.core.load_stream_state(state["stream_state"])


class SegmentReset(pl.Callback):
    """Oracle resets at true segment changes (`reset_on: segment`; an upper bound only).

    Reads `datamodule.batch_meta()` — segment ids a task-free learner never sees — and calls
    `reset_state()` before the first chunk of a new segment. Use `data.batches_per_step: 1`
    so a change is never inside a chunk. Records `oracle_segment_info=true` in hparams.
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, StreamAdapter) or pl_module.reset_on != "segment":
            raise ValueError("SegmentReset: needs a StreamAdapter with reset_on: segment")
        pl_module.hparams["oracle_segment_info"] = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        meta = trainer.datamodule.batch_meta()
        seg = int(meta["segment_ids"][0])
        if self.last is not None and seg != self.last:
            pl_module.reset_state(1)
            pl_module.resets.append(int(meta["start"]))
        self.last = int(meta["segment_ids"][-1])

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state.get("last")
