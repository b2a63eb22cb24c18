"""The gate and chunk/block ablation of StreamAdapter's Stage B, with recency (issue 18).

    python tools/stream_adapter_ablation.py --base artifacts/tinygpt_pool.pt --steps 1500

Trains one multi-task adapter (`configs/stream_adapter/multitask.yaml`, shortened to
`--steps`) per setting of the grid — gate bias (initial `b_g`) × (chunk C, block B_enc) —
then reports per setting: Stage B's own skill at k ∈ {1, 4, W, 4W} (seen average over its
512 evaluation episodes) and the **recency** of the trained gate: on 4W-demo contexts of the
seen families, each chunk's weight in the final state (`ContextMapper.chunk_weights`),
averaged over episodes, layers, heads and slots — the newest chunk's weight against the
oldest's, and the share of slots where the newest weighs at least as much. Recency holds
when that share is ≥ 0.5 and the newest chunk's mean weight ≥ the oldest's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from adaptlab.strategies.stream_adapter import load_adapter
from adaptlab.streams.icl import SEEN, FamilyVocab, family_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stream_adapter" / "multitask.yaml"


def train(base: str, out: str, steps: int, gate_bias: float, chunk: int, block: int,
          threads: int) -> str:
    export = os.path.join(out, f"g{gate_bias:+g}_c{chunk}_b{block}.pt")
    if os.path.exists(export):
        return export
    cmd = [sys.executable, "-m", "adaptlab.cli", "fit", "--config", str(CONFIG),
           "--model.init_args.base", base, "--model.init_args.export", export,
           "--model.init_args.gate_bias", str(gate_bias), "--model.init_args.chunk_size",
           str(chunk), "--model.init_args.block_size", str(block), "--trainer.max_steps",
           str(steps), "--data.init_args.steps", str(steps), "--model.init_args.eval_every",
           "0", "--trainer.logger.init_args.save_dir", os.path.join(out, "logs"),
           "--trainer.logger.init_args.version", Path(export).stem, "--threads", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        sys.exit(f"ablation: {Path(export).stem} failed: {run.stderr[-800:]}")
    return export


@torch.no_grad()
def recency(export: str, episodes: int = 128, seed: int = 99) -> dict[str, float]:
    """Chunk weights of the final state on 4W-demo contexts of the seen families."""
    core, rec = load_adapter(export)
    core.eval()
    task = rec["base_record"]["task"]
    vocab = FamilyVocab(task["n_items"], task["n_labels"])
    k = 4 * task["window"]
    weights = []
    for fam in [f for f in SEEN if f in rec["families"]]:
        b = family_batch([fam], episodes, k, 1, seed, task["size"], vocab, key=5)
        kvs = [[] for _ in core.layer_ids]
        for lo in range(0, k, core.block_size):  # every block from position 0, as absorb
            hi = lo + core.block_size
            _, kv = core.base.hidden(b["ctx_token"][:, lo:hi], label_tokens=b["ctx_label"][
                :, lo:hi], values=b["ctx_value"][:, lo:hi])
            for j, i in enumerate(core.layer_ids):
                kvs[j].append(kv[i])
        for j, i in enumerate(core.layer_ids):
            kk = torch.cat([x for x, _ in kvs[j]], 2)
            vv = torch.cat([y for _, y in kvs[j]], 2)
            weights.append(core.mappers[str(i)].chunk_weights(kk, vv, core.chunk_size)
                           .flatten(0, 2))
    w = torch.cat(weights)  # (slots, n_chunks)
    return {"chunks": w.shape[1], "newest": float(w[:, -1].mean()),
            "oldest": float(w[:, 0].mean()),
            "share_newest_ge_oldest": float((w[:, -1] >= w[:, 0]).float().mean()),
            "mean_by_chunk": [round(float(x), 4) for x in w.mean(0)]}


def stage_b_skill(out: str, name: str) -> dict[str, Any]:
    doc = json.load(open(os.path.join(out, "logs", "stream_adapter", name, "metrics.json")))
    curve = doc["stage_b"]["adapter_curve"]
    ks = sorted({int(k) for by_k in curve.values() for k in by_k})
    return {str(k): sum(curve[f][str(k) if str(k) in curve[f] else k]["skill"]
                        for f in curve) / len(curve) for k in ks}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the Stage A export (pool-pretrained)")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "ablation"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--gate-bias", type=float, nargs="+", default=[2.0, 0.0, -2.0])
    ap.add_argument("--chunks", nargs="+", default=["16:16", "4:16"],
                    help="chunk:block pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for gb, cb in itertools.product(args.gate_bias, args.chunks):
        c, b = (int(x) for x in cb.split(":"))
        export = train(args.base, args.out, args.steps, gb, c, b, args.threads)
        if args.train_only:
            continue
        rows.append({"gate_bias": gb, "chunk": c, "block": b,
                     "skill_seen": stage_b_skill(args.out, Path(export).stem),
                     "recency": recency(export)})
    if args.train_only:
        return
    lines = [f"`python tools/stream_adapter_ablation.py {' '.join(argv or sys.argv[1:])}`", "",
             "| gate bias | C / B_enc | seen skill k=1 | k=4 | k=W | k=4W | chunks at 4W | "
             "newest / oldest weight | share newest ≥ oldest |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, rc = r["skill_seen"], r["recency"]
        cells = " | ".join(f"{v:.3f}" for v in s.values())
        lines.append(f"| {r['gate_bias']:+g} | {r['chunk']} / {r['block']} | {cells} | "
                     f"{rc['chunks']} | {rc['newest']:.3f} / {rc['oldest']:.3f} | "
                     f"{rc['share_newest_ge_oldest']:.2f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
