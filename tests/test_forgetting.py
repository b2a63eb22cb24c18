"""Forgetting regimes (spec `forgetting.md` §9) on a 2-layer, 16-dim TinyGPT."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from adaptlab.data import StreamDataModule
from adaptlab.models import TinyGPT
from adaptlab.strategies import (
    EmbeddingForgetting,
    InContextLearner,
    ProbabilisticEmbeddingForgetting,
)
from adaptlab.strategies.forgetting import ForgettingCore
from adaptlab.strategies.in_context import matched_item_rows
from adaptlab.streams.icl import BurstyTokenStream

SMALL = dict(n_layer=2, d_model=16, n_head=2, d_mlp=32, eval_every=0, warmup_steps=0)


def tiny_stream(steps: int = 15, **kw) -> BurstyTokenStream:
    args = dict(n_items=32, n_holdout=8, sequences_per_segment=8 * steps, batch_size=8,
                n_eval=32, n_test=16, block=64)
    args.update(kw)
    return BurstyTokenStream(**args)


def run(callbacks, steps: int = 15, stream: BurstyTokenStream | None = None, ckpt=None,
        learner: InContextLearner | None = None, **learner_kw):
    dm = StreamDataModule(stream or tiny_stream(steps), batches_per_step=1)
    st = dm.base_stream
    learner = learner or InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes,
                                          batch_size=st.batch_size, **{**SMALL, **learner_kw})
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                  for c in callbacks),
                         enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(learner, datamodule=dm, ckpt_path=ckpt)
    return learner, trainer


class Crash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def model_and_adamw(tie: bool = True, pad: int | None = 39):
    torch.manual_seed(0)
    m = TinyGPT(40, n_positions=8, n_layer=2, d_model=16, n_head=2, d_mlp=32, tie_head=tie,
                pad_id=pad)
    emb = m.get_input_embeddings().weight
    rest = [p for p in m.parameters() if p is not emb]
    opt = torch.optim.AdamW([{"params": [emb]}, {"params": rest}], lr=1e-2)
    x = torch.randint(0, 39, (4, 8))
    m(x)[:, -1].logsumexp(-1).mean().backward()
    opt.step()
    return m, opt


# -- 1. schedule -------------------------------------------------------------------------------


def test_schedule_exact():
    temp = EmbeddingForgetting(regime="temporary", every_k=3, stop_after=10)
    act = EmbeddingForgetting(regime="active", every_k=3, stop_after=None)
    none = EmbeddingForgetting(regime="none")
    run([temp])
    run([act])
    run([none])
    assert temp.reset_steps == [3, 6, 9]
    assert act.reset_steps == [3, 6, 9, 12]  # 15 batches: the reset due after 15 never runs
    assert none.reset_steps == []


@pytest.mark.parametrize("regime", ["active", "temporary"])
def test_resets_land_on_time_under_any_batches_per_step(regime: str):
    """A reset due at step s is applied before the forward pass of update s + 1, whether a
    Lightning step carries 1 or 50 mini-batches: same reset steps, same final weights."""
    runs = {}
    for bps in (1, 50):
        cb = EmbeddingForgetting(regime=regime, every_k=7,
                                 stop_after=60 if regime == "temporary" else None)
        dm = StreamDataModule(tiny_stream(100), batches_per_step=bps)
        st = dm.base_stream
        learner = InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes,
                                   batch_size=st.batch_size, **SMALL)
        applied: list[tuple[int, int]] = []
        reset = cb.core.reset

        def spy(step, optimizer=None, _reset=reset, _applied=applied, _learner=learner):
            _applied.append((step, _learner.update_steps))
            return _reset(step, optimizer)

        cb.core.reset = spy
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             callbacks=[cb])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(learner, datamodule=dm)
        assert learner.update_steps == 100
        runs[bps] = (applied, learner.model.state_dict())
    expected = [s for s in range(7, 100, 7) if regime == "active" or s < 60]
    for bps, (applied, _) in runs.items():
        assert applied == [(s, s) for s in expected], bps
    for name, w in runs[1][1].items():
        torch.testing.assert_close(runs[50][1][name], w, msg=name)


class AutoGPT(pl.LightningModule):
    """An automatic-optimisation module (no StreamLearner): steps come from global_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyGPT(20, n_positions=8, n_layer=1, d_model=8, n_head=2, d_mlp=16)

    def training_step(self, batch, batch_idx):
        return self.model(batch[0])[:, -1].logsumexp(-1).mean()

    def configure_optimizers(self):
        emb = self.model.get_input_embeddings().weight
        rest = [p for p in self.model.parameters() if p is not emb]
        return torch.optim.AdamW([{"params": [emb]}, {"params": rest}], lr=1e-3)


