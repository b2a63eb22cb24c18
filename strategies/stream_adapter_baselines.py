"""The StreamAdapter paper's baselines on the TinyGPT task families (issue 18).

- **TempLoRA** (test-time LoRA): a fresh LoRA on the adapter's target linears per context,
  trained at test time on that context's demonstrations — each demo asked alone at position
  0, as a query, its label or `y` the target — then the queries answered through it.
  Rank = the adapter's `ΔW` rank bound (`d_h`), so both hold the same rank budget.
- **Multi-task LoRA** (MT-LoRA): one LoRA meta-trained on the seen families' queries with no
  context (what fine-tuning on the seen tasks gives; it cannot use demonstrations). Its
  training episodes have their own keys (`MT_LORA_KEY`), never an evaluation episode's.
- **Evicting KV at equal memory**: ICL that keeps only `m` demos' KV, `m` the number of
  positions whose cache fits in StreamAdapter's state (`evict_window`): the last `m`
  (`icl_outputs(window=m)`), or the `m` most attended (`most_attended`, H2O's accumulated
  attention score, Zhang et al. 2023), chosen while the context streams through the base.
- **Best constant answer** (`fit_constant`): the majority label (regression: the mean `y`)
  of each family on development episodes — what a method with no context can reach, the
  chance line of the table (a random label map's chance is 1 / n_labels: its labels are
  drawn per episode from the whole label block).

All run on a `family_batch` and return label-block logits and reals, as `demo_curve` wants,
so every method is scored by the same `predictions` / `family_skill`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adaptlab.models import TinyGPT
from adaptlab.streams.icl import ALL_FAMILIES, REGRESSION, FamilyVocab, family_batch

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


MT_LORA_KEY = 1 << 41
"""Key offset of MT-LoRA's training episodes (evaluation keys are below 2^40)."""


