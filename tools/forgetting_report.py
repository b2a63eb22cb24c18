"""Run the forgetting regimes and report the dual-process pattern (spec `forgetting.md` §8).

    python tools/forgetting_report.py                      # vanilla, active, temporary; seed 0
    python tools/forgetting_report.py --seeds 0 1 2 --jobs 2 --sweep-n 4000
    python tools/forgetting_report.py --from-logs lightning_logs/forgetting_report/logs  # re-report

Each run is `adaptlab fit --config configs/forgetting/bursty_<regime>.yaml` with the seed
overridden everywhere (`seed_everything`, learner, stream, callback); the learner writes its
evaluation curves to `icl_curves.json` in the run's log dir. The report writes
`acceptance.json`, `report.md` (one row per run with its wall time, then the checks) and
`curves.png` (the ICL/IWL curves of each regime, seeds averaged). "End" is the mean of the
last 3 evaluations; "peak" the maximum of a rolling mean of 3 (a single noisy evaluation
would inflate it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "forgetting"
TAGS = ("icl/holdout", "icl/holdout_matched", "icl/flip_head", "iwl/flip_head", "iwl/head",
        "iwl/tail")
COLUMNS = {  # report column -> (tag, statistic)
    "icl_holdout peak": ("icl/holdout", "peak"),
    "icl_holdout end": ("icl/holdout", "end"),
    "icl_holdout_matched end": ("icl/holdout_matched", "end"),
    "icl_flip_head end": ("icl/flip_head", "end"),
    "iwl_head end": ("iwl/head", "end"),
    "iwl_tail end": ("iwl/tail", "end"),
}


def run_name(regime: str, seed: int, n: int | None = None) -> str:
    return {"vanilla": f"none-s{seed}", "active": f"active-k1000-s{seed}"}.get(
        regime, f"temporary-k1000-N{n or 12000}-s{seed}")


def launch(regime: str, seed: int, n: int | None, logs: Path, extra: list[str]) -> dict[str, Any]:
    """One `adaptlab fit` subprocess; returns its name, wall time and exit code."""
    name = run_name(regime, seed, n)
    cmd = [sys.executable, "-m", "adaptlab.cli", "fit",
           "--config", str(CONFIGS / f"bursty_{regime}.yaml"),
           "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
           "--data.stream.init_args.seed", str(seed),
           "--trainer.logger.init_args.save_dir", str(logs.parent),
           "--trainer.logger.init_args.name", logs.name,
           "--trainer.logger.init_args.version", name,
           "--progress_bar.refresh_rate", "0"]
    if regime != "vanilla":
        cmd += ["--trainer.callbacks.init_args.seed", str(seed)]
    if n is not None:
        cmd += ["--trainer.callbacks.init_args.stop_after", str(n)]
    cmd += extra
    t0 = time.time()
    with open(logs / f"{name}.log", "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return {"name": name, "regime": regime, "seed": seed, "N": n, "seconds": time.time() - t0,
            "rc": rc}


def stats(curves: list[dict[str, float]], tag: str) -> dict[str, float]:
    vals = np.array([c.get(tag, np.nan) for c in curves], dtype=float)
    if len(vals) == 0 or np.all(np.isnan(vals)):
        return {"peak": float("nan"), "end": float("nan"), "peak_step": -1}
    roll = np.convolve(vals, np.ones(3) / 3, mode="valid") if len(vals) >= 3 else vals
    i = int(np.nanargmax(roll))
    return {"peak": float(roll[i]), "end": float(np.nanmean(vals[-3:])),
            "peak_step": int(curves[min(i + 1, len(curves) - 1)]["step"])}


def collect(logs: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        path = logs / r["name"] / "icl_curves.json"
        if not path.exists():
            out.append({**r, "missing": True})
            continue
        curves = json.loads(path.read_text())["curves"]
        out.append({**r, "curves": curves, "steps": curves[-1]["step"],
                    "stats": {t: stats(curves, t) for t in TAGS}})
    return out


def discover(logs: Path) -> list[dict[str, Any]]:
    """Runs already in a log folder, named as `run_name` writes them."""
    runs = []
    for d in sorted(p for p in logs.iterdir() if (p / "icl_curves.json").exists()):
        name = d.name
        regime = ("vanilla" if name.startswith("none") else
                  "active" if name.startswith("active") else "temporary")
        n = int(name.split("-N")[1].split("-")[0]) if "-N" in name else None
        seed = int(name.rsplit("-s", 1)[1])
        run_json = d / "run.json"
        seconds = float("nan")
        if run_json.exists():
            info = json.loads(run_json.read_text())
            if info.get("started_at") and info.get("finished_at"):
                seconds = (dt.datetime.fromisoformat(info["finished_at"])
                           - dt.datetime.fromisoformat(info["started_at"])).total_seconds()
        runs.append({"name": name, "regime": regime, "seed": seed, "N": n, "seconds": seconds,
                     "rc": 0})
    return runs


def group_key(r: dict[str, Any]) -> str:
    """Runs of one setting: the regime, N, and any extra name tag (e.g. `-24k-`)."""
    tag = r["name"].rsplit("-s", 1)[0].split("-")[3:] if r["regime"] == "temporary" else []
    base = r["regime"] if r["regime"] != "temporary" else f"temporary N={r['N'] or 12000}"
    return base + (f" ({' '.join(tag)})" if tag else "")


def mean_of(results: list[dict[str, Any]], key: str, tag: str, stat: str) -> float:
    vals = [r["stats"][tag][stat] for r in results if group_key(r) == key and "stats" in r]
    return float(np.mean(vals)) if vals else float("nan")


def checks(results: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The relative checks of spec §8 (to be frozen once calibrated)."""
    m = lambda key, tag: mean_of(results, key, tag, "end")  # noqa: E731
    van, act, tmp = "vanilla", "active", "temporary N=12000"
    out = []

    def add(label: str, value: float, ok: bool) -> None:
        out.append((label, None if np.isnan(value) else bool(ok), f"{value:.3f}"))

    add("vanilla iwl_head >= 0.9", m(van, "iwl/head"), m(van, "iwl/head") >= 0.9)
    add("vanilla icl_flip_head >= 0.8", m(van, "icl/flip_head"), m(van, "icl/flip_head") >= 0.8)
    add("vanilla iwl_tail >= 0.8", m(van, "iwl/tail"), m(van, "iwl/tail") >= 0.8)
    d = m(act, "icl/holdout") - m(van, "icl/holdout")
    add("active icl_holdout >= vanilla + 0.12", d, d >= 0.12)
    add("active iwl_tail <= 0.3", m(act, "iwl/tail"), m(act, "iwl/tail") <= 0.3)
    add("temporary iwl_head >= 0.9", m(tmp, "iwl/head"), m(tmp, "iwl/head") >= 0.9)
    d = m(tmp, "icl/holdout") - m(van, "icl/holdout")
    add("temporary icl_holdout >= vanilla + 0.05", d, d >= 0.05)
    add("temporary icl_holdout >= 0.75 (absolute)", m(tmp, "icl/holdout"),
        m(tmp, "icl/holdout") >= 0.75)
    low = [k for k in {group_key(r) for r in results}
           if k.startswith("temporary N=") and k != tmp and "(" not in k]
    for k in sorted(low):
        d = m(tmp, "icl/holdout") - m(k, "icl/holdout")
        add(f"icl_holdout(N=12000) >= icl_holdout({k[10:]}) + 0.1", d, d >= 0.1)
    return out


