"""StreamAdapter against zero-shot and in-context learning: skill vs demonstrations, and cost.

    python tools/stream_adapter_bench.py                # both tiny Stage B exports, 512 episodes
    python tools/stream_adapter_bench.py --quick        # smoke test: few episodes, ks and reps
    python tools/stream_adapter_bench.py --device cuda  # also peak GPU memory per query

The benchmark of docs/methods/stream_adapter.md. For every Stage B export (`--adapters`):

- **Skill.** Its seen families plus the unseen families of the same kind (regression or
  label), at k ∈ {0, 1, 2, 4, 8, 16, 64, 256} ∪ {W, 2W, 4W, 16W}, on the same evaluation
  episodes for every method (`adaptlab.episodes.demo_curve`, one `--seed`): `zero-shot` (the
  base on each query alone at position 0; the context of every k's episodes ignored, so it is
  a flat reference line), `ICL` (`d1 … dk q1 … qq` in the window, k ≤ W), `truncated ICL`
  (the last W demos; at k = W it is ICL) and `StreamAdapter` (every episode's context absorbed
  into its own state, side branch, each query alone at position 0). Mean ± SE over episodes;
  nMSE (lower is better) for regression families in the table, skill in the figure.
- **Claims.** A0 (an empty state answers as the base), A1/A2 (vs ICL at k ∈ {4, W}), A3, A4,
  the tiny criterion (within 0.15 of ICL at W off the label maps), where SA ≥ ICL by k, and
  C1–C4 from the cost table; wall-clock claims on a shared CPU are indicative only.
- **Baselines** (`--baselines`, the paper's; `strategies/stream_adapter_baselines.py`):
  `evicting KV (last)` and `evicting KV (most attended)` (ICL keeping m demos, m the
  positions whose KV fits in the adapter's state: the last m, or the m with the highest
  H2O accumulated attention), `TempLoRA` (a fresh LoRA per context trained on its demos,
  rank `d_h` = the adapter's ΔW rank bound), `MT-LoRA` (one LoRA trained on the seen
  families with no context, Stage B's number of episodes by default) and `best constant`
  (each family's majority answer: the chance line of a method without context), each with
  a cost row; and the protocol table at k ∈ {4, W, 4W, 16W} over `--seeds` evaluation seeds.
  TempLoRA's steps/lr and MT-LoRA's rank/lr default to the values
  `tools/stream_adapter_baseline_tune.py` chose on development episodes. Every method's
  episodes are digested and checked equal per (family, k). One run is one training seed's
  (base, adapter) pair (`--base`, `--adapters`, `--training-seed`); `--combine` gives
  mean ± sd over the runs' training seeds. Off by default: the tables above do not change.
- **Cost** (one context, batch 1, `--latency-ks`): absorption ms per demo, commit time, the
  latency of one single-query forward with merged weights (committed) and through the side
  branch, `state_nbytes` and the encoder cache held between queries. ICL needs k + 1
  positions, more than the real base has, so ICL is timed on an *untrained* TinyGPT of the
  base's architecture with enough positions (latency does not depend on the weights): a full
  forward of k demos + the query (no cache), and the query alone against a prefilled KV cache
  (cached), with the cache's bytes. Every (method, k) is timed in its own block after a
  warm-up: the median of up to `--reps` calls, within a time budget per block.

Writes `<out>.md` (what is printed), `<out>.json` (every number), `<out>_skill.png` and
`<out>_cost.png`. A missing or unreadable export is a one-line error (exit code 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptlab.episodes import demo_curve
from adaptlab.jsonio import write_json_atomic
from adaptlab.models import TinyGPT
from adaptlab.seeding import seeded
from adaptlab.strategies.icl_families import (
    family_readout,
    icl_outputs,
    load_base,
    zero_shot_outputs,
)
from adaptlab.strategies.stream_adapter import AdaptedGPT, adapted_outputs, load_adapter
from adaptlab.strategies.stream_adapter_baselines import (
    LoRA,
    constant_outputs,
    evict_window,
    evicted_outputs,
    fit_constant,
    kv_bytes_per_position,
    lora_outputs,
    most_attended,
    templora_outputs,
    train_mt_lora,
)
from adaptlab.streams.icl import REGRESSION, UNSEEN, FamilyVocab, family_batch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTERS = (
    str(ROOT / "artifacts" / "stream_adapter_regression.pt"),
    str(ROOT / "artifacts" / "stream_adapter_classification.pt"),
)
DEFAULT_OUT = str(ROOT / "tools" / "results" / "stream_adapter_bench")
SWEEP_KS = (0, 1, 2, 4, 8, 16, 64, 256)
LATENCY_KS = (4, 16, 64, 256, 1024, 4096)
QUICK_LATENCY_KS = (4, 16, 64)
METHODS = ("zero-shot", "ICL", "truncated ICL", "StreamAdapter")
EVICT_LAST, EVICT_ATT = "evicting KV (last)", "evicting KV (most attended)"
BASELINES = (EVICT_LAST, EVICT_ATT, "TempLoRA", "MT-LoRA", "best constant")  # issue 18
PROTOCOL_METHODS = ("StreamAdapter", "ICL", "TempLoRA", "MT-LoRA", EVICT_LAST, EVICT_ATT,
                    "best constant")
# chosen by tools/stream_adapter_baseline_tune.py on development episodes (dev seed 777)
TEMPLORA_STEPS, TEMPLORA_LR = 60, 3e-3
MT_LORA_RANK, MT_LORA_LR = 4, 3e-3
DEV_SEED = 777
TINY_FAMILIES = ("linreg", "sparse_linreg", "logreg", "bool_conj", "bool_disj")  # not label maps
Curve = dict[str, dict[int, dict[str, float]]]


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----- the exports ---------------------------------------------------------------------------


@dataclass
class Export:
    """One Stage B export: the adapted model, a clean copy of its base, families and task."""

    path: str
    core: AdaptedGPT
    base: TinyGPT  # loaded separately: the zero-shot and ICL baselines never see the hooks
    record: dict[str, Any]
    seen: list[str]
    unseen: list[str]

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def task(self) -> dict[str, Any]:
        return self.record["base_record"]["task"]

    @property
    def window(self) -> int:
        return int(self.task["window"])

    @property
    def vocab(self) -> FamilyVocab:
        return FamilyVocab(self.task["n_items"], self.task["n_labels"])


def unseen_neighbours(seen: Sequence[str]) -> list[str]:
    """The unseen families of the kinds (regression / label) the adapter was trained on."""
    kinds = {f in REGRESSION for f in seen}
    return [f for f in UNSEEN if (f in REGRESSION) in kinds and f not in seen]


def load_export(path: str, base_path: str | None, device: str) -> Export:
    try:
        core, rec = load_adapter(path, base_path)
        base, _ = load_base(base_path or rec["base_path"])
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # a truncated or foreign file: one readable line
        raise ValueError(f"adapter: {path!r} is not readable ({type(err).__name__})") from None
    seen = list(rec.get("families") or [])
    if not seen:
        raise ValueError(f"adapter: {path!r} records no seen families")
    core.to(device).eval()
    base.to(device).eval().requires_grad_(False)
    return Export(path, core, base, rec, seen, unseen_neighbours(seen))


# ----- the methods ---------------------------------------------------------------------------


def sweep_ks(window: int, quick: bool) -> list[int]:
    if quick:
        return sorted({0, 1, 4, window, 4 * window})
    return sorted({*SWEEP_KS, window, 2 * window, 4 * window, 16 * window})


def skill_curves(exp: Export, ks: Sequence[int], episodes: int, seed: int, device: str,
                 t0: float, baselines: dict[str, tuple[Callable, list[int]]] | None = None,
                 episodes_out: dict[str, Any] | None = None) -> dict[str, Curve]:
    """`curves[method][family][k]` on the same episodes for every method (checked: a method
    given other batches is an error; `episodes_out[adapter]` gets the digest)."""
    w, vocab, fams = exp.window, exp.vocab, [*exp.seen, *exp.unseen]
    common = {"episodes": episodes, "n_query": exp.task["n_query"], "seed": seed,
              "size": exp.task["size"], "vocab": vocab, "device": device}
    runs: dict[str, tuple[Callable, list[int]]] = {
        "zero-shot": (lambda b: zero_shot_outputs(exp.base, b, vocab), list(ks)),
        "ICL": (lambda b: icl_outputs(exp.base, b, vocab), [k for k in ks if k <= w]),
        "truncated ICL": (lambda b: icl_outputs(exp.base, b, vocab, window=w),
                          [k for k in ks if k > w]),
        "StreamAdapter": (lambda b: adapted_outputs(exp.core, b, vocab), list(ks)),
    }
    if baselines is not None:
        runs.update(baselines)
    curves: dict[str, Curve] = {}
    digests: dict[str, dict[tuple[int, int], list[str]]] = {}
    for method, (predict, mks) in runs.items():
        log(f"skill: {exp.name}, {method}, k = {mks}", t0)
        seen_batches = digests.setdefault(method, {})
        curves[method] = (demo_curve(_digesting(predict, seen_batches), fams, mks, **common)
                          if mks else {f: {} for f in fams})
    exp.core.reset_state(1)
    checked = same_episodes(digests)
    if episodes_out is not None:
        episodes_out[exp.path] = checked
    for f in fams:  # truncated ICL at k = W is ICL: the line starts where ICL's ends
        if w in curves["ICL"][f]:
            curves["truncated ICL"][f] = {w: curves["ICL"][f][w], **curves["truncated ICL"][f]}
    return curves


def _digesting(predict: Callable, into: dict[tuple[int, int], list[str]]) -> Callable:
    """`predict`, recording a digest of every batch it is given under (family id, k)."""
    def wrapped(b: dict[str, torch.Tensor]) -> Any:
        h = hashlib.sha256()
        for name in sorted(b):
            h.update(name.encode())
            h.update(b[name].detach().cpu().contiguous().numpy().tobytes())
        into.setdefault((int(b["family"][0]), b["ctx_token"].shape[1]), []).append(h.hexdigest())
        return predict(b)
    return wrapped


def same_episodes(digests: dict[str, dict[tuple[int, int], list[str]]]) -> dict[str, Any]:
    """Check that every method saw the same batches at every (family, k) it ran; one digest
    of all of them (equal across runs on the same evaluation seed and families)."""
    by_cell: dict[tuple[int, int], list[str]] = {}
    for method, cells in digests.items():
        for cell, ds in cells.items():
            if cell in by_cell and by_cell[cell] != ds:
                raise RuntimeError(f"{method} saw other episodes at (family, k) = {cell}")
            by_cell.setdefault(cell, ds)
    h = hashlib.sha256(json.dumps(sorted((list(c), d) for c, d in by_cell.items())).encode())
    return {"digest": h.hexdigest()[:16], "cells": len(by_cell),
            "methods": sorted(m for m, c in digests.items() if c)}


@torch.no_grad()
def check_a0(exp: Export, seed: int, device: str) -> dict[str, float]:
    """Max |Δ| between the adapted model with an empty state and the base, same queries:
    side branch (one empty state per episode) and committed (batch 1)."""
    vocab, task = exp.vocab, exp.task
    b = family_batch([*exp.seen, *exp.unseen], 16, 0, task["n_query"], seed, task["size"],
                     vocab, key=999)
    b = {k: t.to(device) for k, t in b.items()}
    ref = zero_shot_outputs(exp.base, b, vocab)
    core = exp.core
    core.reset_state(len(b["family"]))
    side = family_readout(core.base, core.query_hidden(b["q_token"], b["q_value"], b["q_label"]),
                          vocab)
    core.reset_state(1)
    core.commit()
    committed = family_readout(
        core.base, core.query_hidden(b["q_token"], b["q_value"], b["q_label"]), vocab)
    core.reset_state(1)

    def diff(out: tuple[torch.Tensor, torch.Tensor]) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(out, ref))

    return {"side": diff(side), "committed": diff(committed),
            "max_abs_diff": max(diff(side), diff(committed))}


# ----- cost ----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], reps: int, device: str, budget_s: float = 2.0,
              min_reps: int = 5) -> float:
    """Median wall time (ms) of `fn`, after warm-up calls (3, or 0.5 s worth), each call timed
    alone; at most `reps` calls and, beyond `min_reps`, at most `budget_s` seconds."""
    start = time.perf_counter()
    for _ in range(3):
        fn()
        _sync(device)
        if time.perf_counter() - start > 0.5:
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps:
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times) * 1e3


def _peak_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Peak allocated GPU bytes while `fn` runs (everything resident included); None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _kv_nbytes(kvs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    return 0 if kvs is None else sum(k.nbytes + v.nbytes for k, v in kvs)


@torch.no_grad()
def cost_bench(exp: Export, ks: Sequence[int], reps: int, device: str, seed: int,
               t0: float) -> dict[str, Any]:
    """Query latency, memory held between queries and absorption cost vs k (batch 1)."""
    task, vocab, core = exp.task, exp.vocab, exp.core
    kmax = max(ks)
    fam = exp.seen[0]
    b = family_batch([fam], 1, kmax, 1, seed, task["size"], vocab, key=31337)
    ct, cl, cv = (b[n].to(device) for n in ("ctx_token", "ctx_label", "ctx_value"))
    q = (b["q_token"].to(device), b["q_value"].to(device), b["q_label"].to(device))
    arch = dict(exp.record["base_record"]["arch"], n_positions=kmax + task["n_query"] + 1)
    with seeded(seed):
        icl = TinyGPT(**arch).to(device).eval().requires_grad_(False)
    saved_nbytes = sum(a.linear.weight[a.rows].nbytes for a in core.absorptions.values())
    rows = []
    for k in ks:
        log(f"cost: {exp.name}, k = {k}", t0)
        row: dict[str, Any] = {"k": k}

        def absorb(k: int = k) -> None:
            core.reset_state(1)
            core.absorb(ct[:, :k], cv[:, :k], label_tokens=cl[:, :k])

        absorb_ms = median_ms(absorb, max(3, min(reps, 20)), device, budget_s=3.0, min_reps=3)
        row["absorb_ms"] = absorb_ms
        row["absorb_ms_per_demo"] = absorb_ms / k
        absorb()
        row["state_nbytes"] = core.state_nbytes
        row["sa_cache_nbytes"] = _kv_nbytes(core.stream_state()["cache"])
        row["sa_side_ms"] = median_ms(lambda: core.hidden(*q), reps, device)
        row["sa_side_peak_bytes"] = _peak_bytes(lambda: core.hidden(*q), device)
        row["commit_ms"] = median_ms(core.commit, reps, device)
        core.commit()
        row["sa_committed_ms"] = median_ms(lambda: core.hidden(*q), reps, device)
        row["sa_committed_peak_bytes"] = _peak_bytes(lambda: core.hidden(*q), device)
        core.reset_state(1)

        tokens = torch.cat([ct[:, :k], q[0]], 1)
        values = torch.cat([cv[:, :k], q[1]], 1)
        labels = torch.cat([cl[:, :k], q[2]], 1)
        row["icl_nocache_ms"] = median_ms(
            lambda t=tokens, v=values, lab=labels: icl.hidden(t, label_tokens=lab, values=v), reps,
            device)
        row["icl_nocache_peak_bytes"] = _peak_bytes(
            lambda t=tokens, v=values, lab=labels: icl.hidden(t, label_tokens=lab, values=v),
            device)
        del tokens, values, labels
        kv = icl.hidden(ct[:, :k], label_tokens=cl[:, :k], values=cv[:, :k])[1]
        row["icl_kv_nbytes"] = _kv_nbytes(kv)
        row["icl_cached_ms"] = median_ms(
            lambda kv=kv: icl.hidden(q[0], label_tokens=q[2], values=q[1], past_kv=kv), reps,
            device)
        row["icl_cached_peak_bytes"] = _peak_bytes(
            lambda kv=kv: icl.hidden(q[0], label_tokens=q[2], values=q[1], past_kv=kv), device)
        del kv
        rows.append(row)
    core.reset_state(1)
    return {"adapter": exp.path, "family": fam, "rows": rows, "ratios": cost_ratios(rows),
            "committed_weight_copy_nbytes": saved_nbytes,
            "icl_model": "untrained TinyGPT, the base's architecture with n_positions "
                         f"{arch['n_positions']} (latency does not depend on the weights)"}


def cost_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_k = {r["k"]: r for r in rows}
    ks = sorted(by_k)
    lo = 4 if 4 in by_k else ks[0]
    hi = 256 if 256 in by_k else ks[-1]
    out: dict[str, Any] = {"k_lo": lo, "k_hi": hi, "k_max": ks[-1]}
    for name in ("sa_committed_ms", "sa_side_ms", "icl_nocache_ms", "icl_cached_ms"):
        out[name] = by_k[hi][name] / by_k[lo][name]
    out["sa_committed_ms_kmax"] = by_k[ks[-1]]["sa_committed_ms"] / by_k[lo]["sa_committed_ms"]
    lo_a = 64 if 64 in by_k and ks[-1] > 64 else ks[0]
    out["absorb_k_lo"] = lo_a
    out["absorb_ms_per_demo"] = (by_k[ks[-1]]["absorb_ms_per_demo"]
                                 / by_k[lo_a]["absorb_ms_per_demo"])
    out["state_nbytes_equal"] = len({r["state_nbytes"] for r in rows}) == 1
    peaks = [by_k[k]["sa_committed_peak_bytes"] for k in (lo, hi)]
    out["sa_committed_peak"] = None if None in peaks else peaks[1] / peaks[0]
    return out


# ----- the paper's baselines (--baselines) -----------------------------------------------


@dataclass
class Baselines:
    """The baselines of one export: MT-LoRA trained once, the evicting-KV budget, ranks, the
    best constant answer."""

    mt_lora: LoRA
    evict_m: int
    rank: int
    templora_steps: int
    templora_lr: float
    mt_lora_s: float
    mt_lora_info: dict[str, Any]
    constant: dict[int, tuple[int, float]]

    def settings(self) -> dict[str, Any]:
        """What the protocol caption and the JSON record of these baselines."""
        return {"evict_m": self.evict_m, "rank": self.rank,
                "templora_steps": self.templora_steps, "templora_lr": self.templora_lr,
                "mt_lora": self.mt_lora_info, "mt_lora_s": self.mt_lora_s}

    def runs(self, exp: Export, ks: Sequence[int]) -> dict[str, tuple[Callable, list[int]]]:
        vocab, m = exp.vocab, self.evict_m
        return {
            EVICT_LAST: (lambda b: evicted_outputs(exp.base, b, vocab, m, "last"), list(ks)),
            EVICT_ATT: (lambda b: evicted_outputs(exp.base, b, vocab, m, "attended"), list(ks)),
            "TempLoRA": (lambda b: templora_outputs(exp.base, b, vocab, rank=self.rank,
                                                    steps=self.templora_steps,
                                                    lr=self.templora_lr), list(ks)),
            "MT-LoRA": (lambda b: lora_outputs(exp.base, self.mt_lora, b, vocab), list(ks)),
            "best constant": (lambda b: constant_outputs(self.constant, b, vocab), list(ks)),
        }


def training_seed(exp: Export, args: argparse.Namespace) -> int:
    """The run's training seed: `--training-seed`, else the Stage B learner seed recorded."""
    return int(args.training_seed if args.training_seed is not None
               else exp.record.get("seed", 0))