def test_schedule_identical_with_gradient_accumulation():
    data = torch.utils.data.TensorDataset(torch.randint(0, 20, (60, 8)))
    cb = EmbeddingForgetting(regime="temporary", every_k=3, stop_after=10)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(AutoGPT(), torch.utils.data.DataLoader(data, batch_size=2))
    assert trainer.global_step == 15
    assert cb.reset_steps == [3, 6, 9]


# -- 2. in place / 3. optimizer state ----------------------------------------------------------


def test_reset_in_place_keeps_references_and_body():
    m, opt = model_and_adamw()
    emb = m.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    other_state = {id(p): opt.state[p]["exp_avg"].clone() for p in opt.param_groups[1]["params"]}
    core = ForgettingCore("active", every_k=3, stop_after=None, seed=0)
    core.bind(m, opt)
    core.reset(3, opt)
    assert m.get_input_embeddings().weight is emb
    assert m.get_output_embeddings().weight is emb
    assert any(p is emb for p in opt.param_groups[0]["params"])
    assert not torch.equal(emb, before["wte.weight"])
    assert float(emb[39].detach().abs().sum()) == 0.0
    for n, p in m.named_parameters():
        if n != "wte.weight":
            assert torch.equal(p, before[n]), n
    # optimizer state: only the embedding's is cleared by default
    assert len(opt.state[emb]) == 0
    for p in opt.param_groups[1]["params"]:
        assert torch.equal(opt.state[p]["exp_avg"], other_state[id(p)])
    m(torch.randint(0, 39, (4, 8))).sum().backward()
    opt.step()
    assert int(opt.state[emb]["step"]) == 1
    assert int(opt.state[opt.param_groups[1]["params"][0]]["step"]) == 2


@pytest.mark.parametrize("mode", ["all", "none"])
def test_optimizer_state_ablations(mode):
    m, opt = model_and_adamw()
    saved = copy.deepcopy({id(p): s for p, s in opt.state.items()})
    core = ForgettingCore("active", every_k=3, stop_after=None, optimizer_state=mode)
    core.bind(m, opt)
    core.reset(3, opt)
    if mode == "all":
        assert all(len(opt.state[p]) == 0 for g in opt.param_groups for p in g["params"])
    else:
        for p, s in opt.state.items():
            assert torch.equal(s["exp_avg"], saved[id(p)]["exp_avg"])


def test_untied_head_is_redrawn_bias_kept_and_keep_ids():
    m, opt = model_and_adamw(tie=False)
    head = m.get_output_embeddings().weight
    emb = m.get_input_embeddings().weight
    h0, e0 = head.detach().clone(), emb.detach().clone()
    core = ForgettingCore("active", every_k=3, stop_after=None, keep_ids=[5])
    core.bind(m, opt)
    core.reset(3, opt)
    assert not torch.equal(head, h0)
    assert torch.equal(emb[5], e0[5]) and not torch.equal(emb[6], e0[6])


# -- 4. resume ---------------------------------------------------------------------------------


def test_no_double_reset_after_resume(tmp_path: Path):
    k = dict(regime="temporary", every_k=3, stop_after=10, seed=0)
    full_cb = EmbeddingForgetting(**k)
    full, _ = run([full_cb], steps=12)
    first_cb = EmbeddingForgetting(**k)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([first_cb, ckpt, Crash(7)], steps=12)  # checkpoint after due step 6, then killed
    assert first_cb.reset_steps == [3, 6]
    resumed_cb = EmbeddingForgetting(**k)
    path = next(p for p in tmp_path.glob("*.ckpt") if "step=6" in p.name)
    resumed, _ = run([resumed_cb], steps=12, ckpt=str(path))
    assert resumed_cb.reset_steps == full_cb.reset_steps == [3, 6, 9]
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


# -- 5. lr and init ----------------------------------------------------------------------------


def test_episode_lr_warms_up_and_decays_to_zero():
    core = ForgettingCore("active", every_k=100, stop_after=None, emb_lr_schedule="episode",
                          episode_warmup=0.1)
    f = [core.episode_factor(s) for s in range(100)]
    assert f[0] < 0.2 and max(f) == pytest.approx(1.0, abs=0.02)
    assert f.index(max(f)) in (9, 10) and f[99] < 0.02
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    temp = ForgettingCore("temporary", every_k=100, stop_after=250, emb_lr_schedule="episode")
    temp.reset_steps = [100, 200]
    assert temp.episode_factor(250) == 1.0  # the last episode does not end in a reset


@pytest.mark.parametrize("init,expected", [("init_std", 0.02), ("module_default", 1.0),
                                           ("matched", 0.3)])
