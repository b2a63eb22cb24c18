"""The masked part-of-speech task (`streams/pos.py`): sentences, evaluation sets, learner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptlab.strategies import InContextLearner
from adaptlab.streams.core import Purpose, rng
from adaptlab.streams.icl import eval_sets_of
from adaptlab.streams.pos import EVAL_SETS, POSMaskedStream, POSMaskedTask


def small(**kw) -> POSMaskedStream:
    args = dict(n_tokens=40, sequences=4096, batch_size=16, n_eval=256, n_test=64, block=512)
    args.update(kw)
    return POSMaskedStream(**args)


def one_hot(pred: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, size).float()


def structural(x: torch.Tensor) -> torch.Tensor:
    """The in-context answer: the adjective is the token after COP, whatever it is."""
    form_a = x[:, 0] > x[:, 1]  # COP is the largest id but two: COP first, or NOUN COP ADJ
    adj = torch.where(form_a, x[:, 1], x[:, 2])
    noun = torch.where(form_a, x[:, 2], x[:, 0])
    t4 = x[:, 3]
    return torch.where((t4 == adj)[:, None], torch.stack([adj, adj, adj], 1),
                       torch.stack([adj, noun, noun], 1))


def memorised(x: torch.Tensor, n_nouns: int, cop: int) -> torch.Tensor:
    """The in-weights answer: t4's part of speech from its id (the trained vocabulary)."""
    head = x[:, :3]
    t4 = x[:, 3]
    other = torch.where(head[:, 0] == cop, torch.where(head[:, 1] == t4, head[:, 2], head[:, 1]),
                        torch.where(head[:, 0] == t4, head[:, 2], head[:, 0]))
    t4_adj = t4 >= n_nouns
    return torch.where(t4_adj[:, None], torch.stack([t4, t4, t4], 1),
                       torch.stack([other, t4, t4], 1))


def test_sets_reward_structure_and_switched_sets_separate_memory():
    st = small()
    sets, v = eval_sets_of(st.build()), st.task.vocab
    assert set(sets) == {f"pos_{k}" for k in EVAL_SETS}
    for name, es in sets.items():
        assert (es.x[:, 4:] == v.mask).all() and ((es.x[:, :3] == v.cop).sum(1) == 1).all()
        assert (es.targets[:, 0] == structural(es.x)[:, 0]).all()
        score = es.score(one_hot(structural(es.x), v.size), (0, v.size))
        assert score["acc"] == 1.0, name  # structure solves every set, held-out tokens too
        mem = es.score(one_hot(memorised(es.x, v.n_nouns, v.cop), v.size), (0, v.size))
        if name in ("pos_val", "pos_tail"):
            assert mem["acc"] == 1.0, name
        if name.endswith("switch"):
            assert mem == {"acc": 0.0, "alt": 1.0}, name  # memory and structure disagree
    hold = sets["pos_holdout"].x[:, :4]
    tokens = hold[hold != v.cop]
    assert ((tokens >= v.n_tokens) & (tokens < v.cop)).all()
    for name in ("pos_tail", "pos_tail_switch"):
        toks = sets[name].x[:, :4]
        toks = toks[toks != v.cop]
        rank = toks % v.n_nouns
        assert (rank >= v.n_nouns - st.task.n_band).all()


def test_training_sentences_switch_at_eps_and_never_show_holdout():
    task = POSMaskedTask(n_tokens=40, switch_prob=0.1)
    s = task.sample_train(rng(0, Purpose.ICL_TRAIN, 0), 20_000)
    x, v = s["x"], task.vocab
    assert ((x[:, :4] < v.n_tokens) | (x[:, :4] == v.cop)).all()
    assert (s["y"] == 1).all()
    assert (x[:, 7:] == structural(x[:, :7])).all()  # packed targets are the structural answer
    share, p = float(s["switched"].float().mean()), 1 - 0.9**2
    assert abs(share - p) < 3 * np.sqrt(p * (1 - p) / len(x))
    clean = POSMaskedTask(n_tokens=40, switch_prob=0.0).sample_train(rng(0, Purpose.ICL_TRAIN, 0),
                                                                     2000)
    assert not clean["switched"].any()


def test_same_seed_same_batches_any_chunking():
    a, b = small().build(), small().build()
    torch.testing.assert_close(a.x[100:900], torch.cat([b.x[100:613], b.x[613:900]]))
    assert not torch.equal(a.x[:64], small(seed=1).build().x[:64])


def test_learner_scores_hard_accuracy_on_packed_samples():
    st = small().build()
    learner = InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes,
                               batch_size=16, n_layer=1, d_model=16, n_head=1, d_mlp=32,
                               n_targets=3, label_softmax=False, eval_every=0)
    x = st.x[0:32]
    out = learner(x)
    assert out.shape == (32, 2)
    logits = learner.query_logits(x[:, :7])
    hard = (logits.argmax(-1) == x[:, 7:]).all(1)
    assert torch.equal(out.argmax(-1).bool(), hard)
    with pytest.raises(ValueError, match="n_targets"):
        InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes, n_targets=0)


@pytest.mark.parametrize("regime", ["vanilla", "active", "temporary"])
def test_pos_configs_run_from_the_cli(tmp_path, regime: str):
    import json
    import warnings
    from pathlib import Path

    from adaptlab.cli import main

    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", str(root / "configs" / "forgetting" / f"pos_{regime}_paper.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_checkpointing", "false", "--progress_bar.refresh_rate", "0",
            "--data.stream.init_args.n_tokens", "40", "--data.stream.init_args.sequences", "1536",
            "--data.stream.init_args.n_eval", "32", "--data.stream.init_args.n_test", "32",
            "--model.init_args.n_layer", "1", "--model.init_args.d_model", "16",
            "--model.init_args.d_mlp", "32", "--model.init_args.eval_every", "6"]
    if regime != "vanilla":
        args += ["--trainer.callbacks.init_args.every_k", "4"]
    if regime == "temporary":
        args += ["--trainer.callbacks.init_args.stop_after", "9"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(args)
    curves = json.loads(next(tmp_path.glob("pos_paper/*/icl_curves.json")).read_text())["curves"]
    assert [c["step"] for c in curves] == [0, 6, 12]
    assert {"pos/holdout", "pos/holdout_matched", "pos_iwl/switch", "pos/tail_switch",
            "emb_norm/holdout"} <= set(curves[-1])