def build_baselines(exp: Export, args: argparse.Namespace, t0: float) -> Baselines:
    rank = exp.core.mappers[str(exp.core.layer_ids[0])].d_head  # ΔW's rank bound
    steps = args.mt_lora_steps if args.mt_lora_steps is not None else int(
        exp.record.get("steps") or 0)
    seed = training_seed(exp, args)
    info = {"rank": args.mt_lora_rank, "lr": args.mt_lora_lr, "steps": steps,
            "per_family": args.mt_lora_per_family, "data_seed": seed,
            "episodes": steps * args.mt_lora_per_family * len(exp.seen)}
    log(f"baselines: {exp.name}, MT-LoRA {info}", t0)
    start = time.perf_counter()
    mt = train_mt_lora(exp.base, exp.seen, exp.vocab, exp.task["size"], exp.task["n_query"],
                       rank=args.mt_lora_rank, steps=steps, lr=args.mt_lora_lr,
                       per_family=args.mt_lora_per_family, seed=seed)
    mt_s = time.perf_counter() - start
    const = fit_constant([*exp.seen, *exp.unseen], exp.vocab, exp.task["size"],
                         exp.task["n_query"], DEV_SEED)
    return Baselines(mt, evict_window(exp.core.state_nbytes, exp.base), rank,
                     args.templora_steps, args.templora_lr, mt_s, info, const)


