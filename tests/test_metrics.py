"""Tests for adaptlab.metrics and adaptlab.jsonio (spec: metrics.md §8).

Every expected value below is worked out by hand in the comments, not produced by the code.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from adaptlab import jsonio
from adaptlab import metrics as M

approx = pytest.approx

# ----------------------------------------------------------------------------- fixtures

# 3x3, schedule t1, t2, t3 (first = [0, 1, 2]).
R3 = [
    [0.8, 0.1, 0.2],
    [0.9, 0.7, 0.3],
    [0.6, 0.4, 0.9],
]
B3 = [0.1, 0.2, 0.25]
N3 = [100, 200, 100]

# 5x4 recurring, schedule t1, t2, t3, t2, t4: columns t1..t4, t2 first learnt at row 1,
# t4 at row 4, so first = [0, 1, 2, 4]. last = 4, P = {0, 1, 2}.
R5 = [
    [0.9, 0.2, 0.1, 0.3],  # row 0: after t1
    [0.7, 0.8, 0.2, 0.2],  # row 1: after t2
    [0.6, 0.5, 0.9, 0.1],  # row 2: after t3
    [0.5, 0.85, 0.6, 0.4],  # row 3: after t2 again
    [0.4, 0.7, 0.5, 0.8],  # row 4: after t4
]
F5 = [0, 1, 2, 4]
B5 = [0.25, 0.2, 0.15, 0.3]
N5 = [100, 100, 200, 100]


# --------------------------------------------------------------------- §2 on the 3x3


class TestSquare3x3:
    def test_acc_final(self):
        # (0.6 + 0.4 + 0.9) / 3
        assert M.acc_final(R3) == approx(1.9 / 3)
        assert M.acc_final(R3, per_segment=True) == approx([0.6, 0.4, 0.9])

    def test_acc_final_weighted(self):
        # (100*0.6 + 200*0.4 + 100*0.9) / 400 = 230 / 400
        assert M.acc_final_weighted(R3, N3) == approx(0.575)

    def test_acc_seen_curve_and_incremental_avg(self):
        # A0 = 0.8; A1 = (0.9 + 0.7)/2 = 0.8; A2 = 1.9/3
        assert M.acc_seen_curve(R3) == approx([0.8, 0.8, 1.9 / 3])
        assert M.acc_incremental_avg(R3) == approx((0.8 + 0.8 + 1.9 / 3) / 3)

    def test_forgetting_chaudhry(self):
        # j0: max(0.8, 0.9) - 0.6 = 0.3; j1: max(0.7) - 0.4 = 0.3; j2 not in P
        assert M.forgetting_chaudhry(R3, per_segment=True) == approx([0.3, 0.3, None])
        assert M.forgetting_chaudhry(R3) == approx(0.3)

    def test_forgetting_last(self):
        # j0: 0.8 - 0.6 = 0.2; j1: 0.7 - 0.4 = 0.3
        assert M.forgetting_last(R3, per_segment=True) == approx([0.2, 0.3, None])
        assert M.forgetting_last(R3) == approx(0.25)

    def test_forgetting_last_curve(self):
        # row1: {0}: 0.8 - 0.9 = -0.1; row2: (0.2 + 0.3)/2
        assert M.forgetting_last_curve(R3) == approx([None, -0.1, 0.25])

    def test_forgetting_last_matrix(self):
        expected = [
            [0, 0, 0],
            [-0.1, 0, 0],  # 0.8 - 0.9
            [0.2, 0.3, 0],  # 0.8 - 0.6, 0.7 - 0.4
        ]
        got = M.forgetting_last_matrix(R3)
        assert np.allclose(got, expected)

    def test_bwt(self):
        assert M.bwt_gem(R3) == approx(-0.25)
        assert M.bwt_gem(R3, per_segment=True) == approx([-0.2, -0.3, None])
        # pairs: (0.9-0.8) + (0.6-0.8) + (0.4-0.7) = -0.4; times 2/(3*2)
        assert M.bwt_pairwise(R3) == approx(-0.4 / 3)
        assert M.bwt_pairwise(R3, first=[0, 1, 2]) == approx(-0.4 / 3)

    def test_fwt(self):
        # j1: R[0][1] - b1 = 0.1 - 0.2 = -0.1; j2: R[1][2] - b2 = 0.3 - 0.25 = 0.05
        assert M.fwt_gem(R3, B3) == approx(-0.025)
        assert M.fwt_gem(R3, B3, per_segment=True) == approx([None, -0.1, 0.05])
        assert M.fwt_gem(R3, None) is None

    def test_matrix_report(self):
        rep = M.matrix_report(R3, b=B3, n=N3)
        assert rep == approx(
            {
                "acc_final": 1.9 / 3,
                "acc_final_weighted": 0.575,
                "acc_incremental_avg": (0.8 + 0.8 + 1.9 / 3) / 3,
                "forgetting_chaudhry": 0.3,
                "forgetting_last": 0.25,
                "bwt_gem": -0.25,
                "bwt_pairwise": -0.4 / 3,
                "fwt_gem": -0.025,
            }
        )
        bare = M.matrix_report(R3)
        assert bare["fwt_gem"] is None and bare["acc_final_weighted"] is None

    def test_running_report_row1(self):
        # Rows 0..1, columns seen at row 1 = {0, 1}: [[0.8, 0.1], [0.9, 0.7]].
        rep = M.running_report(R3, upto_row=1, b=B3, n=N3)
        assert rep["acc_final"] == approx(0.8)  # (0.9 + 0.7)/2 = A1
        assert rep["acc_incremental_avg"] == approx(0.8)  # (A0 + A1)/2
        assert rep["forgetting_chaudhry"] == approx(-0.1)  # 0.8 - 0.9
        assert rep["forgetting_last"] == approx(-0.1)
        assert rep["bwt_gem"] == approx(0.1)
        assert rep["bwt_pairwise"] == approx(0.1)  # 2/(2*1) * (0.9 - 0.8)
        assert rep["fwt_gem"] == approx(-0.1)  # R[0][1] - b1, column 2 not seen yet
        # all columns of row 1: (100*0.9 + 200*0.7 + 100*0.3)/400 = 260/400
        assert rep["acc_final_weighted"] == approx(0.65)

    def test_running_report_on_partial_matrix(self):
        # The evaluator's matrix so far (2 rows, 3 columns) with first for every column.
        rep = M.running_report(R3[:2], upto_row=1, first=[0, 1, 2])
        assert rep["bwt_pairwise"] == approx(0.1)
        assert rep["forgetting_last"] == approx(-0.1)


# -------------------------------------------------------------- §2 on the 5x4 recurring


class TestRecurring5x4:
    def test_requires_first(self):
        with pytest.raises(ValueError, match="first"):
            M.acc_final(R5)

    def test_acc(self):
        # (0.4 + 0.7 + 0.5 + 0.8)/4 = 2.4/4
        assert M.acc_final(R5, first=F5) == approx(0.6)
        # (40 + 70 + 100 + 80) / 500
        assert M.acc_final_weighted(R5, N5) == approx(0.58)
        # A0 = 0.9; A1 = 1.5/2; A2 = 2.0/3; A3 = (0.5+0.85+0.6)/3 (t4 unseen); A4 = 0.6
        curve = [0.9, 0.75, 2.0 / 3, 1.95 / 3, 0.6]
        assert M.acc_seen_curve(R5, first=F5) == approx(curve)
        assert M.acc_incremental_avg(R5, first=F5) == approx(sum(curve) / 5)

    def test_forgetting_chaudhry(self):
        # j0: max rows 0..3 = 0.9 - 0.4 = 0.5
        # j1: max rows 1..3 = max(0.8, 0.5, 0.85) - 0.7 = 0.15 (the relearnt peak counts)
        # j2: max rows 2..3 = 0.9 - 0.5 = 0.4; j3 learnt at last: not in P
        per = M.forgetting_chaudhry(R5, first=F5, per_segment=True)
        assert per == approx([0.5, 0.15, 0.4, None])
        assert M.forgetting_chaudhry(R5, first=F5) == approx(1.05 / 3)

    def test_forgetting_last(self):
        # j0: 0.9 - 0.4; j1: R[1][1] - R[4][1] = 0.8 - 0.7; j2: 0.9 - 0.5
        per = M.forgetting_last(R5, first=F5, per_segment=True)
        assert per == approx([0.5, 0.1, 0.4, None])
        assert M.forgetting_last(R5, first=F5) == approx(1.0 / 3)
        assert M.bwt_gem(R5, first=F5) == approx(-1.0 / 3)

    def test_forgetting_last_curve(self):
        # row1 {0}: 0.9-0.7 = 0.2; row2 {0,1}: (0.3 + 0.3)/2
        # row3 {0,1,2}: (0.4 - 0.05 + 0.3)/3; row4 {0,1,2}: 1.0/3
        expected = [None, 0.2, 0.3, 0.65 / 3, 1.0 / 3]
        assert M.forgetting_last_curve(R5, first=F5) == approx(expected)

    def test_forgetting_last_matrix(self):
        expected = np.array(
            [
                [0, 0, 0, 0],
                [0.2, 0, 0, 0],  # col0 ref R[0][0] = 0.9
                [0.3, 0.3, 0, 0],  # col1 ref R[1][1] = 0.8
                [0.4, -0.05, 0.3, 0],  # col2 ref R[2][2] = 0.9
                [0.5, 0.1, 0.4, 0],  # col3 learnt at row 4: always 0
            ]
        )
        assert np.allclose(M.forgetting_last_matrix(R5, first=F5), expected)

    def test_bwt_pairwise_undefined(self):
        assert M.bwt_pairwise(R5, first=F5) is None
        assert M.bwt_pairwise(R5) is None

    def test_fwt(self):
        # j1: R[0][1] - 0.2 = 0; j2: R[1][2] - 0.15 = 0.05; j3: R[3][3] - 0.3 = 0.1
        per = M.fwt_gem(R5, B5, first=F5, per_segment=True)
        assert per == approx([None, 0.0, 0.05, 0.1])
        assert M.fwt_gem(R5, B5, first=F5) == approx(0.05)

    def test_matrix_report(self):
        rep = M.matrix_report(R5, first=F5, b=B5, n=N5)
        assert rep == approx(
            {
                "acc_final": 0.6,
                "acc_final_weighted": 0.58,
                "acc_incremental_avg": (0.9 + 0.75 + 2.0 / 3 + 0.65 + 0.6) / 5,
                "forgetting_chaudhry": 0.35,
                "forgetting_last": 1.0 / 3,
                "bwt_gem": -1.0 / 3,
                "bwt_pairwise": None,
                "fwt_gem": 0.05,
            }
        )

    def test_running_report_row3(self):
        # Rows 0..3, columns {t1, t2, t3} (t4 first learnt at row 4).
        rep = M.running_report(R5, upto_row=3, first=F5, b=B5, n=N5)
        assert rep["acc_final"] == approx(0.65)  # A3
        assert rep["acc_incremental_avg"] == approx((0.9 + 0.75 + 2.0 / 3 + 0.65) / 4)
        # j0: max(0.9, 0.7, 0.6) - 0.5 = 0.4; j1: max(0.8, 0.5) - 0.85 = -0.05;
        # j2: 0.9 - 0.6 = 0.3
        assert rep["forgetting_chaudhry"] == approx(0.65 / 3)
        assert rep["forgetting_last"] == approx(0.65 / 3)
        assert rep["bwt_gem"] == approx(-0.65 / 3)
        assert rep["bwt_pairwise"] is None  # 4 rows x 3 columns
        assert rep["fwt_gem"] == approx(0.025)  # (0 + 0.05)/2, t4 not seen yet
        # row 3, all columns: (50 + 85 + 120 + 40)/500
        assert rep["acc_final_weighted"] == approx(0.59)

    def test_running_matches_curves_at_every_row(self):
        fl = M.forgetting_last_curve(R5, first=F5)
        seen = M.acc_seen_curve(R5, first=F5)
        for i in range(5):
            rep = M.running_report(R5, upto_row=i, first=F5)
            assert rep["forgetting_last"] == approx(fl[i])
            assert rep["acc_final"] == approx(seen[i])


# ------------------------------------------------------------- undefined values & NaN


class TestUndefined:
    def test_single_row(self):
        R = [[0.5]]
        assert M.acc_final(R) == 0.5
        assert M.forgetting_chaudhry(R) is None
        assert M.forgetting_last(R) is None
        assert M.bwt_gem(R) is None
        assert M.bwt_pairwise(R) is None
        assert M.fwt_gem(R, [0.1]) is None
        assert M.forgetting_last_curve(R) == [None]

    def test_nan_means_not_evaluated(self):
        R = np.array(R3)
        R[2, 1] = np.nan
        assert M.acc_final(R) == approx(0.75)  # (0.6 + 0.9)/2
        assert M.forgetting_last(R) == approx(0.2)  # j1 skipped
        assert M.forgetting_chaudhry(R, per_segment=True) == approx([0.3, None, None])
        # (100*0.6 + 100*0.9)/200
        assert M.acc_final_weighted(R, N3) == approx(0.75)
        F = M.forgetting_last_matrix(R)
        assert F[2][1] is None and F[2][0] == approx(0.2)
        # pairs without (2,1): (0.1 - 0.2)/2
        assert M.bwt_pairwise(R) == approx(-0.05)

    def test_none_entries_are_nan(self):
        R = [[0.5, None], [0.4, 0.6]]
        assert M.acc_final(R) == approx(0.5)
        assert M.fwt_gem(R, [0.0, 0.1]) is None  # R[0][1] not evaluated

    def test_returns_python_floats(self):
        v = M.acc_final(np.array(R3, dtype=np.float32))
        assert type(v) is float
        assert all(type(x) is float for x in M.acc_seen_curve(R3))

    def test_bad_first(self):
        with pytest.raises(ValueError):
            M.acc_final(R5, first=[0, 1, 2])
        with pytest.raises(ValueError):
            M.acc_final(R5, first=[0, 1, -2, 4])


# ----------------------------------------------------------- §2 properties, seeded random


def _random_case(rng: np.random.Generator):
    """A random accuracy matrix with a random (possibly recurring) schedule."""
    S = int(rng.integers(1, 6))
    extra = int(rng.integers(0, 4))
    schedule = list(range(S))
    for _ in range(extra):  # recurrences inserted after their first occurrence
        seg = int(rng.integers(0, S))
        pos = int(rng.integers(seg + 1, len(schedule) + 1))
        schedule.insert(pos, seg)
    first = [schedule.index(j) for j in range(S)]
    R = rng.uniform(0, 1, size=(len(schedule), S))
    return R, first


SEEDS = range(200)


@pytest.mark.parametrize("seed", SEEDS)
def test_property_chaudhry_ge_last(seed):
    R, first = _random_case(np.random.default_rng(seed))
    fc = M.forgetting_chaudhry(R, first=first, per_segment=True)
    fl = M.forgetting_last(R, first=first, per_segment=True)
    for c, last in zip(fc, fl, strict=True):
        assert (c is None) == (last is None)
        if c is not None:
            assert c >= last - 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_property_constant_and_monotone_columns(seed):
    rng = np.random.default_rng(seed)
    R, first = _random_case(rng)
    E, S = R.shape
    const = R.copy()
    mono = np.sort(R, axis=0)  # non-decreasing in every column
    for j in range(S):
        const[first[j] :, j] = const[first[j], j]
    assert M.forgetting_chaudhry(const, first=first) in (None, approx(0.0))
    assert M.forgetting_last(const, first=first) in (None, approx(0.0))
    for per in (
        M.forgetting_chaudhry(mono, first=first, per_segment=True),
        M.forgetting_last(mono, first=first, per_segment=True),
    ):
        assert all(x is None or x <= 1e-12 for x in per)
    if E >= 2:  # segment 0 is learnt at row 0 < last, so the mean is defined
        assert M.forgetting_last(const, first=first) is not None


@pytest.mark.parametrize("seed", SEEDS)
def test_property_bwt_gem_is_minus_forgetting_last(seed):
    R, first = _random_case(np.random.default_rng(seed))
    fl = M.forgetting_last(R, first=first)
    bwt = M.bwt_gem(R, first=first)
    assert (fl is None) == (bwt is None)
    if fl is not None:
        assert bwt == approx(-fl)


@pytest.mark.parametrize("seed", range(50))
def test_property_bwt_gem_equals_pairwise_for_two_rows(seed):
    R = np.random.default_rng(seed).uniform(0, 1, size=(2, 2))
    assert M.bwt_pairwise(R) == approx(R[1, 0] - R[0, 0])
    assert M.bwt_gem(R) == approx(M.bwt_pairwise(R))


def test_property_pairwise_differs_from_gem_in_general():
    # Guard that the E=2 equality above is not trivial: on R3 they differ.
    assert M.bwt_gem(R3) != approx(M.bwt_pairwise(R3))


# ------------------------------------------------------------------------ §3 online

# Six batches; the third is only partly labelled (n=5).
EVENTS = M.OnlineEvents(
    pos=[0, 10, 20, 30, 40, 50],
    n=[10, 10, 5, 10, 10, 10],
    n_correct=[5, 7, 5, 2, 4, 6],
    seg=[0, 0, 0, 1, 1, 1],
)


class TestOnline:
    def test_acc_online(self):
        # 29 correct / 55 labelled
        assert M.acc_online(EVENTS) == approx(29 / 55)
        # seg0: 17/25; seg1: 12/30
        assert M.acc_online_per_segment(EVENTS) == approx({0: 0.68, 1: 0.4})
        assert M.acc_online(EVENTS, per_segment=True) == approx({0: 0.68, 1: 0.4})

    def test_int32_and_records(self):
        ev = M.OnlineEvents.from_records([(0, 10, 5, 0), (10, 10, 7, 0)])
        assert M.acc_online(ev) == approx(0.6)
        ev32 = M.OnlineEvents(*(np.asarray(x, dtype=np.int32) for x in ([0], [4], [3], [0])))
        assert M.acc_online(ev32) == approx(0.75)

    def test_empty(self):
        ev = M.OnlineEvents.from_records([])
        assert M.acc_online(ev) is None
        assert M.acc_online_windowed(ev) is None
        assert M.tta_online_error(ev) is None
        assert M.acc_online_windowed_curve(ev) == []
        unlabelled = M.OnlineEvents([0], [0], [0], [0])
        assert M.acc_online(unlabelled) is None

    def test_invalid(self):
        with pytest.raises(ValueError):
            M.OnlineEvents([0], [5], [6], [0])

    def test_windowed(self):
        # cumulative n: 0,10,20,25,35,45,55. window 20 at the end -> events 4,5: 10/20.
        assert M.acc_online_windowed(EVENTS, window=20) == approx(0.5)
        # window 25 -> events 3,4,5 (the two newest hold only 20): 12/30
        assert M.acc_online_windowed(EVENTS, window=25) == approx(0.4)
        # window larger than the stream: everything
        assert M.acc_online_windowed(EVENTS, window=10_000) == approx(29 / 55)

    def test_windowed_curve(self):
        # after k events, window 20:
        # k1: 5/10; k2: 12/20; k3 (only 25 samples, need all 3): 17/25;
        # k4: events 1..3 = (7+5+2)/25; k5: events 3,4 = 6/20; k6: events 4,5 = 10/20
        got = M.acc_online_windowed_curve(EVENTS, window=20)
        assert [p for p, _ in got] == [0, 10, 20, 30, 40, 50]
        assert [v for _, v in got] == approx([0.5, 0.6, 0.68, 0.56, 0.3, 0.5])
        every2 = M.acc_online_windowed_curve(EVENTS, window=20, every=2)
        assert [p for p, _ in every2] == [10, 30, 50]
        assert [v for _, v in every2] == approx([0.6, 0.56, 0.5])

    def test_tta(self):
        assert M.tta_online_error(EVENTS) == approx(26 / 55)
        assert M.tta_online_error(EVENTS, per_segment=True) == approx({0: 0.32, 1: 0.6})
        # each segment a domain: (0.32 + 0.6)/2
        assert M.tta_online_error_mean_domain(EVENTS) == approx(0.46)
        # one domain holding both segments: pooled error
        assert M.tta_online_error_mean_domain(EVENTS, {0: "fog", 1: "fog"}) == approx(26 / 55)

    def test_mean_domain_equals_pooled_for_equal_lengths(self):
        ev = M.OnlineEvents([0, 10, 20, 30], [10, 10, 10, 10], [1, 2, 8, 9], [0, 1, 2, 3])
        groups = {0: "a", 1: "a", 2: "b", 3: "b"}
        # a: 3/20 correct -> 0.85; b: 17/20 -> 0.15; mean 0.5 = pooled 1 - 20/40
        assert M.tta_online_error_mean_domain(ev, groups) == approx(0.5)
        assert M.tta_online_error(ev) == approx(0.5)


class TestAnytime:
    def test_pooled_values(self):
        # D = 100, 100, 200: (0.5*100 + 0.6*100 + 0.8*200)/400
        assert M.acc_anytime_auc([100, 200, 400], [0.5, 0.6, 0.8]) == approx(270 / 400)

    def test_uniform_spacing_is_mean(self):
        assert M.acc_anytime_auc([50, 100, 150], [0.2, 0.4, 0.9]) == approx(0.5)

    def test_per_segment_weighting(self):
        acc = [[0.5, np.nan], [0.6, 0.4], [0.8, 0.6]]
        # sample-weighted, n = [100, 300]: a = 0.5, (60+120)/400 = 0.45, (80+180)/400 = 0.65
        # -> (50 + 45 + 130)/400
        auc = M.acc_anytime_auc([100, 200, 400], acc, n=[100, 300])
        assert auc == approx(225 / 400)
        # segment mean: a = 0.5, 0.5, 0.7 -> (50 + 50 + 140)/400
        auc_seg = M.acc_anytime_auc([100, 200, 400], acc, weighting="segment")
        assert auc_seg == approx(240 / 400)
        curve = M.acc_anytime_curve([100, 200, 400], acc, n=[100, 300])
        assert [p for p, _ in curve] == [100, 200, 400]
        assert [v for _, v in curve] == approx([0.5, 0.45, 0.65])

    def test_undefined(self):
        assert M.acc_anytime_auc([], []) is None
        with pytest.raises(ValueError):
            M.acc_anytime_auc([100], [[0.5, 0.5]])  # sample weighting needs n


# ----------------------------------------------------------------- §4 shift detection


class TestDetection:
    def test_one_shift_detected_in_tolerance(self):
        rep = M.detection_report([1000], [1100], 2000, tolerance=200)
        assert rep.true_positives == 1
        assert rep.detection_delay == 100
        assert rep.false_alarms == 0
        assert rep.missed_detections == 0
        assert rep.missed_detection_rate == 0
        assert rep.false_discovery_rate == 0
        assert rep.duplicate_detections == 0
        assert rep.mtfa is None and rep.mtr is None
        assert rep.labels == ["true_positive"]

    def test_detection_before_first_shift(self):
        shifts, dets = [1000, 3000], [500, 1050, 1100, 3150, 4000]
        rep = M.detection_report(shifts, dets, 5000, tolerance=200)
        # 500: before d1 -> FA; 1050: TP (50); 1100: duplicate; 3150: TP (150);
        # 4000: outside [3000, 3200] -> FA
        assert rep.labels == [
            "false_alarm",
            "true_positive",
            "duplicate",
            "true_positive",
            "false_alarm",
        ]
        assert rep.false_alarms == 2
        assert rep.false_alarms_per_1k == approx(0.4)  # 1000*2/5000
        assert rep.duplicate_detections == 1
        assert rep.detection_delay == approx(100)  # (50 + 150)/2
        assert rep.delays == [50, 150]
        assert rep.false_discovery_rate == approx(0.4)  # 2/5
        assert rep.mtfa == approx(3500)  # 4000 - 500
        assert rep.mtr == approx(35)  # 3500/100 * (1 - 0)
        # With a warmup of 600 the early detection is not a false alarm.
        rep_w = M.detection_report(shifts, dets, 5000, tolerance=200, warmup=600)
        assert rep_w.labels[0] == "ignored"
        assert rep_w.false_alarms == 1
        assert rep_w.n_detections == 4
        assert rep_w.false_discovery_rate == approx(0.25)
        assert rep_w.mtfa is None and rep_w.mtr is None

    def test_missed_shift_both_conventions(self):
        shifts, dets, N = [1000, 3000], [1100], 5000
        rep = M.detection_report(shifts, dets, N, tolerance=200)
        # shift 2 has no detection in [3000, 5000): counts 5000 - 3000 = 2000
        assert rep.detection_delay == approx((100 + 2000) / 2)
        assert rep.delays == [100, None]
        assert rep.missed_detections == 1
        assert rep.missed_detection_rate == approx(0.5)
        assert rep.false_alarms == 0
        skip = M.detection_report(shifts, dets, N, tolerance=200, missed="skip")
        assert skip.detection_delay == approx(100)
        assert skip.missed_detections == 1
        assert M.detection_delay(shifts, dets, N) == approx(1050)
        assert M.detection_delay(shifts, dets, N, missed="skip") == approx(100)
        assert M.detection_delay(shifts, [], N, missed="skip") is None
        # shift 1 missed: interval length 3000 - 1000 = 2000
        assert M.detection_delay(shifts, [3100], N) == approx((2000 + 100) / 2)

    def test_late_detection_is_false_alarm_and_miss(self):
        # 3500 is first in [3000, 5000) but 500 > tolerance: FA, shift missed; the delay
        # still uses the first detection in the interval (float's convention).
        rep = M.detection_report([1000, 3000], [1100, 3500], 5000, tolerance=200)
        assert rep.labels == ["true_positive", "false_alarm"]
        assert rep.missed_detections == 1
        assert rep.false_alarms == 1
        assert rep.detection_delay == approx(300)  # (100 + 500)/2
        assert rep.false_discovery_rate == approx(0.5)

    def test_duplicates(self):
        dets = [1000, 1010, 1150, 1200, 1201, 1500]
        rep = M.detection_report([1000], dets, 2000, tolerance=200)
        # window [1000, 1200] closed: 1010, 1150, 1200 duplicates; 1201, 1500 false alarms
        assert rep.duplicate_detections == 3
        assert rep.false_alarms == 2
        assert rep.true_positives == 1
        assert rep.detection_delay == 0
        assert rep.false_discovery_rate == approx(2 / 6)
        assert rep.mtfa == approx(299)
        assert rep.mtr is None  # zero delay: ratio undefined

    def test_interval_truncates_window(self):
        # 1150 >= d2 = 1100: it belongs to shift 2 (TP, delay 50); shift 1 has none.
        rep = M.detection_report([1000, 1100], [1150], 3000, tolerance=200)
        assert rep.labels == ["true_positive"]
        assert rep.delays == [None, 50]
        assert rep.missed_detections == 1
        assert rep.detection_delay == approx((100 + 50) / 2)

    def test_no_shifts(self):
        rep = M.detection_report([], [100, 400, 1000], 2000, tolerance=200)
        assert rep.false_alarms == 3
        assert rep.false_alarms_per_1k == approx(1.5)
        assert rep.mtfa == approx(450)  # (300 + 600)/2
        for name in (
            "detection_delay",
            "missed_detections",
            "missed_detection_rate",
            "false_discovery_rate",
            "mtr",
            "duplicate_detections",
            "true_positives",
        ):
            assert getattr(rep, name) is None, name
        assert M.detection_report([], [], 2000, tolerance=1).false_alarms == 0

    def test_no_detections(self):
        rep = M.detection_report([1000], [], 2000, tolerance=200)
        assert rep.false_discovery_rate == 0
        assert rep.missed_detection_rate == 1
        assert rep.detection_delay == approx(1000)

    def test_default_tolerance_and_asdict(self):
        rep = M.detection_report([1000], [1600], 2000, batch_size=32)
        assert rep.tolerance == 640  # 20 * B
        assert rep.true_positives == 1
        rep_tight = M.detection_report([1000], [1600], 2000, batch_size=16)
        assert rep_tight.true_positives == 0 and rep_tight.false_alarms == 1
        d = dataclasses.asdict(rep)
        for name in ("detection_delay", "false_alarms", "false_alarms_per_1k", "mtfa", "mtr",
                     "missed_detections", "missed_detection_rate", "false_discovery_rate",
                     "duplicate_detections"):  # fmt: skip
            assert name in d
        json.dumps(jsonio.to_jsonable(rep), allow_nan=False)
        with pytest.raises(ValueError):
            M.detection_report([1000], [1600], 2000)

    def test_invalid_inputs(self):
        with pytest.raises(ValueError):
            M.detection_report([1000, 500], [], 2000, tolerance=1)
        with pytest.raises(ValueError):
            M.detection_report([1000], [600, 500], 2000, tolerance=1)


# ----------------------------------------------------------------------- §5 model size


class TestParams:
    @staticmethod
    def _tiny():
        torch = pytest.importorskip("torch")
        nn = torch.nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 4)  # 40
                self.lin = nn.Linear(4, 3)  # 12 + 3
                self.head = nn.Linear(4, 10, bias=False)  # 40, tied to emb
                self.head.weight = self.emb.weight
                self.register_buffer("stats", torch.ones(100))  # not counted

        model = Tiny()
        with torch.no_grad():
            model.emb.weight.fill_(1.0)
            model.lin.weight.copy_(torch.arange(1, 13, dtype=torch.float32).view(3, 4))
            model.lin.bias.copy_(torch.tensor([0.0, 2.0, 3.0]))
        return torch, model

    def test_tied(self):
        _, model = self._tiny()
        assert M.params_total(model) == 55  # 40 + 15, the tied head once
        assert M.params_nonzero(model) == 54  # one zero bias entry
        assert M.params_total([model.lin, model]) == 55  # modules overlapping
        assert M.params_total([model.lin]) == 15

    def test_pruned(self):
        torch, model = self._tiny()
        from torch.nn.utils import prune

        prune.l1_unstructured(model.lin, "weight", amount=6)  # masks values 1..6
        assert hasattr(model.lin, "weight_orig")
        assert M.params_total(model) == 55  # weight_orig counted once; mask is a buffer
        # naive count on the raw parameters still sees 54 non-zeros
        raw = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        assert raw == 54
        assert M.params_nonzero(model) == 48  # 54 - 6 pruned
        prune.remove(model.lin, "weight")
        assert M.params_nonzero(model) == 48
        assert M.params_total(model) == 55


# --------------------------------------------------------------------------- JSON


class TestJson:
    def test_to_jsonable(self):
        @dataclasses.dataclass
        class D:
            x: float
            y: tuple

        obj = {
            "nan": float("nan"),
            "inf": np.float32("inf"),
            "arr": np.array([1.0, np.nan, 2.5]),
            "ints": np.arange(3, dtype=np.int32),
            "i": np.int64(7),
            "b": np.bool_(True),
            3: "int key",
            "dc": D(np.float64(-np.inf), (1, 2)),
        }
        got = jsonio.to_jsonable(obj)
        assert got == {
            "nan": None,
            "inf": None,
            "arr": [1.0, None, 2.5],
            "ints": [0, 1, 2],
            "i": 7,
            "b": True,
            "3": "int key",
            "dc": {"x": None, "y": [1, 2]},
        }
        assert type(got["i"]) is int and type(got["arr"][0]) is float
        text = json.dumps(got, allow_nan=False)
        assert "NaN" not in text and "null" in text
        with pytest.raises(TypeError):
            jsonio.to_jsonable({"x": object()})

    def test_write_and_read_back(self, tmp_path):
        path = tmp_path / "metrics.json"
        doc = {
            "schema_version": 1,
            "final": M.matrix_report(R5, first=F5, b=B5, n=N5),
            "accuracy_matrix": {"rows": [{"acc": [0.5, float("nan")]}]},
            "shift_detection": {"report": M.detection_report([10], [12], 100, tolerance=5)},
            "definitions": M.DEFINITIONS,
        }
        jsonio.write_json_atomic(path, doc)
        back = jsonio.read_json(path)
        assert back["final"]["bwt_pairwise"] is None
        assert back["final"]["acc_final"] == approx(0.6)
        assert back["accuracy_matrix"]["rows"][0]["acc"] == [0.5, None]
        assert back["shift_detection"]["report"]["detection_delay"] == 2
        assert back["definitions"]["bwt_gem"] == M.DEFINITIONS["bwt_gem"]
        assert "NaN" not in path.read_text()
        assert not (tmp_path / "metrics.json.tmp").exists()

    def test_failed_conversion_keeps_old_file(self, tmp_path):
        path = tmp_path / "metrics.json"
        jsonio.write_json_atomic(path, {"status": "running", "v": 1})
        before = path.read_bytes()
        with pytest.raises(TypeError):
            jsonio.write_json_atomic(path, {"status": "completed", "bad": object()})
        assert path.read_bytes() == before
        assert not (tmp_path / "metrics.json.tmp").exists()

    def test_exception_mid_write_keeps_old_file(self, tmp_path, monkeypatch):
        path = tmp_path / "metrics.json"
        jsonio.write_json_atomic(path, {"status": "running", "v": 1})
        before = path.read_bytes()
        tmp_seen = []

        def failing_fsync(fd):
            # The new document is already (partly) in the tmp file when this raises.
            tmp_seen.append((tmp_path / "metrics.json.tmp").exists())
            raise OSError("disk full")

        monkeypatch.setattr(jsonio.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            jsonio.write_json_atomic(path, {"status": "completed", "v": 2})
        assert tmp_seen == [True]
        assert path.read_bytes() == before
        assert jsonio.read_json(path) == {"status": "running", "v": 1}
        assert not (tmp_path / "metrics.json.tmp").exists()

    def test_interrupt_mid_write(self, tmp_path, monkeypatch):
        # KeyboardInterrupt (a killed run) raised by json.dump part way through.
        path = tmp_path / "metrics.json"
        jsonio.write_json_atomic(path, [1, 2, 3])
        real_dump = json.dump

        def partial_dump(obj, fh, **kw):
            fh.write('{"status": "comp')
            raise KeyboardInterrupt

        monkeypatch.setattr(jsonio.json, "dump", partial_dump)
        with pytest.raises(KeyboardInterrupt):
            jsonio.write_json_atomic(path, {"status": "completed"})
        monkeypatch.setattr(jsonio.json, "dump", real_dump)
        assert jsonio.read_json(path) == [1, 2, 3]
        assert not (tmp_path / "metrics.json.tmp").exists()


def test_definitions_cover_public_metrics():
    names = [
        "acc_final", "acc_final_weighted", "acc_seen_curve", "acc_incremental_avg",
        "forgetting_chaudhry", "forgetting_last", "forgetting_last_curve",
        "forgetting_last_matrix", "bwt_gem", "bwt_pairwise", "fwt_gem", "acc_online",
        "acc_online_windowed", "acc_online_per_segment", "acc_anytime_auc", "tta_online_error",
        "tta_online_error_mean_domain", "detection_delay", "false_alarms", "false_alarms_per_1k",
        "missed_detections", "missed_detection_rate", "false_discovery_rate", "mtfa", "mtr",
        "duplicate_detections", "params_total", "params_nonzero",
    ]  # fmt: skip
    for name in names:
        assert M.DEFINITIONS.get(name), name


# ------------------------------------------------------------ Avalanche agreement


@pytest.mark.avalanche
class TestAvalancheAgreement:
    """``avalanche.evaluation.functional.forgetting`` vs forgetting_last_matrix."""

    @staticmethod
    def _forgetting():
        pytest.importorskip("avalanche")
        from avalanche.evaluation.functional import forgetting

        return forgetting

    def test_square(self):
        forgetting = self._forgetting()
        ours = np.array(M.forgetting_last_matrix(R3), dtype=float)
        assert np.allclose(forgetting(np.array(R3)), ours)
        # Avalanche's last row, averaged over P, is forgetting_last.
        assert np.mean(forgetting(np.array(R3))[-1, :2]) == approx(M.forgetting_last(R3))

    def test_recurring_with_boundary_indices(self):
        forgetting = self._forgetting()
        theirs = forgetting(np.array(R5), boundary_indices=F5)
        ours = np.array(M.forgetting_last_matrix(R5, first=F5), dtype=float)
        assert np.allclose(theirs, ours)
        assert np.mean(theirs[-1, :3]) == approx(M.forgetting_last(R5, first=F5))

    @pytest.mark.parametrize("seed", range(20))
    def test_random(self, seed):
        forgetting = self._forgetting()
        R, first = _random_case(np.random.default_rng(seed))
        theirs = forgetting(R, boundary_indices=first)
        ours = np.array(M.forgetting_last_matrix(R, first=first), dtype=float)
        assert np.allclose(theirs, ours)
        if R.shape[0] == R.shape[1] and first == list(range(R.shape[1])):
            assert np.allclose(forgetting(R), ours)


def test_recovery_samples_on_hand_made_events():
    from adaptlab.metrics import OnlineEvents, recovery_samples

    # occurrence 1 (samples 0..40), batches of 4 with 0,0,1,2,4,4,4,4,4,4 correct: plateau 1.0
    # (the last 2 batches); the 4-batch mean first reaches 0.9 at batch 7 (pos 28) -> 32
    # samples. Occurrence 2: right from its first batch -> one 4-batch window, 16 samples.
    # Occurrence 3: never right, plateau 0 -> None.
    c1 = [0, 0, 1, 2, 4, 4, 4, 4, 4, 4]
    c2 = [4] * 10
    c3 = [0] * 10
    pos = list(range(0, 120, 4))
    ev = OnlineEvents(pos, [4] * 30, c1 + c2 + c3, [0] * 10 + [1] * 10 + [2] * 10)
    assert recovery_samples(ev, [40, 80, 120]) == [32, 16, None]
    assert recovery_samples(ev, [40], smooth=1) == [20]
