"""Stream builders and schedules on digits: arithmetic, determinism, errors (streams.md §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from adaptlab.streams import (
    UNLABELED,
    Corrupted,
    Permuted,
    Rotated,
    Split,
    corrupted,
    permuted,
    rotated,
    split,
)

SMALL = {"max_samples_per_segment": 60, "test_samples_per_segment": 20}


def test_split_abrupt_positions_and_labels():
    st = split(batch_size=10)
    sizes = [s.n_train for s in st.segments]
    ends = np.cumsum(sizes)
    # Boundaries are rounded up to a batch multiple, the last one is N.
    assert st.eval_positions == tuple(
        [int(-(-e // 10) * 10) for e in ends[:-1]] + [len(st)]
    )
    assert st.true_shifts == tuple(int(e) for e in ends[:-1])
    assert st.row_segments == (0, 1, 2, 3, 4)
    assert st.first_rows == (0, 1, 2, 3, 4)
    assert len(st) == 1257 and sum(s.n_test for s in st.segments) == 540
    for s in st.segments:
        ys = st.y[st.segment_ids == s.id]
        assert set(ys.tolist()) == set(s.params["classes"])
        assert set(st.test_sets[s.id][1].tolist()) == set(s.params["classes"])


def test_split_local_labels_and_explicit_groups():
    st = split(segments=[[3, 7], [1, 2, 5]], labels="local")
    assert st.n_classes == 3
    assert set(st.y[st.segment_ids == 0].tolist()) == {0, 1}
    assert set(st.y[st.segment_ids == 1].tolist()) == {0, 1, 2}


def test_recurring_order_rows_and_first():
    st = split(order=[0, 1, 2, 1, 3], **SMALL)
    assert st.row_segments == (0, 1, 2, 1, 3)
    assert [s.id for s in st.segments] == [0, 1, 2, 3]  # segment 4 is not in the order
    assert st.first_rows == (0, 1, 2, 4)
    seg = st.segment_ids.numpy()
    runs = [int(seg[0])] + [int(b) for a, b in zip(seg, seg[1:]) if a != b]
    assert runs == [0, 1, 2, 1, 3]
    assert len(st) == 5 * 60 and st.eval_positions == (60, 120, 180, 240, 300)
    # "reuse" shows the same pool again, freshly shuffled.
    occ = [st.x[i * 60:(i + 1) * 60].reshape(60, -1) for i in (1, 3)]
    assert not torch.equal(occ[0], occ[1])
    assert sorted(map(tuple, occ[0].tolist())) == sorted(map(tuple, occ[1].tolist()))


def test_recurrence_split_uses_disjoint_parts():
    st = split(order=[0, 1, 0], recurrence="split", **SMALL)
    first, second = st.x[:30].reshape(30, -1), st.x[90:].reshape(30, -1)
    assert len(st) == 120
    assert not set(map(tuple, first.tolist())) & set(map(tuple, second.tolist()))


def test_repeats_present_each_occurrence_back_to_back():
    st = split(repeats=3, **SMALL)
    assert len(st) == 5 * 180
    block = st.x[:180]
    assert torch.equal(block[:60], block[60:120]) and torch.equal(block[:60], block[120:])
    st2 = split(repeats=3, reshuffle_each_repeat=True, **SMALL)
    assert not torch.equal(st2.x[:60], st2.x[60:120])


def test_gradual_transition_mixing_proportions_and_multiset():
    abrupt = split(**SMALL)
    st = split(transition=40, **SMALL)
    # Mixing only reorders: the same multiset of samples.
    assert sorted(st.y.tolist()) == sorted(abrupt.y.tolist())
    assert torch.equal(st.x.reshape(len(st), -1).sum(0), abrupt.x.reshape(len(st), -1).sum(0))
    assert st.true_shifts == (40, 100, 160, 220)  # window start = boundary - W/2
    assert st.eval_positions == (80, 140, 200, 260, 300)  # window end (eval_at="end")
    assert split(transition=40, eval_at="mid", **SMALL).eval_positions[:2] == (60, 120)
    assert split(transition=40, eval_at="start", **SMALL).eval_positions[:2] == (40, 100)
    # Averaged over many seeds, the incoming fraction at offset u follows (u + 0.5) / W.
    incoming = np.zeros(40)
    n_seeds = 60
    for seed in range(n_seeds):
        s = split(transition=40, seed=seed, **SMALL)
        incoming += (s.segment_ids[40:80] == 1).numpy()
    frac = incoming / n_seeds
    assert frac[:10].mean() < 0.3 and frac[-10:].mean() > 0.7
    assert np.corrcoef(frac, (np.arange(40) + 0.5) / 40)[0, 1] > 0.8


def test_label_shift_is_temporally_correlated():
    def autocorr(st):
        y = st.y.numpy()
        return float(np.mean(y[1:] == y[:-1]))

    strong = split(classes_per_segment=5, label_shift={"delta": 0.1}, seed=1)
    iid = split(classes_per_segment=5, label_shift={"delta": 1e3}, seed=1)
    plain = split(classes_per_segment=5, seed=1)
    assert sorted(strong.y.tolist()) == sorted(plain.y.tolist())
    assert autocorr(strong) > autocorr(iid) + 0.2


def test_batch_size_one():
    st = split(batch_size=1, **SMALL)
    assert st.eval_positions == (60, 120, 180, 240, 300)


def test_permuted_rotated_and_corrupted_segments():
    pm = permuted(n_segments=3, max_samples_per_segment=60)
    assert [s.params["permutation"] for s in pm.segments] == [0, 1, 2]
    x0 = pm.test_sets[0][0].reshape(540, -1)
    x1 = pm.test_sets[1][0].reshape(540, -1)
    assert torch.equal(x0.sort(1).values, x1.sort(1).values) and not torch.equal(x0, x1)
    rt = rotated(n_segments=3, max_samples_per_segment=60)
    assert [s.params["angle"] for s in rt.segments] == [0.0, 90.0, 180.0]
    assert torch.allclose(rt.test_sets[2][0], rt.test_sets[0][0].flip(-1).flip(-2), atol=1e-5)
    cr = corrupted(corruptions=["gaussian_noise", "contrast"], severity=3)
    assert not cr.supervised and [s.group for s in cr.segments] == ["gaussian_noise", "contrast"]
    assert cr.learner_labels(cr.y[:5]).tolist() == [UNLABELED] * 5
    gr = corrupted(corruptions=["contrast"], schedule="gradual")
    assert [s.params["severity"] for s in gr.segments] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    mx = corrupted(corruptions=["contrast", "brightness"], schedule="mixed")
    assert mx.true_shifts == () and mx.eval_positions == (len(mx),)


def test_other_seed_other_order_same_test_sets():
    a, b = split(seed=0), split(seed=1)
    assert not torch.equal(a.x, b.x) and a.fingerprint != b.fingerprint
    for s in a.segments:
        assert torch.equal(a.test_sets[s.id][0], b.test_sets[s.id][0])
    c = split(seed=0)
    assert a.fingerprint == c.fingerprint and torch.equal(a.x, c.x)
    assert torch.equal(a.segment_ids, c.segment_ids)


def test_fingerprint_stable_across_processes_and_hash_seeds():
    code = (
        "from adaptlab.streams import split, permuted;"
        "import hashlib;"
        "s = split(order=[0,1,2,1,3], transition=20, seed=3);"
        "p = permuted(n_segments=3, seed=3);"
        "print(s.fingerprint, p.fingerprint, hashlib.sha256(s.x.numpy().tobytes()).hexdigest())"
    )
    outs = set()
    for hashseed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        outs.add(out)
    assert len(outs) == 1


def test_describe_is_json():
    d = split(**SMALL).describe()
    json.dumps(d)
    assert d["n_samples"] == 300 and len(d["segments"]) == 5


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"order": [0, 9]}, "order"),
        ({"segments": [[0, 1], [11]]}, "segments"),
        ({"segments": [[0, 1], []]}, "segments"),
        ({"transition": 500, **SMALL}, "transition"),
        ({"batch_size": 10_000}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"segments": [[3]]}, "one class"),
        ({"repeats": 0}, "repeats"),
        ({"labels": "both"}, "labels"),
        ({"recurrence": "again"}, "recurrence"),
        ({"source": "imagenet"}, "imagenet"),
    ],
)
def test_invalid_combinations_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        split(**kwargs)


def test_config_classes_match_functions():
    assert torch.equal(Split(**SMALL).build().x, split(**SMALL).x)
    assert Permuted(n_segments=2).build().fingerprint == permuted(n_segments=2).fingerprint
    assert Rotated(angles=[0, 45]).build().fingerprint == rotated(angles=[0, 45]).fingerprint
    assert len(Corrupted(corruptions=["contrast"]).build().segments) == 1


def test_split_over_mnist_files(mnist_root):
    st = split(source="mnist", root=str(mnist_root), classes_per_segment=5, batch_size=2)
    assert st.x.dtype == torch.uint8 and st.input_shape == (1, 28, 28)
    assert len(st.segments) == 2
    counts = Counter(st.segment_ids.tolist())
    assert sum(counts.values()) == len(st)