def test_reset_std(init, expected):
    torch.manual_seed(0)
    m = TinyGPT(400, n_positions=8, n_layer=1, d_model=32, n_head=2, d_mlp=16)
    with torch.no_grad():
        m.get_input_embeddings().weight.normal_(0.5, 0.3)
    core = ForgettingCore("active", every_k=3, stop_after=None, init=init)
    core.bind(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core.reset(3)
    assert float(m.get_input_embeddings().weight.std()) == pytest.approx(expected, rel=0.05)
    assert any("50x" in str(w.message) for w in caught) == (init == "module_default")


# -- 6. probabilistic --------------------------------------------------------------------------


def test_probabilistic_restores_rows_and_freezes_the_table():
    stream = tiny_stream(4)
    dm = StreamDataModule(stream, batches_per_step=1)
    st = dm.base_stream
    learner = InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes,
                               batch_size=st.batch_size, **SMALL)
    emb = learner.model.get_input_embeddings()
    seen: list[torch.Tensor] = []
    emb.register_forward_hook(lambda mod, inp, out: seen.append(mod.weight.detach().clone()))
    before = emb.weight.detach().clone()
    cb = ProbabilisticEmbeddingForgetting(p=1.0, stop_after=100, exclude_ids=[0, 1])
    run([cb], stream=stream, learner=learner)
    first_batch = st.x[0:8]
    ids = [i for i in torch.unique(first_batch).tolist() if i not in (0, 1)]
    assert not torch.equal(seen[0][ids], before[ids])  # replaced during the forward pass
    excluded = [i for i in (0, 1) if i in first_batch]
    for i in excluded:
        assert torch.equal(seen[0][i], before[i])
    assert torch.equal(emb.weight, before)  # frozen and restored: bit-identical after steps
    opt = learner.optimizers().optimizer
    assert len(opt.state[emb.weight]) == 0  # AdamW never touched it
    body = opt.param_groups[1]["params"][0]
    assert int(opt.state[body]["step"]) == 4


# -- 7. re-arm ---------------------------------------------------------------------------------


def test_rearm_on_segment_change():
    stream = tiny_stream(20, segments=[{}, {"label_permutation_seed": 1}])
    cb = EmbeddingForgetting(regime="temporary", every_k=3, stop_after=7, rearm_on="segment",
                             rearm_stop_after=8)
    run([cb], stream=stream)
    assert cb.rearm_steps == [20]
    assert cb.reset_steps == [3, 6, 23, 26]


def test_reset_spikes_never_rearm_detected():
    """A loss spike right after a reset is ignored; a lasting loss shift re-arms."""
    cb = EmbeddingForgetting(regime="temporary", every_k=30, stop_after=40, rearm_on="detected",
                             detector={"window": 20, "grace": 5}, detector_cooldown=5)
    trainer = SimpleNamespace(global_step=0, logger=None, is_global_zero=True)
    noise = torch.Generator().manual_seed(0)
    for step in range(1, 100):
        if step == 30:
            cb.core.reset_steps.append(30)  # what a reset at step 30 records
        level = 3.0 if 30 <= step < 34 or step >= 70 else 1.0  # spike, then a real shift
        loss = torch.tensor(level) + 0.01 * torch.randn((), generator=noise)
        module = SimpleNamespace(update_steps=step, last_loss=loss)
        cb.on_train_batch_end(trainer, module, None, None, step)
        if step < 70:
            assert cb.rearm_steps == [], step
    assert len(cb.rearm_steps) == 1 and 70 <= cb.rearm_steps[0] <= 75
    assert cb.core.is_due(cb.rearm_steps[0] + 30)


# -- 9. errors ---------------------------------------------------------------------------------


class PositionalTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = TinyGPT(20, n_positions=8, n_layer=1, d_model=8, n_head=2, d_mlp=16)

    def get_input_embeddings(self):
        return self.gpt.get_position_embeddings()

    def get_position_embeddings(self):
        return self.gpt.get_position_embeddings()


def test_errors_are_readable():
    with pytest.raises(ValueError, match="positional"):
        ForgettingCore("active", 3, None).bind(PositionalTarget())
    m, _ = model_and_adamw()
    shared = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match="own optimizer param group"):
        ForgettingCore("active", 3, None, emb_lr_schedule="episode").bind(m, shared)
    with pytest.raises(ValueError, match="not supported"):
        ForgettingCore("active", 3, None).bind(m, torch.optim.RMSprop(m.parameters()))
    with pytest.raises(ValueError, match="must exceed k"):
        ForgettingCore("temporary", every_k=10, stop_after=10)
    with pytest.raises(ValueError, match="null under regime 'active'"):
        ForgettingCore("active", every_k=10, stop_after=100)
    with pytest.raises(ValueError, match="regime"):
        EmbeddingForgetting(regime="sometimes")