def baseline_cost(exp: Export, bl: Baselines, ks: Sequence[int], reps: int, device: str,
                  seed: int) -> list[dict[str, Any]]:
    """Per method and k (batch 1): query ms, bytes held between queries, adaptation ms/demo.

    Adaptation: SA's absorption; most-attended eviction's scoring passes (the last-m policy
    needs none); TempLoRA's training (median of 3). Held: SA's state; the kept demos' KV
    (most attended: plus their float32 scores); one context's LoRA factors (TempLoRA's Adam
    moments, twice that, live only while it trains)."""
    vocab, task, core = exp.vocab, exp.task, exp.core
    n_pos = exp.base.n_positions - task["n_query"]  # the passes of the skill runs
    tl_lora = LoRA(exp.base, bl.rank, n_ctx=1).to(device)  # TempLoRA's rank, for its query
    rows = []
    for k in ks:
        b = family_batch([exp.seen[0]], 1, k, 1, seed, task["size"], vocab, key=4242)
        b = {n: t.to(device) for n, t in b.items()}
        q = (b["q_token"], b["q_value"], b["q_label"])

        def absorb(b: dict = b) -> None:
            core.reset_state(1)
            core.absorb(b["ctx_token"], b["ctx_value"], label_tokens=b["ctx_label"])

        absorb_ms = median_ms(absorb, 5, device, budget_s=1.0, min_reps=3)
        absorb()
        core.commit()
        sa_q = median_ms(lambda q=q: core.hidden(*q), reps, device, budget_s=1.0)
        core.reset_state(1)
        m = min(k, bl.evict_m)
        kv = exp.base.hidden(b["ctx_token"][:, k - m:], label_tokens=b["ctx_label"][:, k - m:],
                             values=b["ctx_value"][:, k - m:])[1] if m else None
        ev_q = median_ms(lambda kv=kv, q=q: exp.base.hidden(
            q[0], label_tokens=q[2], values=q[1], past_kv=kv), reps, device, budget_s=1.0)
        att_ms = median_ms(lambda b=b: most_attended(exp.base, b, bl.evict_m, n_pos), 5, device,
                           budget_s=1.0, min_reps=3)
        tl_ms = median_ms(lambda b=b: templora_outputs(
            exp.base, b, vocab, rank=bl.rank, steps=bl.templora_steps, lr=bl.templora_lr), 3,
            device, budget_s=1.0, min_reps=1)
        mt_q = median_ms(lambda b=b: lora_outputs(exp.base, bl.mt_lora, b, vocab), reps,
                         device, budget_s=1.0)
        tl_q = median_ms(lambda b=b: lora_outputs(exp.base, tl_lora, b, vocab), reps,
                         device, budget_s=1.0)
        kv_b = m * kv_bytes_per_position(exp.base)
        rows += [
            {"method": "StreamAdapter", "k": k, "query_ms": sa_q, "held_nbytes": core.state_nbytes,
             "adapt_ms_per_demo": absorb_ms / k},
            {"method": EVICT_LAST, "k": k, "query_ms": ev_q, "held_nbytes": kv_b,
             "adapt_ms_per_demo": None},
            {"method": EVICT_ATT, "k": k, "query_ms": ev_q, "held_nbytes": kv_b + 4 * m,
             "adapt_ms_per_demo": att_ms / k},
            {"method": "TempLoRA", "k": k, "query_ms": tl_q,
             "held_nbytes": tl_lora.nbytes_per_context, "adapt_ms_per_demo": tl_ms / k},
            {"method": "MT-LoRA", "k": k, "query_ms": mt_q,
             "held_nbytes": bl.mt_lora.nbytes_per_context, "adapt_ms_per_demo": None},
        ]
    tl_lora.remove()
    core.reset_state(1)
    return rows


