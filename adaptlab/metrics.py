"""Metric definitions (their page: ``docs/metrics.md``, generated from ``DEFINITIONS``).

Pure functions: numpy arrays in, Python floats / lists / dicts out. No torch or Lightning
at import time (only :func:`params_total` / :func:`params_nonzero` import torch, lazily),
so the Lightning evaluator and the Avalanche bridge report identical numbers.

Conventions (spec §1):

* ``R`` has shape (E, S): rows are evaluation points (segment boundaries, in order),
  columns are distinct segments. ``NaN`` (or ``None``) means "not evaluated"; such
  entries are skipped, and a mean over nothing is ``None``.
* ``first[j]`` is the row at which segment j's training first completed. It defaults to
  ``j``, which requires a square R. Segment j is *seen at row i* if ``first[j] <= i``;
  columns not seen at the last row are excluded (this is how running values work).
* ``last = E - 1`` and ``P = {j : first[j] < last}``.
* Values are fractions. Undefined values are ``None``, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFINITIONS",
    "EXPERT_METRICS",
    "DetectionReport",
    "OnlineEvents",
    "TOLERANCE_BATCHES",
    "acc_anytime_auc",
    "acc_anytime_curve",
    "acc_final",
    "acc_final_weighted",
    "acc_incremental_avg",
    "acc_online",
    "acc_online_per_segment",
    "acc_online_windowed",
    "acc_online_windowed_curve",
    "acc_seen_curve",
    "bwt_gem",
    "bwt_pairwise",
    "classify_detections",
    "detection_delay",
    "detection_report",
    "forgetting_chaudhry",
    "forgetting_last",
    "forgetting_last_curve",
    "forgetting_last_matrix",
    "fwt_gem",
    "matrix_report",
    "params_nonzero",
    "params_total",
    "recovery_samples",
    "running_report",
    "tta_online_error",
    "tta_online_error_mean_domain",
]

Vector = list[float | None]

# --------------------------------------------------------------------------- helpers


def _matrix(R: npt.ArrayLike) -> np.ndarray:
    a = np.asarray(R, dtype=float)  # None -> NaN
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"R must be a non-empty 2-D array (rows x segments), got {a.shape}")
    return a


def _first(a: np.ndarray, first: npt.ArrayLike | None) -> np.ndarray:
    E, S = a.shape
    if first is None:
        if E != S:
            raise ValueError(
                f"R is {E}x{S} (not square): pass first=[row at which each segment was learnt]"
            )
        return np.arange(S)
    f = np.asarray(first)
    if f.shape != (S,):
        raise ValueError(f"first must have one entry per column ({S}), got shape {f.shape}")
    if f.size and (not np.all(np.equal(np.mod(f, 1), 0)) or np.any(f < 0)):
        raise ValueError(f"first must hold non-negative row indices, got {f.tolist()}")
    return f.astype(np.int64)


def _vec(x: npt.ArrayLike | None, S: int, name: str) -> np.ndarray | None:
    if x is None:
        return None
    v = np.asarray(x, dtype=float)
    if v.shape != (S,):
        raise ValueError(f"{name} must have one entry per column ({S}), got shape {v.shape}")
    return v


def _val(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _diff(x: float, y: float) -> float | None:
    """x - y, or None when either side was not evaluated."""
    return None if math.isnan(x) or math.isnan(y) else float(x - y)


# ------------------------------------------------------------ accuracy-matrix metrics (§2)


def acc_final(
    R: npt.ArrayLike, *, first: npt.ArrayLike | None = None, per_segment: bool = False
) -> float | None | Vector:
    """mean_{j seen at last} R[last][j].

    Matches GEM "ACC" (Lopez-Paz & Ranzato 2017), Chaudhry et al., Renate
    ``average_accuracy``. ``per_segment=True`` gives R[last][j] (None if unseen).
    """
    a = _matrix(R)
    f = _first(a, first)
    last = a.shape[0] - 1
    per = [_val(a[last, j]) if f[j] <= last else None for j in range(a.shape[1])]
    return per if per_segment else _mean(per)


def acc_final_weighted(R: npt.ArrayLike, n: npt.ArrayLike) -> float | None:
    """sum_j n_j R[last][j] / sum_j n_j over ALL columns (seen or not).

    Matches Avalanche ``Top1_Acc_Stream/eval_phase/test_stream`` at the final full-stream
    eval (Avalanche pools every test sample of the stream). NaN columns are skipped.
    """
    a = _matrix(R)
    w = _vec(n, a.shape[1], "n")
    row = a[-1]
    ok = ~np.isnan(row) & ~np.isnan(w)
    total = float(w[ok].sum())
    if total <= 0:
        return None
    return float((w[ok] * row[ok]).sum() / total)


def acc_seen_curve(R: npt.ArrayLike, *, first: npt.ArrayLike | None = None) -> Vector:
    """A_i = mean_{j : first[j] <= i} R[i][j], one value per row.

    The curve behind :func:`acc_incremental_avg` (iCaRL / continuum).
    """
    a = _matrix(R)
    f = _first(a, first)
    return [
        _mean(_val(a[i, j]) for j in range(a.shape[1]) if f[j] <= i) for i in range(a.shape[0])
    ]


def acc_incremental_avg(R: npt.ArrayLike, *, first: npt.ArrayLike | None = None) -> float | None:
    """(1/E) sum_i A_i with A_i from :func:`acc_seen_curve` (rows with no A_i are skipped).

    Matches iCaRL (Rebuffi et al. 2017), continuum ``average_incremental_accuracy``,
    PyCIL "average accuracy" (PyCIL weights A_i by samples; we do not).
    """
    return _mean(acc_seen_curve(R, first=first))


def _forgetting_chaudhry_per(a: np.ndarray, f: np.ndarray) -> Vector:
    last = a.shape[0] - 1
    out: Vector = []
    for j in range(a.shape[1]):
        prev = a[f[j] : last, j] if f[j] < last else np.empty(0)
        prev = prev[~np.isnan(prev)]
        if prev.size == 0 or math.isnan(a[last, j]):
            out.append(None)
        else:
            out.append(float(prev.max() - a[last, j]))
    return out


def _forgetting_last_per(a: np.ndarray, f: np.ndarray) -> Vector:
    last = a.shape[0] - 1
    return [
        _diff(a[f[j], j], a[last, j]) if f[j] < last else None for j in range(a.shape[1])
    ]


def forgetting_chaudhry(
    R: npt.ArrayLike, *, first: npt.ArrayLike | None = None, per_segment: bool = False
) -> float | None | Vector:
    """f_j = max_{first[j] <= l < last} R[l][j] - R[last][j]; mean over j in P.

    Matches Chaudhry et al. 2018 (RWalk) and continuum ``forgetting``. Differs from
    Mammoth (max includes the last row) and Renate (max includes rows before first[j]).
    """
    a = _matrix(R)
    per = _forgetting_chaudhry_per(a, _first(a, first))
    return per if per_segment else _mean(per)


def forgetting_last(
    R: npt.ArrayLike, *, first: npt.ArrayLike | None = None, per_segment: bool = False
) -> float | None | Vector:
    """f_j = R[first[j]][j] - R[last][j]; mean over j in P.

    Matches Avalanche ``StreamForgetting`` at the final eval; per segment,
    ``ExperienceForgetting/.../Exp{j:03d}``.
    """
    a = _matrix(R)
    per = _forgetting_last_per(a, _first(a, first))
    return per if per_segment else _mean(per)


def forgetting_last_curve(R: npt.ArrayLike, *, first: npt.ArrayLike | None = None) -> Vector:
    """Row i: mean_{j : first[j] < i} (R[first[j]][j] - R[i][j]); None at row 0.

    Matches Avalanche ``StreamForgetting`` as emitted at each eval.
    """
    a = _matrix(R)
    f = _first(a, first)
    return [_mean(_forgetting_last_per(a[: i + 1], f)) for i in range(a.shape[0])]


def forgetting_last_matrix(
    R: npt.ArrayLike, *, first: npt.ArrayLike | None = None
) -> list[Vector]:
    """F[i][j] = R[first[j]][j] - R[i][j] if i > first[j], else 0 (None if not evaluated).

    Element-wise equal to ``avalanche.evaluation.functional.forgetting(R, first)``.
    """
    a = _matrix(R)
    f = _first(a, first)
    E, S = a.shape
    return [[_diff(a[f[j], j], a[i, j]) if i > f[j] else 0.0 for j in range(S)] for i in range(E)]


def bwt_gem(
    R: npt.ArrayLike, *, first: npt.ArrayLike | None = None, per_segment: bool = False
) -> float | None | Vector:
    """mean_{j in P} (R[last][j] - R[first[j]][j]) = -forgetting_last.

    Matches GEM BWT, Mammoth, Renate, Avalanche ``StreamBWT`` at the final eval.
    """
    a = _matrix(R)
    per = [None if x is None else -x for x in _forgetting_last_per(a, _first(a, first))]
    return per if per_segment else _mean(per)


def bwt_pairwise(R: npt.ArrayLike, *, first: npt.ArrayLike | None = None) -> float | None:
    """2/(E(E-1)) sum_{i=1}^{E-1} sum_{j<i} (R[i][j] - R[j][j]); square R only.

    Matches Diaz-Rodriguez et al. 2018, continuum ``backward_transfer``, CapyMOA.
    None when R is not square, ``first`` is not the identity (recurring schedule) or E < 2.
    NaN pairs are skipped (the formula is the mean over the E(E-1)/2 pairs).
    """
    a = _matrix(R)
    E, S = a.shape
    if E != S or E < 2:
        return None
    if first is not None and not np.array_equal(np.asarray(first), np.arange(S)):
        return None
    return _mean(_diff(a[i, j], a[j, j]) for i in range(1, E) for j in range(i))


def fwt_gem(
    R: npt.ArrayLike,
    b: npt.ArrayLike | None,
    *,
    first: npt.ArrayLike | None = None,
    per_segment: bool = False,
) -> float | None | Vector:
    """mean_{j : 1 <= first[j] <= last} (R[first[j]-1][j] - b[j]).

    Square R: (1/(S-1)) sum_{j=1}^{S-1} (R[j-1][j] - b[j]). Matches GEM FWT, Mammoth,
    Renate, Avalanche ``StreamForwardTransfer`` at the final eval. None without ``b``
    (continuum's variant drops b; we do not).
    """
    a = _matrix(R)
    f = _first(a, first)
    E, S = a.shape
    bv = _vec(b, S, "b")
    if bv is None:
        per: Vector = [None] * S
    else:
        per = [_diff(a[f[j] - 1, j], bv[j]) if 1 <= f[j] <= E - 1 else None for j in range(S)]
    return per if per_segment else _mean(per)


def matrix_report(
    R: npt.ArrayLike,
    *,
    first: npt.ArrayLike | None = None,
    b: npt.ArrayLike | None = None,
    n: npt.ArrayLike | None = None,
) -> dict[str, float | None]:
    """Every §2 final value by name (``acc_final_weighted`` needs n, ``fwt_gem`` needs b)."""
    a = _matrix(R)
    f = _first(a, first)
    return {
        "acc_final": acc_final(a, first=f),
        "acc_final_weighted": None if n is None else acc_final_weighted(a, n),
        "acc_incremental_avg": acc_incremental_avg(a, first=f),
        "forgetting_chaudhry": forgetting_chaudhry(a, first=f),
        "forgetting_last": forgetting_last(a, first=f),
        "bwt_gem": bwt_gem(a, first=f),
        "bwt_pairwise": bwt_pairwise(a, first=f),
        "fwt_gem": None if b is None else fwt_gem(a, b, first=f),
    }


def running_report(
    R: npt.ArrayLike,
    *,
    upto_row: int,
    first: npt.ArrayLike | None = None,
    b: npt.ArrayLike | None = None,
    n: npt.ArrayLike | None = None,
) -> dict[str, float | None]:
    """The §2 values as known after row ``upto_row`` (spec §6 "running values").

    Rows 0..i are kept with row i treated as last, and only columns seen at i
    (first[j] <= i). So ``forgetting_last`` equals ``forgetting_last_curve[i]`` and
    ``acc_final`` equals A_i. ``acc_final_weighted`` stays over all columns, like
    Avalanche's ``Top1_Acc_Stream``. ``R`` may hold only rows 0..i (the evaluator's
    matrix so far) with ``first`` given for every column.
    """
    a = _matrix(R)
    i = int(upto_row)
    if not 0 <= i < a.shape[0]:
        raise ValueError(f"upto_row={i} outside rows 0..{a.shape[0] - 1}")
    if first is None:
        if a.shape[1] < i + 1:
            raise ValueError("first is required: fewer columns than rows")
        f = np.arange(a.shape[1])
    else:
        f = _first(a, first)
    seen = f <= i
    rows = a[: i + 1]
    bv = _vec(b, a.shape[1], "b")
    out = matrix_report(
        rows[:, seen], first=f[seen], b=None if bv is None else bv[seen], n=None
    )
    out["acc_final_weighted"] = None if n is None else acc_final_weighted(rows, n)
    return out


# ------------------------------------------------------------------- online metrics (§3)


@dataclass
class OnlineEvents:
    """One observation event per ``observe`` call, as parallel arrays.

    ``pos``: stream position of the batch's first sample; ``n``: labelled samples in the
    batch; ``n_correct``: correct predictions made *before* the update on that batch
    (test-then-train); ``seg``: segment id of the batch. Stored as int64 here; the
    evaluator may keep int32 arrays and pass them in.
    """

    pos: np.ndarray
    n: np.ndarray
    n_correct: np.ndarray
    seg: np.ndarray

    def __post_init__(self) -> None:
        for name in ("pos", "n", "n_correct", "seg"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        if not len(self.pos) == len(self.n) == len(self.n_correct) == len(self.seg):
            raise ValueError("pos, n, n_correct and seg must have the same length")
        if np.any(self.n < 0) or np.any(self.n_correct < 0) or np.any(self.n_correct > self.n):
            raise ValueError("need 0 <= n_correct <= n for every event")

    @classmethod
    def from_records(cls, records: Iterable[tuple[int, int, int, int]]) -> OnlineEvents:
        """Build from ``(pos, n, n_correct, seg)`` tuples."""
        rows = list(records)
        if not rows:
            return cls(*([] for _ in range(4)))
        pos, n, n_correct, seg = zip(*rows, strict=True)
        return cls(pos, n, n_correct, seg)

    def __len__(self) -> int:
        return len(self.pos)

    def select(self, mask: npt.ArrayLike) -> OnlineEvents:
        """The events where ``mask`` is true."""
        m = np.asarray(mask, dtype=bool)
        return OnlineEvents(self.pos[m], self.n[m], self.n_correct[m], self.seg[m])


def _pooled(n_correct: np.ndarray, n: np.ndarray) -> float | None:
    total = int(n.sum())
    return int(n_correct.sum()) / total if total > 0 else None


def acc_online_per_segment(events: OnlineEvents) -> dict[int, float | None]:
    """{seg k: sum n_correct / sum n over events of segment k}, keys sorted."""
    return {
        int(k): _pooled(events.n_correct[events.seg == k], events.n[events.seg == k])
        for k in np.unique(events.seg)
    }


def recovery_samples(
    events: OnlineEvents, ends: Sequence[int], *, frac: float = 0.9, tail: float = 0.25,
    smooth: int = 4,
) -> list[int | None]:
    """Per occurrence `[ends[i-1], ends[i])`: samples from its start until the online accuracy,
    averaged over `smooth` consecutive batches, first reaches `frac` of the occurrence's
    plateau (its pooled accuracy over the last `tail` share of batches). None for an
    occurrence without events or with a zero plateau. How fast a learner recovers after a
    change (StreamAdapter spec §6; TTA's adaptation speed).
    """
    out: list[int | None] = []
    start = 0
    for end in ends:
        sel = (events.pos >= start) & (events.pos < end)
        pos, n, c = events.pos[sel], events.n[sel], events.n_correct[sel]
        if len(pos) == 0:
            out.append(None)
            start = end
            continue
        k = max(1, int(round(tail * len(pos))))
        plateau = c[-k:].sum() / max(1, n[-k:].sum())
        hit = None
        if plateau > 0:
            w = max(1, min(smooth, len(pos)))
            for i in range(w - 1, len(pos)):
                acc = c[i - w + 1:i + 1].sum() / max(1, n[i - w + 1:i + 1].sum())
                if acc >= frac * plateau:
                    hit = int(pos[i] + n[i] - start)
                    break
        out.append(hit)
        start = end
    return out


def acc_online(
    events: OnlineEvents, *, per_segment: bool = False
) -> float | None | dict[int, float | None]:
    """sum n_correct / sum n over the whole stream, pooled per sample.

    Prequential / test-then-train accuracy (CLOC, Cai et al. 2021; CapyMOA). Restricted
    to one experience it equals Avalanche ``Top1_Acc_Epoch/train_phase/train_stream``.
    ``per_segment=True`` gives :func:`acc_online_per_segment`.
    """
    if per_segment:
        return acc_online_per_segment(events)
    return _pooled(events.n_correct, events.n)


def _window_value(cum_n: np.ndarray, cum_c: np.ndarray, k: int, window: int) -> float | None:
    """Pooled accuracy of events[s:k], s the latest start with >= `window` samples (or 0)."""
    s = max(int(np.searchsorted(cum_n, cum_n[k] - window, side="right")) - 1, 0)
    denom = int(cum_n[k] - cum_n[s])
    return int(cum_c[k] - cum_c[s]) / denom if denom > 0 else None


def _cumulative(events: OnlineEvents, window: int) -> tuple[np.ndarray, np.ndarray]:
    if window <= 0:
        raise ValueError("window must be positive")
    zero = np.zeros(1, dtype=np.int64)
    return np.concatenate([zero, np.cumsum(events.n)]), np.concatenate(
        [zero, np.cumsum(events.n_correct)]
    )


def acc_online_windowed_curve(
    events: OnlineEvents, window: int = 500, *, every: int = 1
) -> list[list[float | None]]:
    """[[pos, acc over the last `window` labelled samples]] after every ``every`` events.

    Windowed prequential accuracy. The window is the shortest suffix of whole events
    holding >= ``window`` labelled samples (all events while fewer exist); ``pos`` is the
    position of the newest event's first sample.
    """
    if every <= 0:
        raise ValueError("every must be positive")
    cum_n, cum_c = _cumulative(events, window)
    return [
        [int(events.pos[k - 1]), _window_value(cum_n, cum_c, k, window)]
        for k in range(every, len(events) + 1, every)
    ]


def acc_online_windowed(events: OnlineEvents, window: int = 500) -> float | None:
    """Windowed prequential accuracy at the newest event (the current logging step).

    Same window rule as :func:`acc_online_windowed_curve`.
    """
    cum_n, cum_c = _cumulative(events, window)
    return _window_value(cum_n, cum_c, len(events), window)


def _anytime_values(
    acc: npt.ArrayLike, n: npt.ArrayLike | None, weighting: str
) -> list[float | None]:
    a = np.asarray(acc, dtype=float)
    if a.ndim == 1:
        return [_val(x) for x in a]
    if a.ndim != 2:
        raise ValueError("acc must be 1-D (pooled a_t) or 2-D (evaluations x segments)")
    if weighting == "segment":
        return [_mean(_val(x) for x in row) for row in a]
    if weighting != "sample":
        raise ValueError(f"weighting must be 'sample' or 'segment', got {weighting!r}")
    if n is None:
        raise ValueError("weighting='sample' with per-segment accuracies needs n")
    w = _vec(n, a.shape[1], "n")
    out: list[float | None] = []
    for row in a:
        ok = ~np.isnan(row)
        total = float(w[ok].sum())
        out.append(float((w[ok] * row[ok]).sum() / total) if total > 0 else None)
    return out


def acc_anytime_curve(
    positions: npt.ArrayLike,
    acc: npt.ArrayLike,
    *,
    n: npt.ArrayLike | None = None,
    weighting: Literal["sample", "segment"] = "sample",
) -> list[list[float | None]]:
    """[[position, a_t]]: a_t pooled over the test sets of segments seen at evaluation t.

    ``acc`` is either a_t directly (1-D) or per-segment accuracies (T x S, NaN = not seen
    yet), pooled by test size ``n`` (``weighting="sample"``) or averaged over seen
    segments (``"segment"``, CapyMOA).
    """
    p = np.asarray(positions, dtype=np.int64).reshape(-1)
    vals = _anytime_values(acc, n, weighting)
    if len(vals) != len(p):
        raise ValueError("one accuracy (row) per position is needed")
    return [[int(x), v] for x, v in zip(p, vals, strict=True)]


def acc_anytime_auc(
    positions: npt.ArrayLike,
    acc: npt.ArrayLike,
    *,
    n: npt.ArrayLike | None = None,
    weighting: Literal["sample", "segment"] = "sample",
    start: int = 0,
) -> float | None:
    """A_AUC = sum_t a_t D_t / sum_t D_t, D_t = samples since the previous evaluation.

    CLIB A_AUC (Koh et al. 2022): rectangle sum with the value at each interval's end,
    normalised by the span (with uniform spacing, the mean of a_t). The first interval
    starts at ``start``. Evaluations with undefined a_t are dropped with their interval.
    """
    curve = acc_anytime_curve(positions, acc, n=n, weighting=weighting)
    num = den = 0.0
    prev = int(start)
    for pos, value in curve:
        delta = pos - prev
        prev = pos
        if delta < 0:
            raise ValueError("positions must be non-decreasing and >= start")
        if value is not None:
            num += value * delta
            den += delta
    return num / den if den > 0 else None


def tta_online_error(
    events: OnlineEvents, *, per_segment: bool = False
) -> float | None | dict[int, float | None]:
    """1 - acc_online on a test-time-adaptation stream.

    Online error of TENT, CoTTA, RMT (Marsden & Dobler benchmark). Labels are used only
    for scoring. ``per_segment=True`` gives {seg: error}.
    """
    if per_segment:
        per = acc_online_per_segment(events)
        return {k: None if v is None else 1.0 - v for k, v in per.items()}
    acc = acc_online(events)
    return None if acc is None else 1.0 - acc


def tta_online_error_mean_domain(
    events: OnlineEvents, groups: Mapping[int, Hashable] | None = None
) -> float | None:
    """mean over domains of the pooled per-domain online error.

    The "mean error" column of TTA tables. A domain is a group of segments (e.g. one
    corruption): ``groups`` maps segment id -> domain; without it each segment is a domain.
    Equals the pooled error when domains have equal length.
    """
    keys = [int(s) if groups is None else groups[int(s)] for s in events.seg]
    errors = []
    for domain in dict.fromkeys(keys):
        mask = np.array([k == domain for k in keys], dtype=bool)
        acc = _pooled(events.n_correct[mask], events.n[mask])
        if acc is not None:
            errors.append(1.0 - acc)
    return _mean(errors)


# ------------------------------------------------------------ shift detection (§4)

TOLERANCE_BATCHES = 20
"""Default tolerance is ``TOLERANCE_BATCHES * batch_size`` samples."""

DetectionLabel = Literal["true_positive", "duplicate", "false_alarm", "ignored"]


@dataclass
class DetectionReport:
    """All §4 values. Positions and delays are in samples (divide by B for batches)."""

    n_shifts: int
    n_detections: int  # detections counted (those labelled "ignored" are left out)
    tolerance: int
    warmup: int
    missed: str  # the convention used for detection_delay
    detection_delay: float | None
    false_alarms: int
    false_alarms_per_1k: float | None
    missed_detections: int | None
    missed_detection_rate: float | None
    false_discovery_rate: float | None
    mtfa: float | None
    mtr: float | None
    duplicate_detections: int | None
    true_positives: int | None
    delays: list[int | None] = field(default_factory=list)  # per shift, None = no detection
    labels: list[str] = field(default_factory=list)  # per detection


def _check_detection_inputs(
    shifts: Sequence[int], detections: Sequence[int], N: int
) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(shifts, dtype=np.int64).reshape(-1)
    t = np.asarray(detections, dtype=np.int64).reshape(-1)
    if N <= 0:
        raise ValueError("N (stream length) must be positive")
    if np.any(np.diff(d) <= 0) or np.any(d < 0) or np.any(d >= N):
        raise ValueError(f"shifts must be strictly increasing positions in [0, N): {d.tolist()}")
    if np.any(np.diff(t) < 0) or np.any(t < 0) or np.any(t >= N):
        raise ValueError("detections must be sorted positions in [0, N)")
    return d, t


def _resolve_tolerance(tolerance: int | None, batch_size: int | None) -> int:
    if tolerance is not None:
        if tolerance < 0:
            raise ValueError("tolerance must be >= 0")
        return int(tolerance)
    if batch_size is None:
        raise ValueError("pass tolerance (samples) or batch_size (tolerance = 20 * batch_size)")
    return TOLERANCE_BATCHES * int(batch_size)


def classify_detections(
    shifts: Sequence[int],
    detections: Sequence[int],
    N: int,
    *,
    tolerance: int | None = None,
    batch_size: int | None = None,
    warmup: int = 0,
) -> list[DetectionLabel]:
    """Label each detection by the §4 interval rule.

    Detection t belongs to shift k if d_k <= t < d_{k+1} (d_{K+1} = N). The first one in
    the interval is a true positive if t - d_k <= tolerance; later ones inside the window
    [d_k, d_k + tolerance] are duplicates. Everything else (including t < d_1) is a false
    alarm, or "ignored" when t < warmup.
    """
    d, t = _check_detection_inputs(shifts, detections, N)
    tol = _resolve_tolerance(tolerance, batch_size)
    claimed: set[int] = set()
    labels: list[DetectionLabel] = []
    for x in t:
        k = int(np.searchsorted(d, x, side="right")) - 1
        if k >= 0 and x - d[k] <= tol:
            # Detections are sorted, so the first in the interval is also the first in
            # the window: later in-window ones are duplicates.
            labels.append("duplicate" if k in claimed else "true_positive")
            claimed.add(k)
        elif x < warmup:
            labels.append("ignored")
        else:
            labels.append("false_alarm")
    return labels


def _first_delays(d: np.ndarray, t: np.ndarray) -> list[int | None]:
    out: list[int | None] = []
    for k, dk in enumerate(d):
        end = d[k + 1] if k + 1 < len(d) else None
        inside = t[(t >= dk) & (t < end)] if end is not None else t[t >= dk]
        out.append(int(inside[0] - dk) if inside.size else None)
    return out


def detection_delay(
    shifts: Sequence[int],
    detections: Sequence[int],
    N: int,
    *,
    missed: Literal["interval", "skip"] = "interval",
) -> float | None:
    """mean_k (first detection in [d_k, d_{k+1}) - d_k), in samples.

    A shift with no detection in its interval counts d_{k+1} - d_k (``missed="interval"``)
    or is left out (``"skip"``). Matches ``haugjo/float`` detection delay and CD-MOA mean
    time to detection (Bifet et al. 2013). Tolerance plays no part here. None when K = 0.
    """
    if missed not in ("interval", "skip"):
        raise ValueError(f"missed must be 'interval' or 'skip', got {missed!r}")
    d, t = _check_detection_inputs(shifts, detections, N)
    bounds = [*d.tolist(), int(N)]
    values: list[float | None] = []
    for k, delay in enumerate(_first_delays(d, t)):
        if delay is None and missed == "interval":
            delay = bounds[k + 1] - bounds[k]
        values.append(None if delay is None else float(delay))
    return _mean(values)


def detection_report(
    shifts: Sequence[int],
    detections: Sequence[int],
    N: int,
    tolerance: int | None = None,
    warmup: int = 0,
    missed: Literal["interval", "skip"] = "interval",
    *,
    batch_size: int | None = None,
) -> DetectionReport:
    """Every §4 value in one dataclass (``dataclasses.asdict``-able).

    ``tolerance`` defaults to ``20 * batch_size`` samples. With K = 0 every detection-based
    value is None except the false-alarm family (false_alarms, false_alarms_per_1k, mtfa).
    """
    d, t = _check_detection_inputs(shifts, detections, N)
    tol = _resolve_tolerance(tolerance, batch_size)
    labels = classify_detections(d, t, N, tolerance=tol, warmup=warmup)
    fa_pos = [int(x) for x, lab in zip(t, labels, strict=True) if lab == "false_alarm"]
    n_fa = len(fa_pos)
    n_counted = sum(lab != "ignored" for lab in labels)
    mtfa = float(np.mean(np.diff(fa_pos))) if n_fa >= 2 else None
    K = len(d)
    if K == 0:
        return DetectionReport(
            n_shifts=0, n_detections=n_counted, tolerance=tol, warmup=warmup, missed=missed,
            detection_delay=None, false_alarms=n_fa, false_alarms_per_1k=1000.0 * n_fa / N,
            missed_detections=None, missed_detection_rate=None, false_discovery_rate=None,
            mtfa=mtfa, mtr=None, duplicate_detections=None, true_positives=None,
            delays=[], labels=list(labels),
        )  # fmt: skip
    n_tp = labels.count("true_positive")
    n_missed = K - n_tp
    mdr = n_missed / K
    delay = detection_delay(d, t, N, missed=missed)
    mtr = None
    if mtfa is not None and delay is not None and delay > 0:
        mtr = mtfa / delay * (1.0 - mdr)
    return DetectionReport(
        n_shifts=K,
        n_detections=n_counted,
        tolerance=tol,
        warmup=warmup,
        missed=missed,
        detection_delay=delay,
        false_alarms=n_fa,
        false_alarms_per_1k=1000.0 * n_fa / N,
        missed_detections=n_missed,
        missed_detection_rate=mdr,
        false_discovery_rate=n_fa / n_counted if n_counted else 0.0,
        mtfa=mtfa,
        mtr=mtr,
        duplicate_detections=labels.count("duplicate"),
        true_positives=n_tp,
        delays=_first_delays(d, t),
        labels=list(labels),
    )


# ------------------------------------------------------------------- model size (§5)


def _param_pairs(
    module: torch.nn.Module | Iterable[torch.nn.Module],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, effective tensor) pairs, each parameter once (tied ones by identity).

    With ``torch.nn.utils.prune`` the parameter is ``<name>_orig`` and the effective
    tensor is the module attribute ``<name>`` (= orig * mask).
    """
    import torch

    roots = [module] if isinstance(module, torch.nn.Module) else list(module)
    seen: set[int] = set()
    pairs = []
    for root in roots:
        for mod in root.modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                effective = p
                base = name[: -len("_orig")]
                if name.endswith("_orig") and hasattr(mod, base + "_mask"):
                    effective = getattr(mod, base)
                pairs.append((p, effective))
    return pairs


def params_total(module: torch.nn.Module | Iterable[torch.nn.Module]) -> int:
    """Number of parameter elements, shared (tied) tensors counted once; no buffers.

    Accepts one module or several (e.g. TAME's experts + selector).
    """
    return sum(p.numel() for p, _ in _param_pairs(module))


def params_nonzero(module: torch.nn.Module | Iterable[torch.nn.Module]) -> int:
    """Non-zero elements of the effective weights (after pruning masks), tied counted once.

    TAME's "non-zero parameters after pruning" convention.
    """
    import torch

    with torch.no_grad():
        return sum(int(torch.count_nonzero(eff.detach())) for _, eff in _param_pairs(module))


# ----------------------------------------------------------------------- definitions

#: `final.learner` keys: filled for learners with experts (TAME), null for the others.
EXPERT_METRICS = ("acc_task_inferred", "acc_task_oracle", "acc_class_il", "selector_acc",
                  "n_experts")

DEFINITIONS: dict[str, str] = {
    "R[i][j]": "accuracy of forward(x) against the labels the stream presents (global, or "
    "local with Split labels: local) on segment j's test set after row i; the same for every "
    "learner",
    "acc_final": "mean_{j seen at last} R[last][j]; GEM ACC, Chaudhry et al., Renate "
    "average_accuracy",
    "acc_final_weighted": "sum_j n_j R[last][j] / sum_j n_j over all columns; Avalanche "
    "Top1_Acc_Stream/eval_phase/test_stream",
    "acc_seen_curve": "A_i = mean_{j: first[j] <= i} R[i][j], one value per row",
    "acc_incremental_avg": "(1/E) sum_i A_i; iCaRL, continuum average_incremental_accuracy",
    "forgetting_chaudhry": "mean_{j in P} max_{first[j] <= l < last} R[l][j] - R[last][j]; "
    "Chaudhry et al. 2018 (RWalk), continuum forgetting",
    "forgetting_last": "mean_{j in P} R[first[j]][j] - R[last][j]; Avalanche StreamForgetting "
    "(final eval)",
    "forgetting_last_curve": "row i: mean_{j: first[j] < i} R[first[j]][j] - R[i][j]; "
    "Avalanche StreamForgetting at each eval",
    "forgetting_last_matrix": "F[i][j] = R[first[j]][j] - R[i][j] if i > first[j] else 0; "
    "avalanche.evaluation.functional.forgetting",
    "bwt_gem": "mean_{j in P} R[last][j] - R[first[j]][j] = -forgetting_last; GEM BWT, "
    "Avalanche StreamBWT",
    "bwt_pairwise": "2/(E(E-1)) sum_{i>=1} sum_{j<i} R[i][j] - R[j][j] (square R); "
    "Diaz-Rodriguez et al. 2018, continuum backward_transfer, CapyMOA",
    "fwt_gem": "mean_{j: first[j] >= 1} R[first[j]-1][j] - b[j]; GEM FWT, Avalanche "
    "StreamForwardTransfer",
    "recovery_samples": "per occurrence, samples until the online accuracy (mean of 4 "
    "batches) first reaches 90% of the occurrence's plateau (pooled accuracy of its last 25% "
    "of batches); final holds the mean over occurrences",
    "acc_online": "sum n_correct / sum n over the stream, test-then-train; CLOC prequential "
    "accuracy, CapyMOA",
    "acc_online_windowed": "acc_online over the last `window` labelled samples; windowed "
    "prequential accuracy",
    "acc_online_per_segment": "acc_online restricted to the events of segment k",
    "acc_anytime_auc": "sum_t a_t D_t / sum_t D_t, a_t pooled over seen test sets; CLIB A_AUC "
    "(Koh et al. 2022), normalised",
    "tta_online_error": "1 - acc_online on a TTA stream; TENT, CoTTA, RMT online error",
    "tta_online_error_mean_domain": "mean over domains of the pooled per-domain online error; "
    "TTA tables' mean error",
    "detection_delay": "mean_k first detection in [d_k, d_{k+1}) - d_k, missed counts "
    "d_{k+1} - d_k; float, CD-MOA",
    "false_alarms": "detections outside every window [d_k, d_k + tolerance], after warmup; "
    "CD-MOA false positives",
    "false_alarms_per_1k": "1000 * false_alarms / N",
    "missed_detections": "shifts with no true positive (first detection within tolerance)",
    "missed_detection_rate": "missed_detections / K; float MDR",
    "false_discovery_rate": "false_alarms / detections (0 with none); float FDR",
    "mtfa": "mean gap between consecutive false alarms; float MTFA",
    "mtr": "(mtfa / detection_delay) * (1 - missed_detection_rate); float MTR",
    "duplicate_detections": "later detections inside a window [d_k, d_k + tolerance]; adaptlab",
    "params_total": "parameter elements, tied tensors counted once, no buffers",
    "params_nonzero": "count_nonzero of the effective (pruned) weights, tied counted once; TAME",
    "learner.acc_task_inferred": "mean over segments of the accuracy of forward(x): the expert "
    "the selector routes x to, judged on the stream's labels (TAME's protocol; a wrong expert "
    "can be right by chance under local labels)",
    "learner.acc_task_oracle": "mean over segments of the accuracy of the segment's own expert "
    "(the one most active on it during training), routing bypassed",
    "learner.acc_class_il": "mean over segments of P(routed to an expert of this segment and "
    "its prediction right): class-incremental accuracy when labels are local",
    "learner.selector_acc": "mean over segments of P(routed to an expert whose majority "
    "training segment is this one)",
    "learner.n_experts": "experts that were active at some point of training",
}
