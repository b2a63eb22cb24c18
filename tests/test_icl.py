"""In-context streams: bursty token classification statistics, eval layouts, task families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from adaptlab.streams.core import Purpose, rng
from adaptlab.streams.icl import (
    ALL_FAMILIES,
    FAMILIES,
    POOL,
    REGRESSION,
    SEEN,
    UNSEEN,
    BurstyTokenStream,
    BurstyTokenTask,
    FamilyVocab,
    SegmentMaps,
    episodes,
    eval_sets_of,
    icl_sequences,
    stream_meta,
    value_dim,
    zipf_probs,
)

ROOT = Path(__file__).resolve().parents[1]


def small_stream(**kw) -> BurstyTokenStream:
    args = dict(n_items=64, n_holdout=8, sequences_per_segment=4096, batch_size=32, n_eval=256,
                n_test=64, block=256)
    args.update(kw)
    return BurstyTokenStream(**args)


def test_same_seed_same_batches_any_chunking():
    a, b = small_stream().build(), small_stream().build()
    torch.testing.assert_close(a.x[100:700], b.x[100:700])
    parts = torch.cat([b.x[100:133], b.x[133:512], b.x[512:700]])
    torch.testing.assert_close(a.x[100:700], parts)
    torch.testing.assert_close(a.y[100:700], torch.cat([b.y[100:300], b.y[300:700]]))
    c = small_stream(seed=1).build()
    assert not torch.equal(a.x[:64], c.x[:64])
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_burstiness_and_relabel_shares():
    st = small_stream(sequences_per_segment=20000).build()
    meta = stream_meta(st, 0, 20000)
    n = 20000
    bursty = meta["is_bursty"].numpy()
    assert abs(bursty.mean() - 0.9) < 3 * np.sqrt(0.9 * 0.1 / n)
    rel = meta["query_relabelled"].numpy()[bursty]
    assert abs(rel.mean() - 0.5) < 3 * np.sqrt(0.25 / bursty.sum())
    assert not meta["query_relabelled"].numpy()[~bursty].any()
    x, y = st.x[0:n], st.y[0:n]
    items, labels, q = x[:, 0:16:2], x[:, 1:16:2], x[:, -1]
    bq = torch.from_numpy(bursty)
    # the query's class appears `burst` times, always with the target label
    assert torch.all((items[bq] == q[bq, None]).sum(1) == 4)
    shown = torch.where(items == q[:, None], labels, -1)
    assert torch.all((shown[bq] == y[bq, None]).sum(1) == 4)
    # i.i.d. sequences carry true labels: label(i) = label_start + i
    iid = ~bq
    assert torch.all(labels[iid] == items[iid] + 72)
    assert torch.all(y[iid] == q[iid] + 72)


def test_query_ranks_follow_truncated_zipf():
    task = BurstyTokenTask(n_items=512, n_holdout=64)
    maps = SegmentMaps.build(task.vocab, 0)
    ranks = task.sample_train(rng(0, Purpose.ICL_TRAIN, 0), 100_000, maps)["query_rank"].numpy()
    observed = np.bincount(ranks, minlength=512).astype(float)
    expected = zipf_probs(512, 1.0) * len(ranks)
    # merge the tail so every cell expects at least 5
    small = np.flatnonzero(expected < 5)
    cut = small[0] if len(small) else 512
    obs = np.append(observed[:cut], observed[cut:].sum())
    exp = np.append(expected[:cut], expected[cut:].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 0.001


def test_holdout_ids_never_in_training():
    st = small_stream(segments=[{}, {"label_permutation_seed": 1, "rank_permutation_seed": 2}],
                      sequences_per_segment=160_000).build()
    lo, hi = st.params["vocab"]["holdout"]
    for s in range(0, len(st), 64_000):  # 10k batches of 32 over both segments
        x, y = st.x[s:s + 64_000], st.y[s:s + 64_000]
        assert not ((x >= lo) & (x < hi)).any()
        assert not ((y >= lo) & (y < hi)).any()
    assert st.segment_ids[0] == 0 and st.segment_ids[-1] == 1
    assert st.true_shifts == (160_000,)


def test_eval_layouts_and_flips():
    b = small_stream()
    sets = eval_sets_of(b.build())
    v = b.task.vocab
    hold = sets["icl_holdout"]
    items, labels, q = hold.x[:, 0:16:2], hold.x[:, 1:16:2], hold.x[:, -1]
    assert ((items >= v.holdout_start) & (items < v.label_start)).all()
    assert ((items == q[:, None]).sum(1) == 3).all()
    assert (torch.where(items == q[:, None], labels, -1) == hold.target[:, None]).sum(1).eq(3).all()
    assert all(torch.unique(r).numel() == 4 for r in items)
    assert (hold.choices[:, 0] == hold.target).all()
    other = hold.choices[:, 1]
    assert ((labels == other[:, None]).sum(1) == 3).all()
    maps = b.maps[0]
    head_items = set(maps.rank_to_item[: b.task.n_band].tolist())
    for band in ("head", "tail"):
        fl = sets[f"icl_flip_{band}"]
        items, labels, q = fl.x[:, 0:16:2], fl.x[:, 1:16:2], fl.x[:, -1]
        true = torch.from_numpy(maps.label_of_item)
        assert (fl.alt == true[q]).all()  # in-weights answer: q's own label
        shown_q = torch.where(items == q[:, None], labels, -1).max(1).values
        assert (shown_q == fl.target).all()  # q is shown with label(o)
        assert (fl.target != fl.alt).all()
        iwl = sets[f"iwl_{band}"]
        assert not (iwl.x[:, 0:16:2] == iwl.x[:, -1:]).any()
        assert (iwl.target == true[iwl.x[:, -1]]).all()
        in_head = np.isin(iwl.x[:, -1].numpy(), list(head_items))
        assert in_head.all() if band == "head" else not in_head.any()
    # scoring: a perfect in-context answer scores 1 on icl, 0 on iwl
    logits = torch.zeros(len(fl), v.size)
    logits[torch.arange(len(fl)), fl.target] = 1.0
    assert fl.score(logits, (v.label_start, v.eos)) == {"acc": 1.0, "alt": 0.0}


def copy_memorised_if_present(x: torch.Tensor, label_of_item: np.ndarray, v) -> torch.Tensor:
    """Oracle logits: answer label(q) when that label is anywhere in the context, else copy
    the label shown with q. On training data this is perfect, so it is not in-weights
    learning; a conflicting-label set must score it as ICL."""
    items, labels, q = x[:, 0:16:2], x[:, 1:16:2], x[:, -1]
    memorised = torch.from_numpy(label_of_item)[q]
    present = (labels == memorised[:, None]).any(1)
    shown_q = torch.where(items == q[:, None], labels, -1).max(1).values
    pred = torch.where(present, memorised, shown_q)
    logits = torch.zeros(len(x), v.size)
    logits[torch.arange(len(x)), pred] = 1.0
    return logits


@pytest.mark.parametrize("n_labels", [None, 8])
def test_conflicting_label_set_scores_copy_if_present_as_icl(n_labels):
    b = small_stream(n_labels=n_labels)
    sets, v, maps = eval_sets_of(b.build()), b.task.vocab, b.maps[0]
    for band in ("head", "tail"):
        fl = sets[f"icl_flip_{band}"]
        score = fl.score(copy_memorised_if_present(fl.x, maps.label_of_item, v),
                         (v.label_start, v.eos))
        assert score == {"acc": 1.0, "alt": 0.0}
        # the memorised label is nowhere in the context; q's shown label only on q's copies
        items, labels, q = fl.x[:, 0:16:2], fl.x[:, 1:16:2], fl.x[:, -1]
        assert not (labels == fl.alt[:, None]).any()
        assert ((labels == fl.target[:, None]) == (items == q[:, None])).all()


def test_segments_permute_labels_and_ranks():
    b = small_stream(segments=[{}, {"label_permutation_seed": 3, "rank_permutation_seed": 4}])
    m0, m1 = b.maps
    assert not np.array_equal(m0.label_of_item, m1.label_of_item)
    assert not np.array_equal(m0.rank_to_item, m1.rank_to_item)
    assert sorted(m1.rank_to_item.tolist()) == list(range(64))
    assert set(eval_sets_of(b.build())) >= {"icl_holdout_seg0", "iwl_head_seg1"}


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="order"):
        small_stream(order=[0, 3])
    with pytest.raises(ValueError, match="unknown keys"):
        small_stream(segments=[{"label_seed": 1}])
    with pytest.raises(ValueError, match="context"):
        BurstyTokenTask(context=6, burst=4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_families(family):
    v = FamilyVocab()
    s = icl_sequences(family, 64, 8, seed=0)
    assert s["token"].shape == (64, 9) and s["value"].shape == (64, 9, value_dim())
    assert (s["label_token"][:, -1] == v.none).all()
    assert (s["value"][:, :8, -1] == 1).all() and (s["value"][:, 8, -1] == 0).all()
    torch.testing.assert_close(icl_sequences(family, 64, 8, seed=0)["value"], s["value"])
    if family in REGRESSION:
        assert s["target"].dtype == torch.float32
        assert 0.3 < float(s["value"][:, :8, -2].var()) < 3.0  # Var y ≈ 1
    else:
        assert ((s["target"] >= v.label_start) & (s["target"] < v.xvec)).all()
    if family.startswith(("tokcls", "pool_tok")):
        # one task per sequence: an item always has the same label
        tok, lab = s["token"][:, :8], s["label_token"][:, :8]
        for r in range(8):
            for t in tok[r].unique():
                assert lab[r][tok[r] == t].unique().numel() == 1


def test_the_pretraining_pool_excludes_every_evaluation_family():
    """Issue 18's protocol: Stage A's pool shares no family with Stage B's seen or unseen
    ones, and the shipped pool config trains on the pool only."""
    import yaml

    assert not set(POOL) & set(FAMILIES) and set(SEEN) | set(UNSEEN) == set(FAMILIES)
    cfg = yaml.safe_load(open(ROOT / "configs/icl/pretrain_pool.yaml"))
    assert set(cfg["data"]["init_args"]["families"]) == set(POOL)
    stage_b = yaml.safe_load(open(ROOT / "configs/stream_adapter/multitask.yaml"))
    assert set(stage_b["data"]["init_args"]["families"]) == set(SEEN)  # one multi-task adapter


@pytest.mark.parametrize("family", ["pool_tanhreg", "pool_quadreg"])
def test_pool_regressions_have_unit_variance(family):
    ys = icl_sequences(family, 4096, 3, seed=3)["target"]
    assert 0.9 < float(ys.var()) < 1.1 and abs(float(ys.mean())) < 0.1


@pytest.mark.parametrize("family", ["pool_bool_maj3", "pool_bool_parity2", "pool_tokmany"])
def test_pool_label_families_are_functions_of_the_input(family):
    """Within a sequence equal inputs get equal labels (one task), labels vary across inputs."""
    s = icl_sequences(family, 64, 15, seed=4)
    labels = torch.cat([s["label_token"][:, :15], s["target"][:, None]], 1)
    keys = s["token"] * 1000 + (s["value"][..., :6] > 0).long().matmul(2 ** torch.arange(6))
    for r in range(64):
        for key in keys[r].unique():
            assert labels[r][keys[r] == key].unique().numel() == 1
    assert labels.unique().numel() >= 2


def test_episodes_share_a_task():
    e = episodes("tokcls4", 16, 6, 3, seed=1)
    assert e["context"]["token"].shape == (16, 6) and e["queries"]["target"].shape == (16, 3)
    assert e["queries"]["token"].shape == (16, 3) and e["queries"]["value"].shape[1] == 3
    assert (e["queries"]["label_token"] == FamilyVocab().none).all()
    # every query whose item was shown in the context has that item's label as its answer
    ctx_tok, ctx_lab = e["context"]["token"], e["context"]["label_token"]
    hits = 0
    for r in range(16):
        for j in range(3):
            shown = ctx_lab[r][ctx_tok[r] == e["queries"]["token"][r, j]]
            if len(shown):
                hits += 1
                assert int(shown[0]) == int(e["queries"]["target"][r, j])
    assert hits > 10


def test_regression_episode_answers_are_the_hidden_ys():
    e = episodes("linreg", 8, 5, 4, seed=2)
    full = icl_sequences("linreg", 8, 8, seed=2)  # same task draw: k + n_query - 1 = 8
    torch.testing.assert_close(e["queries"]["target"][:, :3], full["value"][:, 5:8, -2])
    torch.testing.assert_close(e["queries"]["target"][:, 3], full["target"])
    assert (e["queries"]["value"][..., -2:] == 0).all()


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("family", ["linreg", "sparse_linreg"])
def test_regression_families_are_exactly_learnable_with_unit_variance(family, size):
    """Least squares on k >= d demos recovers w (nMSE < 1e-3, spec §8.9); Var y = 1."""
    from adaptlab.streams.icl import SIZES

    d, k = SIZES[size]["d"], 3 * SIZES[size]["d"]
    s = icl_sequences(family, 256, k, seed=5, size=size)
    x, y = s["value"][:, :k, :d].double(), s["value"][:, :k, -2].double()
    w = torch.linalg.lstsq(x, y[..., None]).solution[..., 0]
    pred = (s["value"][:, k, :d].double() * w).sum(-1)
    assert float(((pred - s["target"].double()) ** 2).mean()) < 1e-3
    ys = torch.cat([y.flatten(), s["target"].double()])
    assert 0.85 < float(ys.var()) < 1.15


def test_family_skill_on_hand_made_cases():
    from adaptlab.streams.icl import family_skill

    pred, target = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(family_skill("linreg", pred, target),
                               torch.tensor([1.0, 0.0, -3.0]))  # 1 − (ŷ − y)²
    torch.testing.assert_close(family_skill("tokcls4", torch.tensor([64, 65]),
                                            torch.tensor([64, 66])), torch.tensor([1.0, 0.0]))


def test_demo_curve_scores_perfect_and_constant_predictors():
    from adaptlab.episodes import demo_curve
    from adaptlab.streams.icl import FamilyVocab

    vocab = FamilyVocab()

    def oracle(b):  # knows the answers: skill 1, nMSE 0, SE 0
        logits = torch.nn.functional.one_hot(
            (b["target"] - vocab.label_start).long().clamp(0, 15), 16).float()
        return logits, b["target"]

    def zero(b):  # predicts 0 for regression: nMSE ≈ Var y = 1
        return torch.zeros(*b["target"].shape, 16), torch.zeros_like(b["target"])

    good = demo_curve(oracle, ["tokcls4", "linreg"], [0, 4], episodes=64, n_query=4, seed=1)
    assert good["tokcls4"][4] == {"skill": 1.0, "se": 0.0}
    assert good["linreg"][0]["nmse"] == pytest.approx(0.0, abs=1e-9)
    base = demo_curve(zero, ["linreg"], [4], episodes=512, n_query=4, seed=1)["linreg"][4]
    assert 0.85 < base["nmse"] < 1.15 and base["skill"] < 0.15 and 0 < base["se"] < 0.1