def protocol_caption(n_episodes: int, eval_seeds: Sequence[int], bl: dict[str, Any],
                     episodes: dict[int, dict[str, Any]] | None, train_seeds: Sequence[int],
                     over: str = "evaluation seeds") -> str:
    """What the protocol table holds, for the bench and `--combine`."""
    digests = ""
    if episodes:
        digests = "; ".join(f"eval seed {s}: " + ", ".join(sorted({d["digest"] for d in
                                                                    v.values()}))
                            for s, v in episodes.items())
        digests = f" (episode digests {digests})"
    mt = bl["mt_lora"]
    return (f"Skill (regression max(0, 1 − nMSE)), {n_episodes} episodes per cell, mean ± sd "
            f"over {over}; training seed(s) {list(train_seeds)}, evaluation seeds "
            f"{list(eval_seeds)}. Every method ran on exactly the same episodes per (family, "
            f"k) — checked by a digest of every batch each method was given{digests}. ICL "
            f"holds k ≤ W demos; evicting KV keeps {bl['evict_m']} demos (their KV fits in the "
            "adapter state's bytes; re-encoded from position 0): the last ones, or the most "
            "attended (H2O accumulated attention, the context streamed in passes of W "
            f"positions); TempLoRA: rank {bl['rank']} (the adapter's d_h), "
            f"{bl['templora_steps']} Adam steps (lr {bl['templora_lr']:g}) per context on its "
            "demos asked alone; MT-LoRA: "
            f"rank {mt['rank']}, lr {mt['lr']:g}, {mt['steps']} steps × {mt['per_family']} "
            f"episodes per seen family ({mt['episodes']:,} episodes), no context; the settings "
            "of both chosen on development episodes (seen families, dev seed "
            f"{DEV_SEED}: tools/stream_adapter_baseline_tune.py); best constant: each family's "
            "majority label (regression: mean y) on development episodes — the chance line "
            "of any method without context (random label maps: 1 / n_labels, their labels "
            "are drawn per episode from the whole label block).")


