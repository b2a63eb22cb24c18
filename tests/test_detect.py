"""`ShiftDetector` (spec tame.md §2, §11 tests 1, 3, 4): the threshold rule, EWMA, grace,
stationary noise, the Welch alternative, and checkpointing across a change in channels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptlab.detect import ShiftDetector

LN2 = math.log(2)


def run(det: ShiftDetector, losses: np.ndarray) -> int:
    """Refresh, decide, commit on channel 0 (seeded ln 2 if new) for every loss; returns how
    often it fired."""
    if det.n_channels == 0:
        det.add_channel(LN2)
    fired = 0
    for v in losses:
        det.refresh_threshold(0)
        c = det.candidate(torch.tensor([v]))[0]
        fired += det.fired(0, c, float(v))
        det.commit(0, float(v))
    return fired


def test_threshold_formula() -> None:
    det = ShiftDetector(window=5)
    det.add_channel(LN2)
    assert float(det.tau[0]) == pytest.approx(LN2 + 3 * 0.005)  # sigma 0 -> the floor

    det.add_channel(0.5)
    for v in (0.6, 0.7):
        det.commit(1, v)
    det.refresh_threshold(1)
    assert float(det.tau[1]) == pytest.approx(0.8449, abs=1e-4)  # mu + 3 * population std

    det.add_channel(0.5)
    for _ in range(3):
        det.commit(2, 0.5)
    det.refresh_threshold(2)
    assert float(det.tau[2]) == pytest.approx(0.515)  # constant window: the floor


def test_seed_leaves_after_w_appends_and_first_ewma_is_the_loss() -> None:
    det = ShiftDetector(window=5)
    det.add_channel(10.0)
    assert float(det.candidate(torch.tensor([0.3]))[0]) == pytest.approx(0.3)
    for _ in range(4):
        det.commit(0, 1.0)
    det.refresh_threshold(0)
    assert float(det.tau[0]) > 2  # the seed is still in the window
    det.commit(0, 1.0)
    det.refresh_threshold(0)
    assert float(det.tau[0]) == pytest.approx(1.015)
    assert float(det.sbar[0]) == pytest.approx(1.0)


def test_ewma_candidate_is_pure() -> None:
    det = ShiftDetector(window=10, alpha=0.2)
    det.add_channel(LN2)
    det.commit(0, 0.5)
    c = det.candidate(torch.tensor([1.0]))
    assert float(c[0]) == pytest.approx(0.2 * 1.0 + 0.8 * 0.5)
    assert float(det.sbar[0]) == pytest.approx(0.5)  # unchanged until commit


@pytest.mark.parametrize("window", [35, 100])
def test_stationary_noise_never_triggers(window: int) -> None:
    losses = np.random.default_rng(0).normal(0.5, 0.05, 10_000)
    assert run(ShiftDetector(window=window, alpha=0.2), losses) == 0


def test_without_smoothing_noise_triggers() -> None:
    losses = np.random.default_rng(0).normal(0.5, 0.05, 10_000)
    assert 17 <= run(ShiftDetector(window=35, alpha=1.0), losses) <= 35


@pytest.mark.parametrize(("grace", "fires"), [(0, True), (20, False)])
def test_grace(grace: int, fires: bool) -> None:
    det = ShiftDetector(window=100, grace=grace)
    det.add_channel(LN2)
    det.refresh_threshold(0)
    loss = LN2 + 0.03
    assert det.fired(0, det.candidate(torch.tensor([loss]))[0], loss) is fires


def test_update_single_signal_fires_once_on_a_step() -> None:
    rng = np.random.default_rng(1)
    det = ShiftDetector(window=50)
    losses = np.concatenate([rng.normal(0.3, 0.02, 500), rng.normal(0.9, 0.02, 300)])
    fired = [t for t, v in enumerate(losses) if det.update(float(v))]
    assert fired and 500 <= fired[0] <= 502
    assert len(fired) == 1


def test_welch_test_detects_a_step_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    det = ShiftDetector(window=100, test="welch", welch_p=1e-3)
    det.add_channel(0.5)
    assert run(det, rng.normal(0.5, 0.05, 300)) == 0
    fired = []
    for v in rng.normal(0.9, 0.05, 10):
        fired.append(det.fired(0, 0.0, float(v)))
        det.commit(0, float(v))
    assert any(fired)  # within welch_recent batches of the step


def test_state_dict_resizes_to_saved_channels() -> None:
    det = ShiftDetector(window=10)
    for seed in (LN2, 0.4, 0.3):
        det.add_channel(seed)
    det.commit(1, 0.2)
    fresh = ShiftDetector(window=10)
    fresh.add_channel(LN2)
    fresh.load_state_dict(det.state_dict())
    assert fresh.n_channels == 3
    for name, t in det.state_dict().items():
        assert torch.equal(t.nan_to_num(-1), fresh.state_dict()[name].nan_to_num(-1)), name


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="test"):
        ShiftDetector(test="ks")
    with pytest.raises(ValueError, match="alpha"):
        ShiftDetector(alpha=0)
