"""StreamAdapter's modules: context mapping and weight absorption on a frozen causal LM.

The `nn` half of StreamAdapter (Muhtar, Shen et al., 2024; docs/methods/stream_adapter.md);
the learners that train and run it are in `stream_adapter.py`:

- `ContextMapper` (§2): one layer's prefill (K, V), cut into chunks, is read by learnable
  multi-head queries and folded by a gated recurrence into a fixed-size state `(S, n)`.
- `WeightAbsorption` (§3): `W' = W + s·W1·hᵀ·W2` on one target linear, as a per-sample side
  branch (training) or merged into the weight (inference); `W1 = 0` at init, so the adapted
  model starts as the base.
- `AdaptedLM` (§6): the streaming state over any frozen base — `reset_state` / `absorb` /
  `commit` / `uncommit` / `stream_state`; `AdaptedGPT` is it on a `TinyGPT`, `AdaptedHF`
  (`stream_adapter_hf.py`) on a Hugging Face causal LM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adaptlab.models import KV, TinyGPT

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
        k, v = k.to(self.queries.dtype), v.to(self.queries.dtype)  # a bf16 base's cache
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

    @torch.no_grad()
    def chunk_weights(self, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """How much each chunk weighs in the final state, (B, H, M_h, n_chunks): `S_n` is
        `Σ_j w_j·O_j` with `w_j = (1−α_j)·Π_{i>j} α_i` (`ema`; `w_1 = Π_{i>1} α_i`) or
        `Π_{i>j} α_i` (`additive`). Recency means the last chunk weighs at least the first."""
        alphas = []
        for lo in range(0, k.shape[2], chunk_size):
            o, _ = self.summarize(k[:, :, lo:lo + chunk_size], v[:, :, lo:lo + chunk_size])
            alphas.append(self.alpha(o)[..., 0])
        a = torch.stack(alphas, -1)  # (B, H, M_h, n)
        later = torch.ones_like(a)  # Π_{i>j} α_i
        for j in range(a.shape[-1] - 2, -1, -1):
            later[..., j] = later[..., j + 1] * a[..., j + 1]
        if self.recurrence == "additive":
            return later
        own = 1 - a
        own[..., 0] = 1.0  # the first valid chunk sets S = O_1
        return own * later

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
        linear: the base's `nn.Linear` or GPT-2 `Conv1D` (not registered here, so it stays the
            base's parameter).
        d_state: `d_h`, the width of a state slot.
        n_slots: `M`, the number of state slots (`H·M_h`).
        rows: the output rows this update owns (e.g. the `v` third of a fused `qkv`); all if None.
    """

    def __init__(
        self, linear: nn.Module, d_state: int, n_slots: int, rows: slice | None = None
    ) -> None:
        super().__init__()
        self._linear = (linear,)  # a tuple: not a submodule, the base owns it
        d_in, d_all, self.transposed = linear_dims(linear)
        self.rows = rows if rows is not None else slice(0, d_all)
        d_out = len(range(d_all)[self.rows])
        self.w2 = nn.Parameter(torch.randn(n_slots, d_in) / math.sqrt(d_in))
        self.w1 = nn.Parameter(torch.zeros(d_out, d_state))
        self.gamma = nn.Parameter(torch.ones(()))
        self.n_slots = n_slots
        self.h: torch.Tensor | None = None  # the state the side branch reads, (B, M, d_h)
        self._saved: torch.Tensor | None = None
        self._handle = linear.register_forward_hook(self._hook)

    @property
    def linear(self) -> nn.Module:
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
        x = inputs[0].to(self.w2.dtype)  # a bf16 base, a float32 adapter
        side = self.side(x, self.h.to(self.w2.dtype)).to(output.dtype)
        start, stop, _ = self.rows.indices(output.shape[-1])
        return output + nn.functional.pad(side, (start, output.shape[-1] - stop))

    @torch.no_grad()
    def merge(self, h: torch.Tensor) -> None:
        """Add `ΔW` for `h` (M, d_h) into the weight, keeping an exact copy of its rows."""
        if self.merged:
            self.unmerge()
        weight = self._rows_view()
        self._saved = weight.clone()
        weight += self.delta_weight(h).to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the rows saved by `merge` bitwise; a no-op when not merged."""
        if self._saved is not None:
            self._rows_view().copy_(self._saved)
            self._saved = None

    def _rows_view(self) -> torch.Tensor:
        """The owned rows of the weight as (d_out, d_in), a view (Conv1D stores (in, out))."""
        weight = self.linear.weight
        return weight[:, self.rows].T if self.transposed else weight[self.rows]

    def weight_norm(self) -> torch.Tensor:
        """‖W‖ of the owned rows (for ‖ΔW‖/‖W‖)."""
        return self._rows_view().norm()

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


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """`(d_in, d_out, transposed)` of an `nn.Linear` (weight (out, in)) or a GPT-2-style
    `Conv1D` (weight (in, out), `nf` outputs)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1]:
        return int(weight.shape[0]), int(weight.shape[1]), True
    raise ValueError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


