"""Tune the StreamAdapter paper's baselines on development episodes, never on the test ones.

    python tools/stream_adapter_baseline_tune.py --base artifacts/tinygpt_pool.pt

The baselines of `tools/stream_adapter_bench.py --baselines` have settings of their own:
TempLoRA its Adam steps per context and learning rate (its rank is fixed by the rank budget,
the adapter's `d_h`), multi-task LoRA its learning rate and rank. This grid-searches them on
the *seen* families only, on development episodes (`--dev-seed`, default 777, which is no
evaluation seed of the bench's protocol runs and no training data seed), scored by the same
`demo_curve` as the bench (skill: accuracy, regression max(0, 1 − nMSE)), and prints the
setting with the best mean seen skill — TempLoRA averaged over `--ks`, MT-LoRA at k = 0 (it
ignores context). Freeze the winners as the bench's defaults; the unseen families and the
evaluation seeds never enter the choice.

Writes `<out>.md` and `<out>.json`.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adaptlab.episodes import average_skill, demo_curve
from adaptlab.jsonio import write_json_atomic
from adaptlab.strategies.icl_families import icl_outputs, load_base
from adaptlab.strategies.stream_adapter_baselines import (
    lora_outputs,
    templora_outputs,
    train_mt_lora,
)
from adaptlab.streams.icl import SEEN, FamilyVocab

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(ROOT / "artifacts" / "tinygpt_pool.pt"))
    ap.add_argument("--families", nargs="+", default=list(SEEN), help="the seen families")
    ap.add_argument("--dev-seed", type=int, default=777)
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rank", type=int, default=16, help="TempLoRA's rank (the adapter's d_h)")
    ap.add_argument("--templora-steps", type=int, nargs="+", default=[10, 30, 60])
    ap.add_argument("--templora-lr", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    ap.add_argument("--mt-lora-steps", type=int, default=1500,
                    help="MT-LoRA's tuning budget (steps of 16 episodes per family)")
    ap.add_argument("--mt-lora-lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--mt-lora-rank", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results"
                                         / "stream_adapter_baseline_tune"))
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, rec = load_base(args.base)
    base.eval().requires_grad_(False)
    task = rec["task"]
    vocab = FamilyVocab(task["n_items"], task["n_labels"])
    fams = list(args.families)
    common = {"episodes": args.episodes, "n_query": task["n_query"], "seed": args.dev_seed,
              "size": task["size"], "vocab": vocab}

    def seen_avg(curve: dict, k: int) -> float:
        return average_skill(curve, fams, k)

    with torch.no_grad():
        icl = demo_curve(lambda b: icl_outputs(base, b, vocab),
                         fams, [k for k in args.ks if k <= task["window"]], **common)
    tl_rows = []
    for steps, lr in itertools.product(args.templora_steps, args.templora_lr):
        curve = demo_curve(lambda b, s=steps, r=lr: templora_outputs(
            base, b, vocab, rank=args.rank, steps=s, lr=r), fams, args.ks, **common)
        by_k = {k: seen_avg(curve, k) for k in args.ks}
        tl_rows.append({"steps": steps, "lr": lr, "by_k": by_k,
                        "mean": sum(by_k.values()) / len(by_k)})
        print(f"[{time.perf_counter() - t0:6.0f}s] TempLoRA steps {steps} lr {lr}: {by_k}",
              file=sys.stderr, flush=True)
    mt_rows = []
    for rank, lr in itertools.product(args.mt_lora_rank, args.mt_lora_lr):
        lora = train_mt_lora(base, fams, vocab, task["size"], task["n_query"], rank=rank,
                             steps=args.mt_lora_steps, lr=lr, seed=args.dev_seed + 1)
        with torch.no_grad():
            curve = demo_curve(lambda b, lo=lora: lora_outputs(base, lo, b, vocab), fams, [0],
                               **common)
        lora.remove()
        mt_rows.append({"rank": rank, "lr": lr, "skill": seen_avg(curve, 0),
                        "per_family": {f: curve[f][0]["skill"] for f in fams}})
        print(f"[{time.perf_counter() - t0:6.0f}s] MT-LoRA rank {rank} lr {lr}: "
              f"{mt_rows[-1]['skill']:.3f}", file=sys.stderr, flush=True)
    best_tl = max(tl_rows, key=lambda r: r["mean"])
    best_mt = max(mt_rows, key=lambda r: r["skill"])

    ks = args.ks
    lines = ["# Baseline settings chosen on development episodes", "",
             f"`{shlex.join(['python', 'tools/stream_adapter_baseline_tune.py', *raw])}`", "",
             f"Base `{args.base}` (sha {rec['sha256'][:12]}); seen families {', '.join(fams)}; "
             f"dev seed {args.dev_seed}, {args.episodes} episodes per (family, k); "
             f"{torch.get_num_threads()} thread(s); wall {time.perf_counter() - t0:.0f} s. "
             "Skill: accuracy, regression max(0, 1 − nMSE); seen average.", "",
             f"TempLoRA (rank {args.rank}): mean over k = {ks}; ICL on the same episodes: "
             + ", ".join(f"k={k} {seen_avg(icl, k):.3f}" for k in ks if k in next(iter(
                 icl.values()))) + ".", "",
             "| steps | lr | " + " | ".join(f"k={k}" for k in ks) + " | mean |",
             "|---:|---:|" + "---:|" * (len(ks) + 1)]
    for r in tl_rows:
        mark = "**" if r is best_tl else ""
        lines.append(f"| {mark}{r['steps']}{mark} | {mark}{r['lr']:g}{mark} | "
                     + " | ".join(f"{r['by_k'][k]:.3f}" for k in ks)
                     + f" | {mark}{r['mean']:.3f}{mark} |")
    lines += ["", f"MT-LoRA ({args.mt_lora_steps} steps × 16 episodes per family, data seed "
              f"{args.dev_seed + 1}): seen skill at k = 0 (no context)", "",
              "| rank | lr | " + " | ".join(fams) + " | seen avg |",
              "|---:|---:|" + "---:|" * (len(fams) + 1)]
    for r in mt_rows:
        mark = "**" if r is best_mt else ""
        lines.append(f"| {mark}{r['rank']}{mark} | {mark}{r['lr']:g}{mark} | "
                     + " | ".join(f"{r['per_family'][f]:.3f}" for f in fams)
                     + f" | {mark}{r['skill']:.3f}{mark} |")
    lines += ["", f"Chosen: TempLoRA {best_tl['steps']} steps, lr {best_tl['lr']:g}; MT-LoRA "
              f"rank {best_mt['rank']}, lr {best_mt['lr']:g}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text, encoding="utf-8")
    result = {"args": vars(args), "templora": tl_rows, "mt_lora": mt_rows,
              "chosen": {"templora_steps": best_tl["steps"], "templora_lr": best_tl["lr"],
                         "mt_lora_rank": best_mt["rank"], "mt_lora_lr": best_mt["lr"]}}
    write_json_atomic(args.out + ".json", result)
    return result


if __name__ == "__main__":
    main()
