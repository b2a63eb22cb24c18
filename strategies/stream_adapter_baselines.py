"""The StreamAdapter paper's baselines on the TinyGPT task families (issue 18).

- **TempLoRA** (test-time LoRA): a fresh LoRA on the adapter's target linears per context,
  trained at test time on that context's demonstrations — each demo asked alone at position
  0, as a query, its label or `y` the target — then the queries answered through it.
  Rank = the adapter's `ΔW` rank bound (`d_h`), so both hold the same rank budget.
- **Multi-task LoRA** (MT-LoRA): one LoRA meta-trained on the seen families' queries with no
  context (what fine-tuning on the seen tasks gives; it cannot use demonstrations).
- **Evicting KV at equal memory**: ICL that keeps only the last `m` demos' KV, `m` the
  number of positions whose cache fits in StreamAdapter's state (`evict_window`).

All run on a `family_batch` and return label-block logits and reals, as `demo_curve` wants.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adaptlab.models import TinyGPT
from adaptlab.streams.icl import FamilyVocab, family_batch

from .icl_families import family_loss, family_readout
from .stream_adapter_nn import DEFAULT_TARGETS, _resolve_targets, _target_linear, linear_dims


class LoRA(nn.Module):
    """Per-context low-rank updates `ΔW_e = B_e·A_e` of TinyGPT's target linears.

    `n_ctx` contexts (1: one shared LoRA); inside `applied(per_context)` row `i` of the batch
    uses context `i // per_context`. `B = 0` at init: the model starts as the base.
    """

    def __init__(self, base: TinyGPT, rank: int, n_ctx: int = 1,
                 targets: str | Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> None:
        super().__init__()
        self.rank, self.n_ctx, self.per_context = rank, n_ctx, 1
        self.active = False
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterList(), nn.ParameterList()
        self._targets: list[tuple[nn.Module, slice]] = []
        handles = []
        for block in base.blocks:
            for name in _resolve_targets(targets):
                linear, rows = _target_linear(block, name, base.d_model)
                d_in, d_all, _ = linear_dims(linear)
                rows = rows or slice(0, d_all)
                d_out = rows.stop - rows.start
                self.a.append(nn.Parameter(torch.randn(n_ctx, rank, d_in, generator=g)
                                           / math.sqrt(d_in)))
                self.b.append(nn.Parameter(torch.zeros(n_ctx, d_out, rank)))
                j = len(self._targets)
                self._targets.append((linear, rows))
                handles.append(linear.register_forward_hook(self._hook(j)))
        self._handles = handles

    def _hook(self, j: int):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            x = inputs[0]
            a, b = self.a[j], self.b[j]
            n, t = x.shape[0], x.shape[1]
            if self.n_ctx == 1:
                delta = (x @ a[0].T) @ b[0].T
            elif n == self.n_ctx * self.per_context:  # rows grouped by context: one bmm each
                xe = x.reshape(self.n_ctx, self.per_context * t, -1)
                delta = torch.bmm(torch.bmm(xe, a.transpose(1, 2)), b.transpose(1, 2))
                delta = delta.reshape(n, t, -1)
            else:
                idx = (torch.arange(n, device=x.device) // self.per_context).clamp(
                    max=self.n_ctx - 1)
                u = torch.einsum("ntd,nrd->ntr", x, a[idx])
                delta = torch.einsum("ntr,nor->nto", u, b[idx])
            rows = self._targets[j][1]
            return output + nn.functional.pad(delta, (rows.start, output.shape[-1] - rows.stop))
        return hook

    @contextmanager
    def applied(self, per_context: int = 1) -> Iterator[None]:
        self.active, self.per_context = True, per_context
        try:
            yield
        finally:
            self.active, self.per_context = False, 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    @property
    def nbytes_per_context(self) -> int:
        """Bytes of one context's LoRA (what TempLoRA holds between queries)."""
        return sum(p[0].numel() * p.element_size() for p in [*self.a, *self.b])