# -- the committed configs run from the CLI ---------------------------------------------------


@pytest.mark.parametrize("regime", ["vanilla", "active", "temporary", "vanilla_paper",
                                    "active_paper", "temporary_paper"])
def test_configs_run_from_the_cli(tmp_path: Path, regime: str):
    import json

    from adaptlab.cli import main

    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", str(root / "configs" / "forgetting" / f"bursty_{regime}.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_checkpointing", "false", "--progress_bar.refresh_rate", "0",
            "--data.stream.init_args.n_items", "32", "--data.stream.init_args.n_holdout", "8",
            "--data.stream.init_args.sequences_per_segment", "384",
            "--data.stream.init_args.batch_size", "32",  # 12 steps
            "--data.stream.init_args.n_eval", "32", "--data.stream.init_args.n_test", "32",
            "--model.init_args.n_layer", "1", "--model.init_args.d_model", "16",
            "--model.init_args.d_mlp", "32", "--model.init_args.eval_every", "6"]
    if not regime.startswith("vanilla"):
        args += ["--trainer.callbacks.init_args.every_k", "4"]
    if regime.startswith("temporary"):
        args += ["--trainer.callbacks.init_args.stop_after", "9"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(args)
    run_dir = next(tmp_path.glob("forgetting*/*"))
    curves = json.loads((run_dir / "icl_curves.json").read_text())["curves"]
    assert [c["step"] for c in curves] == [0, 6, 12]
    assert {"icl/holdout", "icl/flip_head", "iwl/flip_head", "iwl/head", "iwl/tail"} <= set(
        curves[-1])
    assert {"icl/holdout_matched", "iwl/head_matched", "emb_norm/items",
            "emb_norm/holdout"} <= set(curves[-1])


def test_matched_item_rows_put_items_on_one_scale_and_restore():
    torch.manual_seed(0)
    w = torch.randn(20, 8)
    w[:10] *= torch.linspace(0.5, 3.0, 10)[:, None]  # trained rows: frequency-dependent scale
    w[10:14] *= 0.1  # held-out rows: still at a small init scale
    before = w.clone()
    with matched_item_rows(w, (0, 10), (10, 14), torch.Generator().manual_seed(0)):
        norms = w[:14].norm(dim=1)
        torch.testing.assert_close(norms, torch.full((14,), float(before[:10].norm(dim=1).mean())))
        assert torch.equal(w[14:], before[14:])  # label rows untouched
        cos = torch.nn.functional.cosine_similarity(w[:10], before[:10])
        torch.testing.assert_close(cos, torch.ones(10))  # trained directions kept
        assert not torch.allclose(w[10:14], before[10:14])
    assert torch.equal(w, before)


@pytest.mark.parametrize("label_softmax", [True, False])
def test_full_vocabulary_softmax_trains_holdout_rows(label_softmax: bool):
    learner, trainer = run([], steps=5, label_softmax=label_softmax)
    st = tiny_stream(5).build()
    lo, hi = st.params["vocab"]["holdout"]
    fresh = InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=8,
                             label_softmax=label_softmax, **SMALL)
    w0 = fresh.model.get_input_embeddings().weight[lo:hi]
    w1 = learner.model.get_input_embeddings().weight[lo:hi]
    assert torch.equal(w0, w1) == label_softmax  # no gradient only under the label softmax


def test_linear_lr_schedule_warms_up_then_decays_to_zero():
    st = tiny_stream(3).build()
    kw = dict(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=8,
              **{**SMALL, "warmup_steps": 10})
    lin = InContextLearner(lr_schedule="linear", decay_steps=110, **kw)
    const = InContextLearner(**kw)
    assert [lin.lr_factor(s) for s in (0, 9, 10, 60, 110, 200)] == pytest.approx(
        [0.1, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert [const.lr_factor(s) for s in (0, 9, 60, 200)] == pytest.approx([0.1, 1, 1, 1])
    with pytest.raises(ValueError, match="lr_schedule"):
        InContextLearner(lr_schedule="cosine", **kw)


def test_init_from_starts_a_fine_tune_from_trained_weights(tmp_path: Path):
    trained, trainer = run([EmbeddingForgetting(regime="none")], steps=3)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    st = tiny_stream(3).build()
    tuned = InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=8,
                             init_from=str(ckpt), **SMALL)
    for p, q in zip(trained.model.parameters(), tuned.model.parameters()):
        assert torch.equal(p, q)
    assert tuned.update_steps == 0
    with pytest.raises(FileNotFoundError, match="init_from"):
        InContextLearner(input_shape=st.input_shape, n_classes=st.n_classes, batch_size=8,
                         init_from=str(tmp_path / "missing.ckpt"), **SMALL)
