"""Generated sources (`streams/generated.py`) and Split with classes shared between tasks."""

from __future__ import annotations

import pytest
import torch

from adaptlab.streams import Permuted, Split
from adaptlab.streams.generated import signals, tabular
from adaptlab.streams.sources import load_source


@pytest.mark.parametrize("make,shape", [(tabular, (20,)), (signals, (1, 40))])
def test_generated_sources_are_pure_functions_of_their_arguments(make, shape) -> None:
    a, b = make(n_samples=300), make(n_samples=300)
    assert a.fingerprint == b.fingerprint and torch.equal(a.x_train, b.x_train)
    assert a.sample_shape == shape and a.n_classes == 10
    assert make(n_samples=300, seed=1).fingerprint != a.fingerprint
    # stratified: every class on both sides
    assert torch.bincount(a.y_test, minlength=10).min() > 0
    named = load_source(a.name, source_args={"n_samples": 300})
    assert named.fingerprint == a.fingerprint


def test_signal_noise_controls_difficulty() -> None:
    """Nearest-template accuracy falls as the noise grows (what the matrix relies on)."""
    def nearest_mean_acc(noise: float) -> float:
        s = signals(noise=noise, jitter=0, n_samples=1000)
        means = torch.stack([s.x_train[s.y_train == c].mean(0) for c in range(10)]).flatten(1)
        pred = torch.cdist(s.x_test.flatten(1), means).argmin(1)
        return (pred == s.y_test).float().mean().item()

    clean, noisy = nearest_mean_acc(0.3), nearest_mean_acc(3.0)
    assert clean > 0.95 and noisy < clean - 0.2


def test_shared_classes_are_dealt_disjointly() -> None:
    groups = [[0, 1, 2], [2, 3, 4], [4, 5, 0]]
    with pytest.raises(ValueError, match=r"segments: classes \[0, 2, 4\] appear more than once"):
        Split(source="tabular", segments=groups).build()
    st = Split(source="tabular", source_args={"n_samples": 600}, segments=groups,
               shared_classes="partition").build()
    src = load_source("tabular", source_args={"n_samples": 600})
    # every training sample of classes 0..5 appears exactly once in the stream
    used = torch.cat([st.x[st.segment_ids == s] for s in range(3)])
    pool = src.x_train[src.y_train < 6]
    assert len(used) == len(pool)
    assert torch.equal(used.sort(0).values, pool.sort(0).values)
    for s, g in enumerate(groups):
        assert set(st.y[st.segment_ids == s].tolist()) == set(g)
        assert set(st.test_sets[s][1].tolist()) == set(g)
    # the shared class 2 is split between segments 0 and 1, near equally
    n0 = int((st.y[st.segment_ids == 0] == 2).sum())
    n1 = int((st.y[st.segment_ids == 1] == 2).sum())
    assert abs(n0 - n1) <= 1 and n0 + n1 == int((src.y_train == 2).sum())


def test_permuted_generated_tabular_keeps_labels() -> None:
    st = Permuted(source="tabular", source_args={"n_samples": 300}, n_segments=3).build()
    assert st.name == "permuted_tabular" and st.input_shape == (20,)
    assert torch.equal(st.test_sets[0][1], st.test_sets[2][1])