def _single_queries(tokens: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                    vocab: FamilyVocab) -> tuple[torch.Tensor, ...]:
    """(B, q) examples as B·q single-position queries: labels hidden, `y`/`has_y` zeroed."""
    b, q = tokens.shape
    vals = values.reshape(b * q, 1, -1).clone()
    vals[..., -2:] = 0.0
    none = torch.full((b * q, 1), vocab.none, dtype=tokens.dtype, device=tokens.device)
    return tokens.reshape(b * q, 1), vals, none


def lora_outputs(base: TinyGPT, lora: LoRA, batch: dict[str, torch.Tensor],
                 vocab: FamilyVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query alone at position 0 through the LoRA (row e's own LoRA if per context)."""
    b, q = batch["q_token"].shape
    tok, val, lab = _single_queries(batch["q_token"], batch["q_value"], batch["q_label"], vocab)
    with lora.applied(per_context=q if lora.n_ctx > 1 else b * q):
        h = base.hidden(tok, label_tokens=lab, values=val)[0]
    return family_readout(base, h.reshape(b, q, -1), vocab)


def templora_outputs(base: TinyGPT, batch: dict[str, torch.Tensor], vocab: FamilyVocab,
                     rank: int = 16, steps: int = 20, lr: float = 1e-2, max_demos: int = 64,
                     targets: str | Sequence[str] = DEFAULT_TARGETS, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """TempLoRA: per episode, `steps` Adam steps of a fresh LoRA on (up to `max_demos`, drawn
    afresh each step) of its demos asked as queries; then its queries through that LoRA."""
    n, k = batch["ctx_token"].shape
    lora = LoRA(base, rank, n_ctx=n, targets=targets, seed=seed).to(batch["ctx_token"].device)
    try:
        if k:
            ctx_target = torch.where(
                torch.isin(batch["family"], _reg_ids(batch))[:, None],
                batch["ctx_value"][..., -2], batch["ctx_label"].float())
            opt = torch.optim.Adam(lora.parameters(), lr=lr)
            g = torch.Generator().manual_seed(seed)
            with torch.enable_grad():
                for _ in range(steps):
                    pick = torch.randperm(k, generator=g)[:min(k, max_demos)].to(
                        batch["ctx_token"].device)
                    m = len(pick)
                    tok, val, lab = _single_queries(batch["ctx_token"][:, pick],
                                                    batch["ctx_value"][:, pick],
                                                    batch["ctx_label"][:, pick], vocab)
                    with lora.applied(per_context=m):
                        h = base.hidden(tok, label_tokens=lab, values=val)[0]
                    logits, reg = family_readout(base, h.reshape(n, m, -1), vocab)
                    loss = family_loss(logits, reg, ctx_target[:, pick], batch["family"], vocab)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            return lora_outputs(base, lora, batch, vocab)
    finally:
        lora.remove()


def _reg_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from .icl_families import REG_IDS

    return torch.tensor(REG_IDS, device=batch["family"].device)


def train_mt_lora(base: TinyGPT, families: Sequence[str], vocab: FamilyVocab, size: str,
                  n_query: int, rank: int = 16, steps: int = 300, lr: float = 3e-3,
                  per_family: int = 32, seed: int = 0,
                  targets: str | Sequence[str] = DEFAULT_TARGETS) -> LoRA:
    """Multi-task LoRA: one shared LoRA trained on the seen families' queries, no context."""
    device = next(base.parameters()).device
    lora = LoRA(base, rank, n_ctx=1, targets=targets, seed=seed).to(device)
    opt = torch.optim.Adam(lora.parameters(), lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            b = family_batch(list(families), per_family, 0, n_query, seed + 7919, size, vocab,
                             key=step)
            b = {f: t.to(device) for f, t in b.items()}
            logits, reg = lora_outputs(base, lora, b, vocab)
            loss = family_loss(logits, reg, b["target"], b["family"], vocab)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lora.requires_grad_(False)


def kv_bytes_per_position(base: TinyGPT) -> int:
    """Bytes of one position's cached K and V over all layers."""
    p = next(base.parameters())
    return len(base.blocks) * 2 * base.d_model * p.element_size()


def evict_window(state_nbytes: int, base: TinyGPT) -> int:
    """Demos whose KV fits in `state_nbytes` (at least 1): the evicting-KV baseline's budget."""
    return max(1, state_nbytes // kv_bytes_per_position(base))