def train_mt_lora(base: TinyGPT, families: Sequence[str], vocab: FamilyVocab, size: str,
                  n_query: int, rank: int = 16, steps: int = 300, lr: float = 3e-3,
                  per_family: int = 16, seed: int = 0,
                  targets: str | Sequence[str] = DEFAULT_TARGETS) -> LoRA:
    """Multi-task LoRA: one shared LoRA trained on the seen families' queries, no context;
    `steps × per_family × len(families)` training episodes (Stage B's budget by default in
    the bench), drawn from data seed `seed` with keys `MT_LORA_KEY + step`."""
    device = next(base.parameters()).device
    lora = LoRA(base, rank, n_ctx=1, targets=targets, seed=seed).to(device)
    opt = torch.optim.Adam(lora.parameters(), lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            b = family_batch(list(families), per_family, 0, n_query, seed, size, vocab,
                             key=MT_LORA_KEY + step)
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


# ----- evicting KV: the most attended demos (H2O) -------------------------------------------


@torch.no_grad()
def attention_received(base: TinyGPT, tokens: torch.Tensor, *,
                       label_tokens: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T): the attention each position receives from the *later* positions, summed over
    layers, heads and those positions — H2O's accumulated attention score. The probabilities
    are recomputed from each block's own `ln1`/`qkv` on the block's input (captured by a
    pre-hook), with the causal mask the block uses."""
    inputs: list[torch.Tensor] = []
    handles = [blk.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
               for blk in base.blocks]
    try:
        base.hidden(tokens, label_tokens=label_tokens, values=values)
    finally:
        for h in handles:
            h.remove()
    t = tokens.shape[1]
    later = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(-1)  # query i > key j
    causal = later | torch.eye(t, dtype=torch.bool, device=tokens.device)
    score = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for blk, h in zip(base.blocks, inputs):
        b, _, d = h.shape
        q, k, _ = blk.qkv(blk.ln1(h)).split(d, dim=-1)
        q, k = (z.view(b, t, blk.n_head, d // blk.n_head).transpose(1, 2) for z in (q, k))
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d // blk.n_head)
        p = logits.float().masked_fill(~causal, float("-inf")).softmax(-1)
        score += (p * later).sum((1, 2))
    return score


def _kept_context(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The context demos at `idx` (B, m): `ctx_token`, `ctx_label`, `ctx_value`."""
    cv = batch["ctx_value"]
    return {"ctx_token": batch["ctx_token"].gather(1, idx),
            "ctx_label": batch["ctx_label"].gather(1, idx),
            "ctx_value": cv.gather(1, idx[..., None].expand(-1, -1, cv.shape[-1]))}


@torch.no_grad()
def most_attended(base: TinyGPT, batch: dict[str, torch.Tensor], m: int, window: int
                  ) -> torch.Tensor:
    """(B, min(k, m)) indices, in context order, of the `m` demos H2O keeps: the context
    streams through the base in passes of at most `window` positions (the kept demos, then
    the next new ones); each pass adds the attention every demo receives to its running
    score, and the `m` best-scored demos are kept. At k ≤ m all demos are kept."""
    n, k = batch["ctx_token"].shape
    dev = batch["ctx_token"].device
    if k <= m:
        return torch.arange(k, device=dev).expand(n, k)
    if window <= m:
        raise ValueError(f"most_attended: window {window} must exceed the budget m = {m}")
    score = torch.zeros(n, k, device=dev)
    kept = torch.zeros(n, 0, dtype=torch.long, device=dev)
    pos = 0
    while pos < k:
        new = torch.arange(pos, min(k, pos + window - kept.shape[1]), device=dev)
        idx = torch.cat([kept, new.expand(n, len(new))], 1)
        ctx = _kept_context(batch, idx)
        att = attention_received(base, ctx["ctx_token"], label_tokens=ctx["ctx_label"],
                                 values=ctx["ctx_value"])
        score.scatter_add_(1, idx, att)
        top = score.gather(1, idx).topk(min(m, idx.shape[1]), dim=1).indices
        kept = idx.gather(1, top).sort(1).values
        pos += len(new)
    return kept


def evicted_outputs(base: TinyGPT, batch: dict[str, torch.Tensor], vocab: FamilyVocab, m: int,
                    policy: str = "last", window: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ICL on the `m` demos an eviction policy keeps (`last` or `attended`, in context
    order), the queries after them; `window`: the positions one pass may use (default the
    base's, less the queries)."""
    from .icl_families import icl_outputs

    if policy == "last":
        return icl_outputs(base, batch, vocab, window=m)
    if policy != "attended":
        raise ValueError(f"policy: 'last' or 'attended', got {policy!r}")
    win = window or base.n_positions - batch["q_token"].shape[1]
    kept = _kept_context(batch, most_attended(base, batch, m, win))
    return icl_outputs(base, {**batch, **kept}, vocab)


# ----- the chance line: the best constant answer ------------------------------------------


def fit_constant(families: Sequence[str], vocab: FamilyVocab, size: str, n_query: int,
                 seed: int, episodes: int = 512) -> dict[int, tuple[int, float]]:
    """Per family id: the majority label's index in the label block and the mean `y`, on
    `episodes` development episodes (data seed `seed`, MT-LoRA's keys) — the best answer
    that ignores context and input."""
    out = {}
    for fam in families:
        b = family_batch([fam], episodes, 0, n_query, seed, size, vocab, key=MT_LORA_KEY - 1)
        t = b["target"].flatten()
        if fam in REGRESSION:
            out[ALL_FAMILIES.index(fam)] = (0, float(t.mean()))
        else:
            lab = (t.long() - vocab.label_start).clamp(0, vocab.n_labels - 1)
            out[ALL_FAMILIES.index(fam)] = (int(torch.bincount(lab).argmax()), 0.0)
    return out


def constant_outputs(table: dict[int, tuple[int, float]], batch: dict[str, torch.Tensor],
                     vocab: FamilyVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query answered with its family's constant (`fit_constant`)."""
    n, q = batch["q_token"].shape
    fam = batch["family"].tolist()
    label = torch.tensor([table[f][0] for f in fam], device=batch["q_token"].device)
    logits = torch.nn.functional.one_hot(label, vocab.n_labels).float()[:, None].expand(
        n, q, vocab.n_labels)
    reg = torch.tensor([table[f][1] for f in fam], device=label.device)[:, None].expand(n, q)
    return logits, reg
