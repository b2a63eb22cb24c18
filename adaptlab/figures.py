"""Matplotlib figures for TensorBoard: accuracy matrix, online accuracy, expert timeline.

Each function returns a `matplotlib.figure.Figure` (Agg backend, no display needed); the
evaluator hands it to `SummaryWriter.add_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def accuracy_matrix(
    R: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]
) -> Figure:
    """Heatmap of R[i][j] (rows: evaluation points, columns: segments), values annotated."""
    R = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * R.shape[1], 1.0 + 0.5 * R.shape[0]))
    im = ax.imshow(np.nan_to_num(R, nan=0.0), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if np.isfinite(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if R[i, j] < 0.6 else "black")
    ax.set_xticks(range(R.shape[1]), col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(R.shape[0]), row_labels, fontsize=7)
    ax.set_xlabel("test set of segment")
    ax.set_ylabel("after training through")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def online_accuracy(
    curve: Sequence[Sequence[float]], true_shifts: Sequence[int], window: int
) -> Figure:
    """Windowed test-then-train accuracy against stream position, true shifts dashed."""
    fig, ax = plt.subplots(figsize=(7, 3))
    if curve:
        pts = np.array([(p, np.nan if v is None else v) for p, v in curve], dtype=float)
        ax.plot(pts[:, 0], pts[:, 1], lw=1.2)
    for s in true_shifts:
        ax.axvline(s, color="grey", ls="--", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("samples observed")
    ax.set_ylabel(f"online accuracy (last {window})")
    fig.tight_layout()
    return fig


def expert_timeline(
    positions: np.ndarray, active: np.ndarray, segment_ids: np.ndarray,
    shifts: Sequence[int], detections: Sequence[int],
) -> Figure:
    """Active expert per observed batch, true segments shaded, detector firings marked."""
    fig, ax = plt.subplots(figsize=(7, 3))
    bounds = np.flatnonzero(np.diff(segment_ids)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(segment_ids)]])
    for k, (a, b) in enumerate(zip(starts, ends)):
        if b > a:
            ax.axvspan(positions[a], positions[b - 1], alpha=0.12 if k % 2 else 0.05, color="C0")
    ax.step(positions, active, where="post", color="C1", lw=1.4, label="active expert")
    for s in shifts:
        ax.axvline(s, color="grey", ls="--", lw=0.8)
    if len(detections):
        ax.plot(detections, np.interp(detections, positions, active), "v", color="C3",
                label="detector fired")
    ax.set_xlabel("samples observed")
    ax.set_ylabel("expert id")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def demo_curve_figure(
    curves: dict[str, dict[str, dict[int, dict[str, float]]]], title: str = "",
    window: int | None = None,
) -> Figure:
    """Skill vs demonstrations, one panel per family, one line per method (± 1 SE).

    `curves[method][family][k] = {"skill", "se"}`; k = 0 is drawn at x = 0.5 on the log axis.
    """
    families = sorted({f for c in curves.values() for f in c})
    cols = min(4, len(families)) or 1
    rows = (len(families) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        for method, curve in curves.items():
            if fam not in curve:
                continue
            ks = sorted(curve[fam])
            x = [max(k, 0.5) for k in ks]
            y = np.array([curve[fam][k]["skill"] for k in ks])
            se = np.nan_to_num(np.array([curve[fam][k].get("se", 0.0) for k in ks]))
            ax.plot(x, y, marker="o", ms=3, label=method)
            ax.fill_between(x, y - se, y + se, alpha=0.2)
        if window:
            ax.axvline(window, color="grey", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_title(fam, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("demonstrations k", fontsize=8)
        ax.set_ylabel("skill", fontsize=8)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
