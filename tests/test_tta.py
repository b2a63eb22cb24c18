"""Test-time adaptation learners (strategies/tta.py): each rule against a hand computation or a
constructed case, label-blindness, resume, and the shift-aware reset."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from adaptlab.data import StreamDataModule
from adaptlab.evaluation import StreamEvaluator
from adaptlab.strategies.tta import (
    EATA,
    LAME,
    SAR,
    SOURCE_FORMAT,
    TENT,
    AlphaBatchNorm,
    BNAdapt,
    CoTTA,
    Source,
    SourceTraining,
    entropy,
    knn_affinity,
    laplacian_optimization,
)
from adaptlab.streams import corrupted
from tests.helpers import Crash, fit

torch.set_num_threads(1)
SHAPE, C = (1, 8, 8), 10
STREAM = {"source": "digits", "corruptions": ["gaussian_noise", "fog", "contrast"],
          "batch_size": 32, "max_samples_per_segment": 96, "test_samples_per_segment": 32}


def write_source(path, backbone: str = "lenet_bn", **args) -> str:
    """A source export with a random backbone and non-trivial BN running statistics."""
    src = SourceTraining(input_shape=SHAPE, n_classes=C, backbone=backbone, backbone_args=args,
                         seed=3)
    g = torch.Generator().manual_seed(0)
    for m in src.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    src._sample = [torch.rand(64, *SHAPE, generator=g)]
    torch.save(src.source_record(), path)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return write_source(tmp_path_factory.mktemp("src") / "source.pt")


def make(cls, source: str, **kw):
    return cls(source=source, input_shape=SHAPE, n_classes=C, batch_size=32, seed=1, **kw)


# ----- the source model ----------------------------------------------------------------------


def test_export_round_trip_and_record(source):
    rec = torch.load(source, weights_only=True)
    assert rec["format"] == SOURCE_FORMAT and rec["backbone"] == "lenet_bn"
    learner = make(Source, source)
    x = torch.rand(5, *SHAPE)
    ref = SourceTraining(input_shape=SHAPE, n_classes=C, backbone="lenet_bn", seed=9).model
    ref.load_state_dict(rec["state_dict"])
    ref.eval()
    assert torch.allclose(learner(x), ref(x), atol=1e-6)  # Source = the model in eval mode


def test_external_state_dict_loads(tmp_path):
    from adaptlab.models import build_model

    net = build_model("wideresnet", (3, 8, 8), C, depth=10, widen=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(2.0)
    path = tmp_path / "Standard.pt"  # RobustBench's layout: nested, DataParallel prefixes
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    learner = Source(source=str(path), source_format="state_dict", backbone="wideresnet",
                     backbone_args={"depth": 10, "widen": 1}, input_shape=(3, 8, 8),
                     n_classes=C, batch_size=4)
    x = torch.rand(3, 3, 8, 8)
    net.eval()
    assert torch.allclose(learner(x), net(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit backbone 'wideresnet'.*other shapes"):
        Source(source=str(path), source_format="state_dict", backbone="wideresnet",
               backbone_args={"depth": 10, "widen": 2}, input_shape=(3, 8, 8), n_classes=C)


# ----- BNAdapt -------------------------------------------------------------------------------


def first_bn_io(learner, x):
    bn = next(m for m in learner.model.modules() if isinstance(m, AlphaBatchNorm))
    seen = {}
    h = bn.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    learner.model(x)
    h.remove()
    return bn, seen["i"], seen["o"]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_bn_adapt_normalises_with_test_batch_statistics(source, alpha):
    learner = make(BNAdapt, source, alpha=alpha)
    learner.eval()  # the evaluator's mode: must not bring back the source statistics
    bn, h, out = first_bn_io(learner, torch.rand(16, *SHAPE) * 3)
    assert isinstance(bn, AlphaBatchNorm)
    mu = h.mean(dim=(0, 2, 3))
    var = ((h - mu[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))  # biased, as BN
    mu = alpha * mu + (1 - alpha) * bn.running_mean
    var = alpha * var + (1 - alpha) * bn.running_var
    hand = (h - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    hand = hand * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(out, hand, atol=1e-5)
    src = make(Source, source)
    assert not torch.allclose(src.model(torch.rand(16, *SHAPE) * 3), learner.model(
        torch.rand(16, *SHAPE) * 3), atol=1e-3)


# ----- a real run (the evaluator's path) -----------------------------------------------------


class Preds(pl.Callback):
    """Test aid: the online predictions of every batch, in order."""

    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.preds.append(outputs["preds"].cpu())


def run(learner, tmp, stream=None, callbacks=None):
    st = stream or corrupted(**STREAM)
    rec = Preds()
    ev = fit(learner, StreamDataModule(st, batches_per_step=2), tmp,
             callbacks_extra=[rec, *(callbacks or [])])
    return ev, torch.cat(rec.preds)


def test_tent_updates_only_norm_affine_parameters(source, tmp_path):
    learner = make(TENT, source)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    run(learner, tmp_path)
    after = learner.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    affine = {n for n, m in learner.model.named_modules() if isinstance(m, AlphaBatchNorm)}
    expected = {f"{n}.{p}" for n in affine for p in ("weight", "bias")}
    assert changed == expected  # every gamma and beta moved, nothing else (statistics included)


LEARNERS = [
    (Source, {}), (BNAdapt, {}), (TENT, {}), (EATA, {"d_margin": 0.4, "e_margin": 1.0}),
    (SAR, {"e_margin": 1.0, "lr": 0.01}), (CoTTA, {"n_augmentations": 2, "hflip": False}),
    (LAME, {}),
]


@pytest.mark.parametrize(("cls", "kw"), LEARNERS, ids=[c.__name__ for c, _ in LEARNERS])
def test_poisoned_labels_give_identical_predictions(source, tmp_path, cls, kw):
    st = corrupted(**STREAM, supervised=True)  # the learner is handed the true labels ...
    g = torch.Generator().manual_seed(5)
    poisoned = dataclasses.replace(st, y=torch.randint(0, C, st.y.shape, generator=g))
    _, clean = run(make(cls, source, **kw), tmp_path / "a", st)
    _, bad = run(make(cls, source, **kw), tmp_path / "b", poisoned)  # ... or random ones
    assert torch.equal(clean, bad)
    if cls not in (Source, LAME):  # and it adapts: its predictions are not the source's
        _, plain = run(make(Source, source), tmp_path / "c", st)
        assert not torch.equal(clean, plain)


def test_unsupervised_stream_metrics(source, tmp_path):
    ev, _ = run(make(TENT, source), tmp_path)
    doc = json.load(open(os.path.join(ev.trainer_log_dir, "metrics.json")))
    err = doc["final"]["tta_online_error"]
    assert err is not None and 0.0 <= err <= 1.0
    assert all(v["tta_online_error"] is not None for v in doc["per_segment"].values())


# ----- EATA ----------------------------------------------------------------------------------


def test_eata_selection_rules(source):
    learner = make(EATA, source, fisher_alpha=0.0, e_margin=0.4, d_margin=0.4)
    e0 = 0.4 * math.log(C)
    assert learner.e0 == pytest.approx(e0)
    big = 12.0
    logits = torch.zeros(6, C)
    logits[0, 0] = logits[1, 0] = big  # confident class 0
    logits[2, 1] = logits[3, 1] = big  # confident class 1
    # rows 4, 5: uniform, entropy ln C > E0: unreliable
    ent = entropy(logits)
    assert bool((ent[:4] < e0).all()) and bool((ent[4:] > e0).all())
    idx, kept = learner.select(logits)  # no running mean yet: reliability alone
    assert idx.tolist() == [0, 1, 2, 3]
    assert torch.allclose(kept, ent[:4])
    learner.mean_probs.copy_(torch.nn.functional.one_hot(torch.tensor(0), C).float())
    idx, _ = learner.select(logits)  # class 0 is what the model already predicts: redundant
    assert idx.tolist() == [2, 3]
    # the running mean moved towards the selected samples (0.9 old + 0.1 new)
    assert learner.mean_probs[1] == pytest.approx(0.1 * logits[2].softmax(0)[1].item(), 1e-5)


def test_eata_fisher_penalty_needs_clean_inputs(tmp_path):
    path = tmp_path / "nosample.pt"
    src = SourceTraining(input_shape=SHAPE, n_classes=C, backbone="lenet_bn")
    torch.save(src.source_record(), path)
    with pytest.raises(ValueError, match="Fisher penalty needs clean source inputs"):
        make(EATA, str(path))
    learner = make(EATA, str(path), fisher_alpha=0.0)
    assert learner._fisher_names == []


def test_eata_fisher_is_positive_on_norm_parameters(source):
    learner = make(EATA, source)
    names = learner._fisher_names
    assert names and all(n.endswith(("weight", "bias")) for n in names)
    assert all(float(getattr(learner, f"fisher_{i}").sum()) > 0 for i in range(len(names)))


# ----- CoTTA ---------------------------------------------------------------------------------


def test_cotta_teacher_ema_and_stochastic_restore(source):
    learner = make(CoTTA, source, restore_prob=0.3)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)
    teacher = [p.clone() for p in learner.teacher.parameters()]
    student = [p.clone() for p in learner.model.parameters()]
    learner.update_teacher()
    for t0, s, t in zip(teacher, student, learner.teacher.parameters()):
        assert torch.allclose(t, 0.999 * t0 + 0.001 * s, atol=1e-6)
    learner.stochastic_restore()
    back = sum(int((p == p0).sum()) for p, p0 in zip(learner.model.parameters(),
                                                     learner.anchor.parameters()))
    n = sum(p.numel() for p in learner.model.parameters())
    sd = math.sqrt(0.3 * 0.7 / n)
    assert abs(back / n - 0.3) < 5 * sd  # each weight restored with probability 0.3
    moved = sum(int((p == s).sum()) for p, s in zip(learner.model.parameters(), student))
    assert moved + back == n  # the others kept their adapted value


def test_cotta_augments_only_when_the_source_is_unsure(source):
    learner = make(CoTTA, source, n_augmentations=4, confidence_threshold=0.0)
    x = torch.rand(8, *SHAPE)
    assert torch.equal(learner.pseudo_labels(x), learner.teacher(x))
    learner.confidence_threshold = 1.01
    avg = learner.pseudo_labels(x)
    assert not torch.allclose(avg, learner.teacher(x))
    assert torch.equal(avg, learner.pseudo_labels(x))  # the same draw for the same batch


# ----- LAME ----------------------------------------------------------------------------------


def test_lame_fixed_point_on_a_tiny_affinity():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.45, 0.55], [0.1, 0.9]])
    unary = -probs.log()
    w = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0.]])
    y = laplacian_optimization(unary, w, bound_lambda=1.0, max_steps=500)
    assert torch.allclose(y, (-unary + w @ y).softmax(-1), atol=1e-5)  # the fixed point
    assert y[2].argmax() == 0  # pulled to its neighbours' class, against its own 0.55
    assert torch.allclose(y[3], probs[3], atol=1e-6)  # no neighbours: the source prediction
    assert torch.allclose(laplacian_optimization(unary, torch.zeros(4, 4)), probs, atol=1e-6)


def test_knn_affinity():
    feats = torch.tensor([[0.0], [0.1], [0.25], [5.0]])
    w = knn_affinity(feats, 1)
    assert w.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]


# ----- resume --------------------------------------------------------------------------------


def resumable(cls, kw, source, log_dir, crash_at=None, ckpt_path=None):
    st = corrupted(**STREAM)
    learner = make(cls, source, **kw)
    callbacks = [StreamEvaluator(print_table=False, figures=False),
                 ModelCheckpoint(dirpath=os.path.join(log_dir, "ckpt"), every_n_train_steps=2,
                                 save_last=True, save_top_k=-1)]
    if crash_at:
        callbacks.append(Crash(crash_at))
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, enable_progress_bar=False,
                         num_sanity_val_steps=0, enable_model_summary=False,
                         logger=TensorBoardLogger(log_dir, name="run", version=0,
                                                  default_hp_metric=False))
    trainer.fit(learner, datamodule=StreamDataModule(st, batches_per_step=1),
                ckpt_path=ckpt_path)
    return json.load(open(os.path.join(trainer.log_dir, "metrics.json")))


@pytest.mark.parametrize(("cls", "kw"), [
    (TENT, {"reset": "shift", "detector": {"window": 4, "grace": 1, "sigma_floor": 0.01}}),
    (CoTTA, {"n_augmentations": 2, "hflip": False}),
    (SAR, {"e_margin": 1.0, "lr": 0.01}),
], ids=["TENT-reset", "CoTTA", "SAR"])
def test_crash_and_resume_gives_identical_metrics(source, tmp_path, cls, kw):
    whole = resumable(cls, kw, source, str(tmp_path / "whole"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        resumable(cls, kw, source, str(tmp_path / "cut"), crash_at=5)
    last = str(tmp_path / "cut" / "ckpt" / "last.ckpt")
    resumed = resumable(cls, kw, source, str(tmp_path / "cut"), ckpt_path=last)
    assert resumed["status"] == "completed"
    assert resumed == whole


# ----- shift-aware resets --------------------------------------------------------------------


def peaked(n: int, sharp: float, g: torch.Generator) -> torch.Tensor:
    """Logits of n samples whose entropy falls as `sharp` grows (plus a little noise)."""
    logits = torch.randn(n, C, generator=g) * 0.3
    logits[:, 0] += sharp
    return logits


def test_shift_aware_reset_fires_on_an_entropy_jump_not_on_noise(source):
    learner = make(TENT, source, reset="shift")
    g = torch.Generator().manual_seed(0)
    source_state = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.5)  # "adapted" weights
    for i in range(150):  # a settled domain: low entropy, batch-to-batch noise only
        learner.batch_position = 32 * i
        learner._after_batch(peaked(32, 6.0, g))
    assert learner.detections == []
    for i in range(150, 160):  # a new domain: the entropy jumps
        learner.batch_position = 32 * i
        learner._after_batch(peaked(32, 1.0, g))
    assert learner.detections and learner.detections[0] <= 32 * 153
    assert all(torch.equal(v, source_state[k]) for k, v in learner.model.state_dict().items())


def test_periodic_reset(source):
    learner = make(TENT, source, reset="periodic", reset_every=5)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        learner.batch_position = 32 * i
        learner._after_batch(peaked(32, 6.0, g))
    assert learner.resets == [32 * 4, 32 * 9] and learner.shift_events() == []


def test_reset_needs_something_to_reset(source):
    with pytest.raises(ValueError, match="adapts no weights"):
        make(BNAdapt, source, reset="shift")


# ----- the configs' stream variants ----------------------------------------------------------


def test_correlated_overlay_gives_few_class_batches():
    import yaml

    from adaptlab.streams import Corrupted

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "tta")
    base = yaml.safe_load(open(os.path.join(root, "tent_digits.yaml")))["data"]["stream"]
    overlay = yaml.safe_load(open(os.path.join(root, "correlated.yaml")))["data"]["stream"]
    args = {**base["init_args"], "corruptions": ["fog", "contrast"]}

    def classes_per_batch(**extra) -> float:
        st = Corrupted(**args, **extra).build()
        b = st.batch_size
        return sum(len(torch.unique(st.y[i:i + b])) for i in range(0, len(st.y) - b + 1, b)) / (
            len(st.y) // b)

    assert classes_per_batch() > 9.5  # i.i.d. within a domain: nearly all 10 classes
    assert classes_per_batch(**overlay["init_args"]) < 8.0  # correlated: few classes a batch