def last_layers(layers: str | int, n_layer: int) -> tuple[int, ...]:
    """`all`, or an int `n`: the last `n` of `n_layer` layers."""
    if layers == "all":
        return tuple(range(n_layer))
    if isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= n_layer:
        return tuple(range(n_layer - layers, n_layer))
    raise ValueError(f"layers: 'all' or an int in 1..{n_layer} (last n), got {layers!r}")


def load_adapter_weights(core: nn.Module, rec: dict[str, Any], path: str) -> None:
    """Load a Stage B export's adapter weights into `core` (its frozen base is not in the
    export: only the adapter's keys must match), or fail in one line naming the export."""
    missing, unexpected = core.load_state_dict(rec["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise ValueError(f"adapter: {path!r} does not fit its settings (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")


def check_base_hash(recorded: str, found: str, where: str) -> None:
    """Refuse a base whose content hash is not the one an adapter export recorded, in one
    line naming the base (`where`)."""
    if found != recorded:
        raise ValueError(f"adapter: trained on base {recorded[:12]}…, but {where!r} is "
                         f"{found[:12]}…; use the base the adapter was trained on")


class AdaptedLM(nn.Module):
    """A frozen causal LM whose target linears absorb a streamed context (spec §6).

    The streaming machinery, whatever the base: `absorb` encodes demos with the *unadapted*
    base in encoding blocks of `block_size` positions, each starting at position 0 (no
    attention across blocks), and feeds every full chunk of `chunk_size` positions to each
    adapted layer's `ContextMapper`. Positions not yet filling a chunk wait with their KV; the
    *effective state* folds them in as a masked chunk without consuming them, so it depends
    only on the demo sequence, never on how it was split into calls. Queries run at positions
    from 0 with no context in the window, through the side branches (per-sample contexts) or,
    after `commit`, through merged weights.

    A subclass builds the base and calls `_build_adapter`, and provides `_encode` (one block
    piece → the per-layer (K, V) of the block so far) and its query forward.
    """

    def _build_adapter(
        self, base: nn.Module, layer_ids: Sequence[int], n_head: int, d_head: int,
        targets: Sequence[tuple[str, int, nn.Module, slice | None]], n_slots: int,
        chunk_size: int, block_size: int, gate: str, recurrence: str, gate_bias: float,
    ) -> None:
        """Freeze `base`; one mapper per layer in `layer_ids`, one absorption per target
        `(key, layer, linear, rows)` (the key starts with the layer id and an underscore)."""
        if chunk_size < 1 or block_size < 1 or block_size % chunk_size:
            raise ValueError(
                f"chunk_size {chunk_size} must be >= 1 and divide block_size {block_size}"
            )
        self.base = base.requires_grad_(False).eval()
        self.chunk_size, self.block_size = int(chunk_size), int(block_size)
        self.layer_ids = tuple(layer_ids)
        self.mappers = nn.ModuleDict({
            str(i): ContextMapper(n_head, d_head, n_slots, gate, recurrence, gate_bias)
            for i in self.layer_ids
        })
        self.absorptions = nn.ModuleDict({
            key: WeightAbsorption(linear, d_head, n_head * n_slots, rows)
            for key, _, linear, rows in targets
        })
        self.reset_state()

    def train(self, mode: bool = True) -> AdaptedLM:
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
               ) -> AdaptedLM:
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

    def _encode(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor],
                past: list[KV] | None) -> list[KV]:
        """The unadapted base on one piece of a block after `past`: every layer's (K, V) of
        the block so far, (B, H, T, d_h)."""
        raise NotImplementedError

    def absorb(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
               **extras: torch.Tensor | None) -> None:
        """Append a span of demos (B, T) to the stream; any split of a sequence is equivalent.

        Uncommits first: context is encoded by the unadapted base (`no_grad`). Gradients flow
        into the mappers if enabled (Stage B). `mask` (B, T) is True for real positions; padding
        must come after a context's last real position (the base sees no attention mask).
        `extras`: other per-position inputs of the base (B, T, …), sliced with the tokens.
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
            pieces = {k: v[:, pos : pos + take] for k, v in extras.items() if v is not None}
            with torch.no_grad():
                kvs = self._encode(tokens[:, pos : pos + take], pieces, self._cache)
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

    @contextmanager
    def side_branches(self, per_context: int = 1) -> Iterator[None]:
        """Within: each target's side branch reads its context's `h` (row `i` of the queries
        belongs to context `i // per_context`; a state of batch 1 is shared by all queries).
        Committed: nothing to set, the merged weights answer."""
        if self.committed:
            yield
            return
        hs = self.state_h()
        try:
            for key, absorption in self.absorptions.items():
                h = hs[int(key.split("_")[0])]
                absorption.h = h.repeat_interleave(per_context, 0) if per_context > 1 else h
            yield
        finally:
            for absorption in self.absorptions.values():
                absorption.h = None

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
                out[f"dw_ratio/{key}"] = float(dw.norm() / a.weight_norm())
        return out


class AdaptedGPT(AdaptedLM):
    """`AdaptedLM` on a `TinyGPT` (inputs: tokens, label tokens, values; spec §1, §6).

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
        if block_size > base.n_positions:
            raise ValueError(
                f"block_size {block_size} exceeds the base's n_positions {base.n_positions}"
            )
        layer_ids = last_layers(layers, len(base.blocks))
        self.targets = _resolve_targets(targets)
        n_head = base.blocks[0].n_head
        d_model = base.d_model
        found = [(f"{i}_{t}", i, *_target_linear(base.blocks[i], t, d_model))
                 for i in layer_ids for t in self.targets]
        self._build_adapter(base, layer_ids, n_head, d_model // n_head, found, n_slots,
                            chunk_size, block_size, gate, recurrence, gate_bias)

    def _encode(self, tokens: torch.Tensor, extras: dict[str, torch.Tensor],
                past: list[KV] | None) -> list[KV]:
        return self.base.hidden(tokens, label_tokens=extras.get("label_tokens"),
                                values=extras.get("values"), past_kv=past)[1]

    def absorb(  # type: ignore[override]
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, label_tokens: torch.Tensor | None = None,
    ) -> None:
        """`AdaptedLM.absorb` with TinyGPT's per-position inputs (spec §4 encoding)."""
        super().absorb(tokens, mask, values=values, label_tokens=label_tokens)

    def hidden(
        self, tokens: torch.Tensor, values: torch.Tensor | None = None,
        label_tokens: torch.Tensor | None = None, per_context: int = 1,
    ) -> torch.Tensor:
        """Final hidden states (N, T, d) of queries at positions from 0, no context in the window.

        Committed: the merged weights alone. Otherwise each sample's side branch reads its
        context's `h`: row `i` of the queries belongs to context `i // per_context`.
        """
        with self.side_branches(per_context):
            return self.base.hidden(tokens, label_tokens=label_tokens, values=values)[0]

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