def protocol_table(per_seed: list[dict[str, Curve]], fams: dict[str, dict[str, Any]],
                   window: int) -> list[str]:
    """Mean over seeds (± sd when several) per family and split average, at k ∈ {4, W, 4W,
    16W}: skill (regression max(0, 1 − nMSE)); ICL only up to W."""
    ks = sorted({4, window, 4 * window, 16 * window})
    head = "| family | split | method | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|---|---|---|" + "---:|" * len(ks)]

    def cell(vals: list[float]) -> str:
        if not vals:
            return "—"
        mean = sum(vals) / len(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else None
        return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    groups = {**{f: [f] for f in fams},
              "**seen avg**": [f for f, i in fams.items() if i["split"] == "seen"],
              "**unseen avg**": [f for f, i in fams.items() if i["split"] == "unseen"]}
    for name, members in groups.items():
        if not members:
            continue
        split = fams[name]["split"] if name in fams else name.strip("*").split()[0]
        for method in PROTOCOL_METHODS:
            cells = []
            for k in ks:
                vals = []
                for curves in per_seed:
                    rows = [_row(curves, method, f, k) for f in members]
                    if rows and all(r is not None for r in rows):
                        vals.append(sum(r["skill"] for r in rows) / len(rows))
                cells.append(cell(vals))
            label = f"`{name}`" if name in fams else name
            lines.append(f"| {label} | {split} | {method} | " + " | ".join(cells) + " |")
    return lines


def baseline_cost_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | k | query ms | held between queries | adaptation ms/demo |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ad = "—" if r["adapt_ms_per_demo"] is None else f"{r['adapt_ms_per_demo']:.3f}"
        lines.append(f"| {r['method']} | {r['k']} | {r['query_ms']:.3f} | "
                     f"{_bytes(r['held_nbytes'])} | {ad} |")
    return lines


# ----- claims --------------------------------------------------------------------------------


def _row(curves: dict[str, Curve], method: str, fam: str, k: int) -> dict[str, float] | None:
    return curves.get(method, {}).get(fam, {}).get(k)


def _avg(curves: dict[str, Curve], method: str, fams: Sequence[str], k: int
         ) -> tuple[float, float] | None:
    rows = [_row(curves, method, f, k) for f in fams]
    if not rows or any(r is None for r in rows):
        return None
    se = math.sqrt(sum(r["se"] ** 2 for r in rows)) / len(rows)
    return sum(r["skill"] for r in rows) / len(rows), se


def _claim(cid: str, text: str, ok: bool | None, numbers: str) -> dict[str, Any]:
    return {"id": cid, "claim": text, "pass": ok, "numbers": numbers}


def _all(oks: list[bool | None]) -> bool | None:
    return None if not oks or None in oks else all(oks)


def _score(row: dict[str, float]) -> float:
    """Per-family comparisons: accuracy, or 1 − nMSE unclipped (skill clips it at 0, which
    would tie two failing regressions)."""
    return 1.0 - row["nmse"] if "nmse" in row else row["skill"]


def _show(row: dict[str, float]) -> str:
    return f"nMSE {row['nmse']:.3f}" if "nmse" in row else f"{row['skill']:.3f}"


def skill_claims(curves: dict[str, Curve], seen: list[str], unseen: list[str], window: int,
                 ks: Sequence[int], a0: float) -> list[dict[str, Any]]:
    """The §7 skill claims. Averages are of skill (regression max(0, 1 − nMSE)), with the SE
    of a mean of independent family means; per-family comparisons use `_score`."""
    w = window
    sa_m, icl_m = "StreamAdapter", "ICL"
    out = [_claim("A0", "empty state = zero-shot (max abs diff of outputs, side branch and "
                  "committed)", a0 < 1e-6, f"{a0:.2e}")]

    oks, nums = [], []
    for k in sorted({4, w}):
        sa, icl = _avg(curves, sa_m, seen, k), _avg(curves, icl_m, seen, k)
        if sa is None or icl is None:
            oks.append(None)
            continue
        worse = []
        for f in seen:
            r, c = _row(curves, sa_m, f, k), _row(curves, icl_m, f, k)
            if _score(r) < _score(c) - 2 * math.hypot(r["se"], c["se"]):
                worse.append(f)
        oks.append(sa[0] >= icl[0] and not worse)
        nums.append(f"k={k}: {sa[0]:.3f} vs {icl[0]:.3f}"
                    + (f", worse by > 2 SE: {', '.join(worse)}" if worse else ""))
    out.append(_claim("A1", "seen avg: SA ≥ ICL at k ∈ {4, W}; no family worse by > 2 SE",
                      _all(oks), "; ".join(nums) or "n/a"))

    oks, nums = [], []
    for k in sorted({4, w}):
        sa, icl = _avg(curves, sa_m, unseen, k), _avg(curves, icl_m, unseen, k)
        if sa is None or icl is None:
            oks.append(None)
            continue
        se = math.hypot(sa[1], icl[1])
        oks.append(sa[0] >= icl[0] - 2 * se)
        nums.append(f"k={k}: {sa[0]:.3f} vs {icl[0]:.3f} (2 SE {2 * se:.3f})")
    out.append(_claim("A2", "unseen avg: SA ≥ ICL − 2 SE at k ∈ {4, W}", _all(oks),
                      "; ".join(nums) or "n/a"))

    oks, nums = [], []
    for f in seen:
        a, b = _row(curves, sa_m, f, 4 * w), _row(curves, sa_m, f, w)
        oks.append(None if a is None or b is None else _score(a) >= _score(b))
        if a and b:
            nums.append(f"{f} {_show(a)} vs {_show(b)}")
    sa, tr = _avg(curves, sa_m, seen, 4 * w), _avg(curves, "truncated ICL", seen, 4 * w)
    oks.append(None if sa is None or tr is None else sa[0] > tr[0])
    if sa and tr:
        nums.append(f"seen avg SA(4W) {sa[0]:.3f} vs truncated ICL(4W) {tr[0]:.3f}")
    out.append(_claim("A3", "every seen family SA(4W) ≥ SA(W); seen avg SA(4W) > truncated "
                      "ICL(4W)", _all(oks), "; ".join(nums) or "n/a"))

    oks, nums = [], []
    for f in seen:
        a, b = _row(curves, sa_m, f, w), _row(curves, sa_m, f, 1)
        z = _row(curves, "zero-shot", f, 0)
        if a is None or b is None or z is None:
            oks.append(None)
            continue
        oks.append(_score(a) > _score(b) > _score(z))
        nums.append(f"{f} {_show(a)} > {_show(b)} > {_show(z)}")
    out.append(_claim("A4", "SA(W) > SA(1) > zero-shot on every seen family", _all(oks),
                      "; ".join(nums) or "n/a"))

    oks, nums = [], []
    for f in [f for f in (*seen, *unseen) if f in TINY_FAMILIES]:
        a, c = _row(curves, sa_m, f, w), _row(curves, icl_m, f, w)
        if a is None or c is None:
            oks.append(None)
            continue
        oks.append(a["skill"] >= c["skill"] - 0.15)
        nums.append(f"{f} {a['skill'] - c['skill']:+.3f}")
    out.append(_claim("tiny", "skill SA(W) ≥ ICL(W) − 0.15 on regression, logistic, boolean "
                      "families", _all(oks), "; ".join(nums) or "n/a"))

    for split, fams in (("seen", seen), ("unseen", unseen)):
        above, below, within = [], [], []
        for k in [k for k in ks if 1 <= k <= w]:
            sa, icl = _avg(curves, sa_m, fams, k), _avg(curves, icl_m, fams, k)
            if sa is None or icl is None:
                continue
            (above if sa[0] >= icl[0] else below).append(k)
            if sa[0] >= icl[0] - 2 * math.hypot(sa[1], icl[1]):
                within.append(k)
        out.append(_claim(
            f"{split} by k", f"{split} avg: SA ≥ ICL − 2 SE at some k ≤ W",
            bool(within) if (above or below) else None,
            f"SA ≥ ICL at k = {above or '—'}; SA < ICL at k = {below or '—'}; "
            f"SA ≥ ICL − 2 SE at k = {within or '—'}"))
    return out


def cost_claims(cost: dict[str, Any]) -> list[dict[str, Any]]:
    r, rows = cost["ratios"], cost["rows"]
    lo, hi, kmax = r["k_lo"], r["k_hi"], r["k_max"]
    kv = [x["icl_kv_nbytes"] for x in rows]
    ms = [x["icl_nocache_ms"] for x in rows]
    c1 = r["sa_committed_ms"] <= 1.1 and r["sa_committed_ms_kmax"] <= 1.1
    c2 = r["state_nbytes_equal"] and (r["sa_committed_peak"] is None
                                      or r["sa_committed_peak"] <= 1.05)
    peak = "n/a (CPU)" if r["sa_committed_peak"] is None else f"{r['sa_committed_peak']:.3f}×"
    grows = all(b > a for a, b in zip(kv, kv[1:])) and ms[-1] > ms[0]
    return [
        _claim("C1", f"committed SA latency at k = {hi}"
               + (f" (and {kmax})" if kmax != hi else "") + f" ≤ 1.1× at k = {lo}", c1,
               f"{r['sa_committed_ms']:.2f}×"
               + (f" ({r['sa_committed_ms_kmax']:.2f}× at {kmax})" if kmax != hi else "")),
        _claim("C2", f"state_nbytes equal for all k; GPU peak at k = {hi} ≤ 1.05× at {lo}", c2,
               f"state {', '.join(_bytes(n) for n in sorted({x['state_nbytes'] for x in rows}))}"
               f"; peak {peak}"),
        _claim("C3", "ICL latency and KV bytes grow with k (reported)", grows,
               f"no cache {r['icl_nocache_ms']:.1f}×, cached {r['icl_cached_ms']:.2f}× "
               f"(k = {hi} / {lo}); KV {_bytes(kv[0])} → {_bytes(kv[-1])}"),
        _claim("C4", f"absorption ms/demo at k = {kmax} ≤ 1.2× at k = {r['absorb_k_lo']}",
               r["absorb_ms_per_demo"] <= 1.2, f"{r['absorb_ms_per_demo']:.2f}×"),
    ]


# ----- report --------------------------------------------------------------------------------


def _cell(row: dict[str, float] | None, regression: bool) -> str:
    if row is None:
        return "—"
    value = row["nmse"] if regression else row["skill"]
    return f"{value:.3f} ± {row['se']:.3f}"


def skill_table(curves: dict[str, Curve], fams: dict[str, dict[str, Any]], ks: list[int]
                ) -> list[str]:
    lines = ["| family | split | method | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|---|---|" + "---:|" * len(ks)]
    for fam, info in fams.items():
        reg = fam in REGRESSION
        label = f"`{fam}` (nMSE ↓)" if reg else f"`{fam}` (acc)"
        for method in METHODS:
            cells = [_cell(_row(curves, method, fam, k), reg) for k in ks]
            lines.append(f"| {label} | {info['split']} | {method} | " + " | ".join(cells) + " |")
    return lines


def summary_table(curves: dict[str, Curve], fams: dict[str, dict[str, Any]], window: int
                  ) -> list[str]:
    """StreamAdapter against the best in-context baseline at each k (ICL up to W, truncated
    ICL beyond): `SA / ICL`, nMSE for regression (lower is better), accuracy otherwise."""
    ks = [k for k in (4, window, 4 * window, 16 * window)
          if any(_row(curves, "StreamAdapter", f, k) for f in fams)]
    head = [f"k={k} ({'SA / ICL' if k <= window else 'SA / trunc. ICL'})" for k in ks]
    lines = ["| family | split | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(ks)]
    for fam, info in fams.items():
        reg = fam in REGRESSION
        cells = []
        for k in ks:
            sa = _row(curves, "StreamAdapter", fam, k)
            icl = _row(curves, "ICL" if k <= window else "truncated ICL", fam, k)
            if sa is None or icl is None:
                cells.append("—")
                continue
            a, b = (sa["nmse"], icl["nmse"]) if reg else (sa["skill"], icl["skill"])
            better = a <= b if reg else a >= b
            cell = f"{a:.3f} / {b:.3f}"
            cells.append(f"**{cell}**" if better else cell)
        label = f"`{fam}` (nMSE)" if reg else f"`{fam}` (acc)"
        lines.append(f"| {label} | {info['split']} | " + " | ".join(cells) + " |")
    return lines


def _mark(ok: bool | None) -> str:
    return {True: "pass", False: "**fail**", None: "n/a"}[ok]


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a (CPU)"
    return f"{n:,} B" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def cost_table(cost: dict[str, Any]) -> list[str]:
    lines = ["| k | absorb ms/demo | commit ms | SA committed ms | SA side ms | SA state | "
             "SA encoder cache | ICL no-cache ms | ICL cached ms | ICL KV cache | "
             "GPU peak/query: SA committed · ICL cached |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cost["rows"]:
        peak = ("n/a (CPU)" if r["sa_committed_peak_bytes"] is None else
                f"{_bytes(r['sa_committed_peak_bytes'])} · {_bytes(r['icl_cached_peak_bytes'])}")
        lines.append(
            f"| {r['k']} | {r['absorb_ms_per_demo']:.3f} | {r['commit_ms']:.3f} | "
            f"{r['sa_committed_ms']:.3f} | {r['sa_side_ms']:.3f} | {_bytes(r['state_nbytes'])} | "
            f"{_bytes(r['sa_cache_nbytes'])} | {r['icl_nocache_ms']:.3f} | "
            f"{r['icl_cached_ms']:.3f} | {_bytes(r['icl_kv_nbytes'])} | {peak} |")
    rt = cost["ratios"]
    lines += ["", f"Latency ratio k = {rt['k_hi']} / k = {rt['k_lo']}: SA committed "
              f"{rt['sa_committed_ms']:.2f}×, SA side branch {rt['sa_side_ms']:.2f}×, ICL no "
              f"cache {rt['icl_nocache_ms']:.2f}×, ICL cached {rt['icl_cached_ms']:.2f}×. "
              f"Absorption ms/demo k = {rt['k_max']} / k = {rt['absorb_k_lo']}: "
              f"{rt['absorb_ms_per_demo']:.2f}×.",
              "", f"ICL is timed on an {cost['icl_model']}. Context: `{cost['family']}` demos. "
              "SA encoder cache: the KV of the unfinished encoding block, held until it fills. "
              "While committed, SA also keeps an exact copy of the target weights for a bitwise "
              f"uncommit: {_bytes(cost['committed_weight_copy_nbytes'])} at every k."]
    return lines


def skill_figure(curves: dict[str, Curve], window: int, path: str) -> None:
    from adaptlab.figures import demo_curve_figure, plt

    fig = demo_curve_figure(curves, title="StreamAdapter vs ICL: skill vs demonstrations "
                            "(regression: max(0, 1 − nMSE))", window=window)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_figure(costs: list[dict[str, Any]], path: str) -> None:
    from adaptlab.figures import plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lat = {"SA committed": "sa_committed_ms", "SA side branch": "sa_side_ms",
           "ICL no cache": "icl_nocache_ms", "ICL cached": "icl_cached_ms",
           "SA absorb (total)": "absorb_ms"}
    mem = {"SA state": "state_nbytes", "SA encoder cache": "sa_cache_nbytes",
           "ICL KV cache": "icl_kv_nbytes"}
    for cost in costs:
        tag = f" [{Path(cost['adapter']).stem}]" if len(costs) > 1 else ""
        ks = [r["k"] for r in cost["rows"]]
        for label, key in lat.items():
            ax1.plot(ks, [r[key] for r in cost["rows"]], marker="o", ms=3, label=label + tag,
                     ls="--" if "absorb" in label else "-")
        for label, key in mem.items():
            vals = [r[key] for r in cost["rows"]]
            ax2.plot([k for k, v in zip(ks, vals) if v > 0], [v for v in vals if v > 0],
                     marker="o", ms=3, label=label + tag)
    for ax, ylabel in ((ax1, "ms (median)"), (ax2, "bytes held between queries")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("demonstrations k")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax1.set_title("query latency (batch 1, one query)", fontsize=9)
    ax2.set_title("memory held between queries", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", nargs="+", default=list(DEFAULT_ADAPTERS),
                    help="Stage B exports (StreamAdapter(export=…))")
    ap.add_argument("--base", default=None,
                    help="the Stage A export (default: the path each adapter recorded)")
    ap.add_argument("--episodes", type=int, default=None,
                    help="episodes per (family, k) (default 512; 16 with --quick)")
    ap.add_argument("--seed", type=int, default=4321, help="evaluation episodes (all methods)")
    ap.add_argument("--latency-ks", type=int, nargs="+", default=None,
                    help="demo counts of the cost table (default "
                    f"{' '.join(map(str, LATENCY_KS))}; 4 16 64 with --quick)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per (method, k), within ~2 s (default 200; 5 with --quick)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 16 episodes, k ∈ {0, 1, 4, W, 4W}, latency k 4 16 64")
    ap.add_argument("--baselines", action="store_true",
                    help="add evicting KV (last, most attended), TempLoRA, MT-LoRA and the "
                    "best constant, and the protocol table")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="with --baselines: evaluation seeds of the protocol table (default: "
                    "--seed)")
    ap.add_argument("--training-seed", type=int, default=None,
                    help="with --baselines: this run's training seed (its base and adapter; "
                    "MT-LoRA's data seed); default the adapter's recorded learner seed")
    ap.add_argument("--templora-steps", type=int, default=TEMPLORA_STEPS)
    ap.add_argument("--templora-lr", type=float, default=TEMPLORA_LR)
    ap.add_argument("--mt-lora-steps", type=int, default=None,
                    help="default: the adapter's Stage B steps (the same number of episodes "
                    "with --mt-lora-per-family = Stage B's per_family)")
    ap.add_argument("--mt-lora-per-family", type=int, default=16)
    ap.add_argument("--mt-lora-rank", type=int, default=MT_LORA_RANK)
    ap.add_argument("--mt-lora-lr", type=float, default=MT_LORA_LR)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="output prefix: <out>.md, <out>.json, <out>_skill.png, <out>_cost.png")
    args = ap.parse_args(argv)
    if args.episodes is None:
        args.episodes = 16 if args.quick else 512
    if args.latency_ks is None:
        args.latency_ks = list(QUICK_LATENCY_KS if args.quick else LATENCY_KS)
    if args.reps is None:
        args.reps = 5 if args.quick else 200
    args.latency_ks = sorted(set(args.latency_ks))
    return args


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    if args.episodes < 2 or args.reps < 1 or args.threads < 1:
        raise ValueError("--episodes >= 2, --reps >= 1 and --threads >= 1 required")
    if min(args.latency_ks) < 1 or len(args.latency_ks) < 2:
        raise ValueError("--latency-ks: at least two demo counts, each >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    exports = [load_export(p, args.base, args.device) for p in args.adapters]

    methods = [*METHODS, *BASELINES] if args.baselines else list(METHODS)
    curves: dict[str, Curve] = {m: {} for m in methods}
    fams: dict[str, dict[str, Any]] = {}
    a0: dict[str, Any] = {}
    all_ks: set[int] = set()
    bls: dict[str, Baselines] = {}
    protocol: list[dict[str, Curve]] = []
    episodes: dict[int, dict[str, Any]] = {args.seed: {}}  # eval seed -> adapter -> digest
    for exp in exports:
        ks = sweep_ks(exp.window, args.quick)
        if args.baselines:  # the protocol table's k ∈ {4, W, 4W, 16W}, also with --quick
            ks = sorted({*ks, 4, exp.window, 4 * exp.window, 16 * exp.window})
        all_ks.update(ks)
        a0[exp.path] = check_a0(exp, args.seed, args.device)
        extra = None
        if args.baselines:
            bls[exp.path] = build_baselines(exp, args, t0)
            extra = bls[exp.path].runs(exp, ks)
        with torch.no_grad():
            got = skill_curves(exp, ks, args.episodes, args.seed, args.device, t0, extra,
                               episodes[args.seed])
        for fam in [*exp.seen, *exp.unseen]:
            if fam in fams:
                raise ValueError(f"--adapters: family {fam!r} is evaluated by two exports; "
                                 "benchmark them separately")
            fams[fam] = {"split": "seen" if fam in exp.seen else "unseen",
                         "adapter": exp.path, "window": exp.window}
            for m in methods:
                curves[m][fam] = got[m][fam]
    if args.baselines:
        protocol.append(curves)
        for seed in [s for s in (args.seeds or [args.seed]) if s != args.seed]:
            more: dict[str, Curve] = {m: {} for m in PROTOCOL_METHODS}
            episodes[seed] = {}
            for exp in exports:
                w = exp.window
                pks = sorted({4, w, 4 * w, 16 * w})
                with torch.no_grad():
                    got = skill_curves(exp, pks, args.episodes, seed, args.device, t0,
                                       bls[exp.path].runs(exp, pks), episodes[seed])
                for m in PROTOCOL_METHODS:
                    for fam in got[m]:
                        more[m][fam] = got[m][fam]
            protocol.append(more)
    skill_s = time.perf_counter() - t0

    windows = sorted({e.window for e in exports})
    seen = [f for f, i in fams.items() if i["split"] == "seen"]
    unseen = [f for f, i in fams.items() if i["split"] == "unseen"]
    a0_max = max(v["max_abs_diff"] for v in a0.values())
    if len(windows) > 1:
        raise ValueError(f"--adapters: exports on bases of different windows {windows}")
    claims = skill_claims(curves, seen, unseen, windows[0], sorted(all_ks), a0_max)

    costs, groups = [], set()
    for exp in exports:  # one cost table per distinct (base architecture, adapter settings)
        key = json.dumps([exp.record["base_record"]["arch"], exp.record["adapter_args"]],
                         sort_keys=True)
        if key in groups:
            continue
        groups.add(key)
        costs.append(cost_bench(exp, args.latency_ks, args.reps, args.device, args.seed, t0))
    for cost in costs:
        claims += cost_claims(cost)
    wall = time.perf_counter() - t0

    dev = (torch.cuda.get_device_name() if args.device == "cuda"
           else platform.processor() or platform.machine())
    e0 = exports[0]
    lines = ["# StreamAdapter benchmark (docs/methods/stream_adapter.md)", "",
             f"`{command}`", "",
             f"torch {torch.__version__}, device {args.device} ({dev}), "
             f"{torch.get_num_threads()} torch thread(s), {args.episodes} episodes per "
             f"(family, k), {e0.task['n_query']} queries each, eval seed {args.seed}, "
             f"W = {windows[0]}; wall {wall:.0f} s (skill {skill_s:.0f} s).", ""]
    for exp in exports:
        lines.append(f"- `{exp.path}`: seen {', '.join(exp.seen)}; unseen "
                     f"{', '.join(exp.unseen) or '—'}; Stage B steps "
                     f"{exp.record.get('steps', '?')}; base {exp.record['base_sha256'][:12]}; "
                     f"adapter {exp.record['adapter_args']}")
    lines += ["", "## StreamAdapter vs in-context learning", "",
              "Bold: StreamAdapter at least as good as the in-context baseline at that k.", "",
              *summary_table(curves, fams, windows[0]),
              "", "## Skill vs demonstrations", "",
              "Mean ± SE over episodes: nMSE for regression (lower is better), accuracy "
              "otherwise. zero-shot: the base on each query alone at position 0 (context "
              "ignored); ICL: `d1 … dk q1 … qq` in the window (k ≤ W; at k = 0 the queries "
              "still see each other); truncated ICL: the last W demos; StreamAdapter: each "
              "episode's context absorbed (side branch), queries alone at position 0.", "",
              *skill_table(curves, fams, sorted(all_ks)),
              "", "## Claims", "", "| id | claim | result | numbers |", "|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['claim']} | {_mark(c['pass'])} | {c['numbers']} |"
              for c in claims]
    lines += ["", "Wall-clock claims (C1, C4) are indicative on a shared CPU; the FLOP "
              "equality of C1 is tested in `tests/test_stream_adapter.py`."]
    for cost in costs:
        lines += ["", f"## Cost (batch 1, one query; `{Path(cost['adapter']).name}`)", "",
                  *cost_table(cost)]
    bl_cost: list[dict[str, Any]] = []
    if args.baselines:
        e0w = windows[0]
        bl0 = next(iter(bls.values())).settings()
        lines += ["", "## The paper's protocol: SA vs ICL vs TempLoRA vs MT-LoRA vs evicting KV",
                  "", protocol_caption(args.episodes, args.seeds or [args.seed], bl0,
                                       episodes, [training_seed(e, args) for e in exports]),
                  "", *protocol_table(protocol, fams, e0w)]
        for exp in exports:
            bl_cost += baseline_cost(exp, bls[exp.path], [4, e0w, 16 * e0w], args.reps,
                                     args.device, args.seed)
        lines += ["", "Cost per method (batch 1, one query; TempLoRA and MT-LoRA queried "
                  "through the unmerged LoRA; MT-LoRA is trained once, offline: "
                  + ", ".join(f"{b.mt_lora_s:.0f} s" for b in bls.values()) + "; adaptation "
                  "— : none at test time). Held: what stays in memory between queries.", "",
                  *baseline_cost_table(bl_cost)]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)

    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w", encoding="utf-8") as fh:
        fh.write(text)
    skill_figure(curves, windows[0], out + "_skill.png")
    cost_figure(costs, out + "_cost.png")
    result = {"command": command, "torch": torch.__version__, "device": args.device,
              "device_name": dev, "threads": torch.get_num_threads(), "episodes": args.episodes,
              "seed": args.seed, "window": windows[0], "ks": sorted(all_ks),
              "latency_ks": args.latency_ks, "reps": args.reps, "wall_s": wall,
              "skill_s": skill_s,
              "adapters": [{"path": e.path, "seen": e.seen, "unseen": e.unseen,
                            "steps": e.record.get("steps"), "base_sha256": e.record["base_sha256"],
                            "adapter_args": e.record["adapter_args"]} for e in exports],
              "families": fams, "skill": curves, "a0": a0, "claims": claims, "cost": costs}
    if args.baselines:
        result["protocol"] = {"seeds": args.seeds or [args.seed], "skill": protocol,
                              "cost": bl_cost, "episodes": {str(k): v for k, v in
                                                            episodes.items()},
                              "training_seeds": [training_seed(e, args) for e in exports],
                              "settings": {e.path: bls[e.path].settings()
                                           for e in exports}}
    write_json_atomic(out + ".json", result)
    return result


def combine(paths: Sequence[str], out: str | None) -> str:
    """The protocol table over several `--baselines` runs: `--combine a.json b.json …`.

    Runs of different training seeds (one (base, adapter) pair each): each run's evaluation
    seeds are averaged, then mean ± sd over the training seeds. Runs of one training seed
    (e.g. one per evaluation seed, run in parallel): mean ± sd over all evaluation seeds.
    The cost rows are the mean over runs."""
    docs = [json.load(open(p, encoding="utf-8")) for p in paths]
    train = [tuple(d["protocol"].get("training_seeds", [None])) for d in docs]
    eval_seeds = [s for d in docs for s in d["protocol"]["seeds"]]
    by_training = len(set(train)) == len(docs) > 1
    per_run = []
    for doc in docs:
        runs = [{m: {f: {int(k): r for k, r in by_k.items()} for f, by_k in c.items()}
                 for m, c in curves.items()} for curves in doc["protocol"]["skill"]]
        per_run.append(_mean_curves(runs) if by_training else runs)
    per_seed = per_run if by_training else [c for runs in per_run for c in runs]
    # the same evaluation episodes in every run: one digest per evaluation seed
    digests: dict[str, set[str]] = {}
    for doc in docs:
        for s, v in doc["protocol"].get("episodes", {}).items():
            digests.setdefault(s, set()).update(d["digest"] for d in v.values())
    settings = next(iter(docs[0]["protocol"]["settings"].values()))
    tseeds = sorted({s for t in train for s in t if s is not None})
    uniq = list(dict.fromkeys(eval_seeds))
    over = (f"training seeds {tseeds} (each the mean over its evaluation seeds {uniq})"
            if by_training else
            f"{len(per_seed)} evaluation seeds {eval_seeds}")
    same = all(len(v) == 1 for v in digests.values())
    lines = [f"Protocol table over {over}: mean ± sd.", "",
             protocol_caption(docs[0]["episodes"], uniq, settings,
                              None, tseeds, over=over)
             + " Episode digests per evaluation seed: "
             + "; ".join(f"{s}: {', '.join(sorted(v))}" for s, v in sorted(digests.items()))
             + (" — identical in every run." if same else " — **differ between runs**."), "",
             *protocol_table(per_seed, docs[0]["families"], docs[0]["window"])]
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for doc in docs:
        for r in doc["protocol"]["cost"]:
            rows.setdefault((r["method"], r["k"]), []).append(r)
    mean_rows = []
    for (method, k), rs in rows.items():
        ad = [r["adapt_ms_per_demo"] for r in rs]
        mean_rows.append({"method": method, "k": k,
                          "query_ms": statistics.mean(r["query_ms"] for r in rs),
                          "held_nbytes": max(r["held_nbytes"] for r in rs),
                          "adapt_ms_per_demo": None if None in ad else statistics.mean(ad)})
    lines += ["", f"Cost per method (mean over {len(docs)} run(s); batch 1, one query):", "",
              *baseline_cost_table(mean_rows)]
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(text)
    return text


def _mean_curves(runs: list[dict[str, Curve]]) -> dict[str, Curve]:
    """Skill per (method, family, k) averaged over evaluation-seed runs (cells all have)."""
    out: dict[str, Curve] = {}
    for method in runs[0]:
        for fam in runs[0][method]:
            for k in runs[0][method][fam]:
                vals = [r[method][fam][k]["skill"] for r in runs
                        if k in r.get(method, {}).get(fam, {})]
                if len(vals) == len(runs):
                    out.setdefault(method, {}).setdefault(fam, {})[k] = {
                        "skill": statistics.mean(vals)}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--combine"]:
        outs = [a for a in raw[1:] if a.startswith("--out=")]
        combine([a for a in raw[1:] if not a.startswith("--out=")],
                outs[0].split("=", 1)[1] if outs else None)
        return {}
    command = shlex.join(["python", "tools/stream_adapter_bench.py", *raw])
    try:
        args = parse_args(raw)
        return run(args, command)
    except (FileNotFoundError, ValueError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        sys.exit(f"stream_adapter_bench: error: {msg}")


if __name__ == "__main__":
    main()