def write_markdown(results: list[dict[str, Any]], out: Path) -> str:
    lines = ["| run | seed | steps | time (s) | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in sorted(results, key=lambda r: (group_key(r), r["seed"])):
        if "stats" not in r:
            lines.append(f"| {r['name']} | {r['seed']} | (no curves, rc {r['rc']}) |")
            continue
        cells = [f"{r['stats'][t][s]:.2f}" for t, s in COLUMNS.values()]
        lines.append(f"| {r['name']} | {r['seed']} | {r['steps']} | {r['seconds']:.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| check (means over seeds, end values) | value | pass |", "|---|---|---|"]
    for label, ok, val in checks(results):
        lines.append(f"| {label} | {val} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def write_plot(results: list[dict[str, Any]], out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from adaptlab.figures import plt

    keys = sorted({group_key(r) for r in results if "curves" in r},
                  key=lambda k: ("vanilla", "active").index(k) if k in ("vanilla", "active")
                  else 2 + int(k.split("=")[1].split()[0]) / 1e6 + ("(" in k))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), sharey=True,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        runs = [r for r in results if group_key(r) == key and "curves" in r]
        steps = [c["step"] for c in min((r["curves"] for r in runs), key=len)]
        for tag in ("icl/holdout", "icl/holdout_matched", "icl/flip_head", "iwl/head",
                    "iwl/tail"):
            vals = np.array([[c.get(tag, np.nan) for c in r["curves"][:len(steps)]]
                             for r in runs])
            ax.plot(steps, np.nanmean(vals, 0), label=tag, lw=1.2)
        n = runs[0]["N"] or (12000 if key.startswith("temporary") else None)
        if key != "vanilla":
            last = n if n else steps[-1] + 1
            for s in range(1000, last, 1000):
                ax.axvline(s, color="grey", lw=0.4, alpha=0.6)
            if n:
                ax.axvspan(0, n, color="grey", alpha=0.08)
        ax.set_title(f"{key} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=["vanilla", "active", "temporary"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--sweep-n", nargs="*", type=int, default=[],
                    help="extra temporary runs with these N (stop_after)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "lightning_logs" / "forgetting_report")
    ap.add_argument("--from-logs", type=Path, default=None,
                    help="report the runs already in this folder instead of running")
    ap.add_argument("extra", nargs="*", help="more CLI overrides, after `--`")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.from_logs is not None:
        logs = args.from_logs
        runs = discover(logs)
    else:
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        todo = [(r, s, None) for s in args.seeds for r in args.regimes]
        todo += [("temporary", s, n) for s in args.seeds for n in args.sweep_n]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(lambda t: launch(*t, logs, args.extra), todo))
        for r in runs:
            print(f"{r['name']}: {r['seconds']:.0f} s, exit {r['rc']}", flush=True)
    results = collect(logs, runs)
    acceptance = {"runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
                  "checks": [{"check": c, "pass": ok, "value": v} for c, ok, v in checks(results)]}
    (out / "acceptance.json").write_text(json.dumps(acceptance, indent=1, default=str))
    print(write_markdown(results, out))
    write_plot(results, out)
    print(f"wrote {out / 'report.md'}, {out / 'acceptance.json'}, {out / 'curves.png'}")


if __name__ == "__main__":
    main()
