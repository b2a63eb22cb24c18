"""The Avalanche bridge (spec `avalanche.md` §9): same accuracy matrix as the native run,
metric agreement, online streams, the real hook order, forgetting resets, guards, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

import pytorch_lightning as pl  # noqa: E402
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation import functional  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics  # noqa: E402
from avalanche.logging import TensorboardLogger  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from adaptlab import metrics  # noqa: E402
from adaptlab.avalanche import (  # noqa: E402
    ForgettingPlugin,
    IncompatiblePluginError,
    StreamLearnerStrategy,
    accuracy_matrix_from_metrics,
    online_stream,
    segment_matrix_metrics,
    stream_from_avalanche,
    stream_to_avalanche,
)
from adaptlab.data import StreamDataModule  # noqa: E402
from adaptlab.learner import StreamLearner  # noqa: E402
from adaptlab.strategies import Finetune  # noqa: E402
from adaptlab.strategies.forgetting import EmbeddingForgetting  # noqa: E402
from adaptlab.streams import split  # noqa: E402
from adaptlab.streams.sources import load_digits  # noqa: E402

from .helpers import fit, learner_kwargs  # noqa: E402

pytestmark = pytest.mark.avalanche
T = 5
EVAL_MB = 1024  # the native evaluator's batch size: equal batches give bit-equal accuracies


class _Digits(TensorDataset):
    """float (N, 1, 8, 8) tensors with `.targets`, as Avalanche's generators want."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def digits_benchmark():
    src = load_digits(0)  # built before any seeding (class_incremental_benchmark reseeds)
    return class_incremental_benchmark(
        {"train": _Digits(src.x_train, src.y_train), "test": _Digits(src.x_test, src.y_test)},
        class_order=list(range(10)), num_experiences=T,
    )


@pytest.fixture(scope="module")
def bm():
    return digits_benchmark()


@pytest.fixture(scope="module")
def stream(bm):
    return stream_from_avalanche(bm)


def evaluator(tmp: Path, *extra) -> EvaluationPlugin:
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True), *extra,
        loggers=[TensorboardLogger(str(tmp / "tb"))],
    )


def bridge(stream, tmp: Path, evaluator_=None, **kw) -> StreamLearnerStrategy:
    pl.seed_everything(0, verbose=False)
    return StreamLearnerStrategy(
        learner=Finetune(**learner_kwargs(stream)), train_mb_size=10, eval_mb_size=EVAL_MB,
        evaluator=evaluator_, log_dir=str(tmp / "bridge"), **kw,
    )


# --------------------------------------------------------------------------- §9.1 and §9.2


@pytest.fixture(scope="module")
def runs(bm, stream, tmp_path_factory):
    """The native Lightning run and the bridge run on the same stream and seed."""
    tmp = tmp_path_factory.mktemp("runs")
    pl.seed_everything(0, verbose=False)
    native = fit(Finetune(**learner_kwargs(stream)), StreamDataModule(stream), tmp / "native",
                 accelerator="cpu")
    ev = evaluator(tmp, segment_matrix_metrics(stream=stream))
    strat = bridge(stream, tmp, ev)
    strat.eval(bm.test_stream)  # the init row, as the native evaluator's init_eval
    for exp in bm.train_stream:
        strat.train(exp, shuffle=False)
        strat.eval(bm.test_stream)
    strat.close()
    return native, ev, tmp


def test_same_accuracy_matrix_as_native(runs):
    native, ev, tmp = runs
    R_native = native.matrix()
    all_metrics = ev.get_all_metrics()
    # row 0 of the histories is the init evaluation
    R_bridge = accuracy_matrix_from_metrics(all_metrics, n_segments=T)[1:]
    assert R_native.shape == R_bridge.shape == (T, T)
    assert np.abs(R_native - R_bridge).max() <= 1e-6
    assert np.abs(np.array(native.init) - accuracy_matrix_from_metrics(
        all_metrics, n_segments=T)[0]).max() <= 1e-6
    tb = list((tmp / "tb").glob("events.out.tfevents.*"))
    assert tb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tb[0])).Reload().Tags()["scalars"]
    assert "Top1_Acc_Stream/eval_phase/test_stream" in tags
    assert "StreamForgetting/eval_phase/test_stream" in tags
    assert "Forgetting_Chaudhry/eval_phase/test_stream" in tags
    # metrics.json: the same numbers as the Lightning evaluator's, another backend
    doc_b = json.loads((tmp / "bridge" / "metrics.json").read_text())
    doc_n = json.loads((Path(native.trainer_log_dir) / "metrics.json").read_text())
    assert doc_b["backend"] == "avalanche:StreamLearnerStrategy"
    assert doc_b["status"] == doc_n["status"] == "completed"
    assert doc_b["accuracy_matrix"]["rows"] == doc_n["accuracy_matrix"]["rows"]
    assert doc_b["final"] == doc_n["final"]
    assert doc_b["per_segment"] == doc_n["per_segment"]


def test_metric_agreement_with_avalanche(runs):
    native, ev, _ = runs
    R = native.matrix()
    last = ev.get_last_metrics()
    assert np.allclose(metrics.forgetting_last_matrix(R),
                       np.asarray(functional.forgetting(R.tolist())), atol=1e-12)
    assert last["StreamForgetting/eval_phase/test_stream"] == pytest.approx(
        metrics.forgetting_last(R))
    for j in range(T - 1):
        name = f"ExperienceForgetting/eval_phase/test_stream/Exp{j:03d}"
        assert last[name] == pytest.approx(R[j][j] - R[T - 1][j])
    n = [109, 108, 109, 108, 106]
    assert last["Top1_Acc_Stream/eval_phase/test_stream"] == pytest.approx(
        metrics.acc_final_weighted(R, n))
    assert last["Forgetting_Chaudhry/eval_phase/test_stream"] == pytest.approx(
        metrics.forgetting_chaudhry(R))


def test_forward_transfer_agreement(bm, stream, tmp_path):
    from avalanche.evaluation.metrics import bwt_metrics, forward_transfer_metrics

    ev = EvaluationPlugin(accuracy_metrics(experience=True),
                          forward_transfer_metrics(experience=True, stream=True),
                          bwt_metrics(experience=True, stream=True), segment_matrix_metrics())
    strat = bridge(stream, tmp_path, ev, eval_every=0)
    for exp in bm.train_stream:
        strat.train(exp, eval_streams=[bm.test_stream], shuffle=False)
    R_all = accuracy_matrix_from_metrics(ev.get_all_metrics(), n_segments=T)
    # row 0: the initial eval (b); then each experience's final eval, repeated as the next
    # train() call's initial one
    b, R = R_all[0], R_all[1::2]
    m = ev.get_last_metrics()
    assert m["StreamForwardTransfer/eval_phase/test_stream"] == pytest.approx(
        metrics.fwt_gem(R, b))
    assert m["StreamBWT/eval_phase/test_stream"] == pytest.approx(metrics.bwt_gem(R))
    assert m["BWT_GEM/eval_phase/test_stream"] == pytest.approx(metrics.bwt_gem(R))


# --------------------------------------------------------------------------- §9.3 online


def test_online_stream_segment_metrics(bm, tmp_path):
    on = list(online_stream(bm.train_stream, experience_size=50))
    ev = EvaluationPlugin(accuracy_metrics(experience=True),
                          forgetting_metrics(experience=True, stream=True),
                          segment_matrix_metrics())
    st = stream_from_avalanche(on, test_stream=bm.test_stream)
    assert st.eval_positions == stream_from_avalanche(bm).eval_positions
    strat = bridge(st, tmp_path, ev)
    for exp in on:
        strat.train(exp)
        if exp.logging().is_last_subexp:
            strat.eval(bm.test_stream)
    hist = ev.get_all_metrics()
    assert not any(n.startswith("ExperienceForgetting") for n in hist)
    assert not any(hist.get("StreamForgetting/eval_phase/test_stream", ([], [0]))[1])
    assert hist["Forgetting_Chaudhry/eval_phase/test_stream"][1][-1] > 0.4
    seg = next(m for m in ev.metrics if str(m) == "SegmentMatrix")
    assert seg.matrix().shape == (T, T)


# --------------------------------------------------------------------------- §9.4 hooks


class _Trace(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __getattribute__(self, name):
        if name.startswith(("before_", "after_")) and "eval" not in name:
            return lambda strategy, **kw: object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)


class _HookedFinetune(Finetune):
    """Records the Lightning hooks the bridge calls on the learner, into the trace."""

    def __init__(self, log: list[str], **kw) -> None:
        super().__init__(**kw)
        self._log = log

    def on_train_batch_start(self, batch, batch_idx):
        self._log.append("L:on_train_batch_start")

    def on_before_backward(self, loss):
        self._log.append("L:on_before_backward")

    def on_after_backward(self):
        self._log.append("L:on_after_backward")

    def on_before_optimizer_step(self, optimizer):
        self._log.append("L:on_before_optimizer_step")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._log.append("L:on_train_batch_end")


def test_real_hook_order(stream, tmp_path):
    trace = _Trace()
    bm = stream_to_avalanche(stream)
    learner = _HookedFinetune(trace.events, **learner_kwargs(stream))
    strat = StreamLearnerStrategy(learner=learner, plugins=[trace], allow_unsafe_plugins=True,
                                  evaluator=EvaluationPlugin(), log_dir=str(tmp_path))
    strat.train(bm.train_stream[0])
    ev = trace.events
    it = ev.index("before_training_iteration")
    assert ev[it:it + 15] == [
        "before_training_iteration", "L:on_train_batch_start", "before_forward",
        "after_forward", "before_backward", "L:on_before_backward", "L:on_after_backward",
        "after_backward", "before_update", "L:on_before_optimizer_step", "after_update",
        "after_training_iteration", "L:on_train_batch_end",
        "before_training_iteration", "L:on_train_batch_start",
    ]
    # the dataloader is built before before_training_exp; boundaries never reach the learner
    assert ev[:4] == ["before_training", "before_train_dataset_adaptation",
                      "after_train_dataset_adaptation", "before_training_exp"]
    n_iter = ev.count("before_training_iteration")
    assert n_iter == -(-stream.eval_positions[0] // 10) == learner.observe_steps
    assert ev.count("before_update") == ev.count("after_backward") == n_iter


class _TokenModel(nn.Module):
    """A token table and a head: the smallest model a forgetting regime can reset."""

    def __init__(self, vocab: int = 16, n_classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, n_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


class _TokenLearner(StreamLearner):
    def __init__(self) -> None:
        super().__init__(input_shape=(3,), n_classes=4, batch_size=10)
        self.model = _TokenModel()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, x):
        return self.model(x)

    def observe(self, x, y):
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.update(self.optimizers(), loss)
        return logits.detach(), loss.detach()


def _token_benchmark():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    from adaptlab.avalanche.convert import _tensor_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 16, (230, 3), generator=g), torch.randint(0, 4, (230,), generator=g)
    return benchmark_from_datasets(train=[_tensor_dataset(x[:120], y[:120])],
                                   test=[_tensor_dataset(x[200:], y[200:])])


@pytest.mark.parametrize("host", ["bridge", "naive"])
def test_forgetting_plugin_resets_on_schedule(host, tmp_path):
    bm = _token_benchmark()
    plugin = ForgettingPlugin(EmbeddingForgetting(regime="active", every_k=5, log_every=0))
    if host == "bridge":
        strat = StreamLearnerStrategy(learner=_TokenLearner(), plugins=[plugin],
                                      evaluator=EvaluationPlugin(), log_dir=str(tmp_path))
        emb = strat.learner.model.emb
    else:
        model = _TokenModel()
        strat = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      criterion=nn.CrossEntropyLoss(), train_mb_size=10, plugins=[plugin],
                      evaluator=EvaluationPlugin())
        emb = model.emb
    seen = []
    plugin.before_forward = lambda s, **kw: seen.append((s.clock.train_iterations,
                                                        emb.weight.detach().clone()))
    strat.train(bm.train_stream[0], shuffle=False)
    assert plugin.reset_steps == [5, 10]  # 12 iterations: due after 5 and 10
    assert [s for s, _ in seen] == list(range(12))
    # applied at the start of iteration 6 (clock 5): the table jumps there, not before
    jump = [float((b - a).abs().max()) for (_, a), (_, b) in zip(seen, seen[1:])]
    assert jump[4] > 10 * max(jump[3], jump[5])


def test_forgetting_plugin_rearms_at_the_true_segment_change(tmp_path):
    """`rearm_on: segment` inside Avalanche: the experience's segment is the oracle; the
    schedule is re-armed at the first iteration of the second experience, and only there."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    from adaptlab.avalanche.convert import _tensor_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 16, (200, 3), generator=g), torch.randint(0, 4, (200,), generator=g)
    bm = benchmark_from_datasets(train=[_tensor_dataset(x[:60], y[:60]),
                                        _tensor_dataset(x[60:120], y[60:120])],
                                 test=[_tensor_dataset(x[150:], y[150:])] * 2)
    regime = EmbeddingForgetting(regime="temporary", every_k=2, stop_after=3,
                                 rearm_on="segment", rearm_stop_after=3, log_every=0)
    plugin = ForgettingPlugin(regime)
    ev = EvaluationPlugin()
    strat = StreamLearnerStrategy(learner=_TokenLearner(), plugins=[plugin], evaluator=ev,
                                  log_dir=str(tmp_path))
    for exp in bm.train_stream:
        strat.train(exp, shuffle=False)
    assert regime.rearm_steps == [6]  # 6 iterations per experience: the second starts at 6
    assert regime.reset_steps[0] == 2 and regime.reset_steps[-1] > 6  # resets again after it
    rearms = ev.get_all_metrics()["forgetting/rearm"]
    assert rearms[0] == [6]


@pytest.mark.parametrize("host", ["bridge", "naive"])
def test_probabilistic_forgetting_freezes_and_restores(host, tmp_path):
    from adaptlab.strategies.forgetting import ProbabilisticEmbeddingForgetting

    bm = _token_benchmark()
    plugin = ForgettingPlugin(ProbabilisticEmbeddingForgetting(p=0.5, stop_after=100))
    if host == "bridge":
        strat = StreamLearnerStrategy(learner=_TokenLearner(), plugins=[plugin],
                                      evaluator=EvaluationPlugin(), log_dir=str(tmp_path))
        model = strat.learner.model
    else:
        model = _TokenModel()
        strat = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      criterion=nn.CrossEntropyLoss(), train_mb_size=10, plugins=[plugin],
                      evaluator=EvaluationPlugin())
    emb, head = model.emb.weight.detach().clone(), model.head.weight.detach().clone()
    strat.train(bm.train_stream[0], shuffle=False)
    # inside the window the table is frozen and every replaced row is put back
    assert torch.equal(model.emb.weight, emb)
    assert not torch.equal(model.head.weight, head)


class _LoggingFinetune(Finetune):
    def observe(self, x, y):
        logits, loss = super().observe(x, y)
        self.log("train/loss", loss)
        return logits, loss


def test_learner_log_is_stamped_with_the_clock(stream, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bm = stream_to_avalanche(stream)
    strat = StreamLearnerStrategy(learner=_LoggingFinetune(**learner_kwargs(stream)),
                                  evaluator=EvaluationPlugin(), log_dir=str(tmp_path))
    strat.train(bm.train_stream[0])
    strat.close()
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    steps = [e.step for f in files
             for e in EventAccumulator(str(f)).Reload().Scalars("train/loss")]
    assert steps == list(range(len(steps))) and len(steps) == strat.clock.train_iterations


# --------------------------------------------------------------------------- conversions


def test_conversions_round_trip():
    st = split(segments=[[0, 1], [2, 3], [4, 5]], batch_size=10, max_samples_per_segment=60,
               test_samples_per_segment=20)
    bm = stream_to_avalanche(st)
    assert len(bm.train_stream) == len(st.eval_positions)
    assert len(bm.test_stream) == len(st.segments)
    x, y, t = bm.train_stream[0].dataset[0]
    assert t == 0 and x.shape == st.x.shape[1:]
    back = stream_from_avalanche(bm)
    assert torch.equal(back.x, st.x.float()) and torch.equal(back.y, st.y)
    assert back.eval_positions == st.eval_positions
    assert back.row_segments == st.row_segments
    assert torch.equal(back.segment_ids, st.segment_ids)
    for s in st.segments:
        assert torch.equal(back.test_sets[s.id][1], st.test_sets[s.id][1])
    # an Avalanche strategy on exactly the same data: batches (x, y, 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    naive = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  criterion=nn.CrossEntropyLoss(), train_mb_size=10,
                  evaluator=EvaluationPlugin(accuracy_metrics(experience=True)))
    for exp in bm.train_stream:
        naive.train(exp, shuffle=False)
        naive.eval(bm.test_stream)


@pytest.mark.parametrize("name", ["Naive", "Replay", "EWC", "LwF", "GDumb", "ER_ACE"])
def test_avalanche_strategies_on_adaptlab_stream(name, tmp_path):
    """Avalanche's own strategies on `stream_to_avalanche` data; metrics.json per strategy."""
    from avalanche.training import supervised

    st = split(segments=[[0, 1], [2, 3], [4, 5]], batch_size=10, max_samples_per_segment=60,
               test_samples_per_segment=20)
    bm = stream_to_avalanche(st)
    extra = {"Naive": {}, "Replay": {"mem_size": 20}, "EWC": {"ewc_lambda": 1.0},
             "LwF": {"alpha": 1.0, "temperature": 2.0}, "GDumb": {"mem_size": 20},
             "ER_ACE": {"mem_size": 20, "batch_size_mem": 10}}[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seg = segment_matrix_metrics(log_dir=str(tmp_path))
    strat = getattr(supervised, name)(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(), train_mb_size=10, eval_mb_size=256,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), seg), **extra)
    for exp in bm.train_stream:
        strat.train(exp, shuffle=False)
        strat.eval(bm.test_stream)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["backend"] == f"avalanche:{name}" and doc["status"] == "completed"
    assert doc["stream"]["fingerprint"] == st.fingerprint
    assert len(doc["accuracy_matrix"]["rows"]) == 3 and doc["final"]["acc_final"] is not None


def test_bridge_shuffles_benchmarks_it_did_not_build(bm, stream, tmp_path):
    """An Avalanche user's `strat.train(exp)`: Avalanche shuffles by default, and its
    class-incremental experiences are sorted by class; the bridge now does the same (it kept
    the order and Replay scored at Finetune's level). `stream_to_avalanche` keeps its order."""
    from adaptlab.strategies import Replay

    def final_acc(**train_kw) -> float:
        pl.seed_everything(0, verbose=False)
        strat = StreamLearnerStrategy(
            learner=Replay(**learner_kwargs(stream, memory_size=500, lr=0.05)),
            train_mb_size=10, eval_mb_size=EVAL_MB, log_dir=str(tmp_path / "b"),
            evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
        for exp in bm.train_stream:
            strat.train(exp, **train_kw)
        return strat.eval(bm.test_stream)["Top1_Acc_Stream/eval_phase/test_stream"]

    default, ordered = final_acc(), final_acc(shuffle=False)
    assert ordered < 0.25 and default > ordered + 0.1
    own = stream_to_avalanche(split(batch_size=10, max_samples_per_segment=30))
    weights = []
    for train_kw in ({}, {"shuffle": False}):
        strat = bridge(stream, tmp_path)
        strat.train(own.train_stream[0], **train_kw)
        weights.append(torch.cat([p.detach().flatten() for p in strat.model.parameters()]))
    assert torch.equal(weights[0], weights[1])  # an adaptlab stream keeps its order


def test_tame_on_a_class_incremental_benchmark_says_why(bm, stream, tmp_path):
    from adaptlab.strategies import TAME

    strat = StreamLearnerStrategy(
        learner=TAME(**learner_kwargs(stream)), train_mb_size=10, eval_mb_size=EVAL_MB,
        log_dir=str(tmp_path / "b"), evaluator=EvaluationPlugin(loggers=[]))
    with pytest.warns(UserWarning, match="meant for task-local labels"):
        strat.train(bm.train_stream[1])  # classes {2, 3}: global ids


def test_task_labels_need_permission(bm):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels

    x, y = torch.zeros(20, 1, 8, 8), torch.arange(20) % 2

    def ds(task):
        return ClassificationDataset([TensorDataset(x, y)], data_attributes=[
            DataAttribute(y.tolist(), "targets"), TaskLabels([task] * 20)])

    tbm = benchmark_from_datasets(train=[ds(0), ds(1)], test=[ds(0), ds(1)])
    with pytest.raises(ValueError, match="task labels"):
        stream_from_avalanche(tbm)
    assert len(stream_from_avalanche(tbm, allow_task_labels=True)) == 40


# --------------------------------------------------------------------------- §9.5 guards


def test_guards(stream, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword"):
        bridge(stream, tmp_path, None, not_an_option=1)
    with pytest.raises(IncompatiblePluginError, match="ReplayPlugin"):
        bridge(stream, tmp_path, None, plugins=[ReplayPlugin(mem_size=10)])
    with pytest.raises(ValueError, match="train_epochs"):
        bridge(stream, tmp_path, None, train_epochs=2)
    auto = _TokenLearner()
    auto.automatic_optimization = True
    with pytest.raises(TypeError, match="automatic"):
        StreamLearnerStrategy(learner=auto)


def test_import_adaptlab_without_avalanche():
    code = ("import sys; sys.modules['avalanche'] = None\n"
            "import adaptlab, adaptlab.strategies, adaptlab.evaluation\n"
            "try:\n    import adaptlab.avalanche\nexcept ImportError as e:\n"
            "    assert 'adaptlab[avalanche]' in str(e); print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_checkpoint_resume(bm, stream, tmp_path):
    def make(tmp):
        return bridge(stream, tmp, EvaluationPlugin(segment_matrix_metrics(stream=stream)))

    def seg(strat):
        return next(m for m in strat.evaluator.metrics if str(m) == "SegmentMatrix")

    full = make(tmp_path / "a")
    for exp in bm.train_stream:
        full.train(exp, shuffle=False)
        full.eval(bm.test_stream)
    first = make(tmp_path / "b")
    for exp in list(bm.train_stream)[:2]:
        first.train(exp, shuffle=False)
        first.eval(bm.test_stream)
    first.save_checkpoint(str(tmp_path / "ckpt.pt"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "state_dict" in ckpt and "adaptlab_learner" in ckpt and "adaptlab_bridge" in ckpt
    resumed = make(tmp_path / "c")
    resumed.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert resumed.clock.train_exp_counter == 2
    for exp in list(bm.train_stream)[2:]:
        resumed.train(exp, shuffle=False)
        resumed.eval(bm.test_stream)
    assert np.array_equal(seg(full).matrix(), seg(resumed).matrix())
    assert seg(full).events == seg(resumed).events
    assert resumed.learner.observe_steps == full.learner.observe_steps


# --------------------------------------------------------------------------- bridge = native


def _native_and_bridge(learner_cls, kwargs: dict, stream, tmp: Path) -> tuple[dict, dict]:
    """metrics.json of one learner on one stream, natively and inside Avalanche's own loop
    (`train`/`eval` per experience of `stream_to_avalanche`), both from seed 0."""
    pl.seed_everything(0, verbose=False)
    native = fit(learner_cls(**learner_kwargs(stream, **kwargs)), StreamDataModule(stream),
                 tmp / "native", accelerator="cpu")
    doc_n = json.loads((Path(native.trainer_log_dir) / "metrics.json").read_text())
    bm = stream_to_avalanche(stream)
    pl.seed_everything(0, verbose=False)
    strat = StreamLearnerStrategy(
        learner=learner_cls(**learner_kwargs(stream, **kwargs)), train_mb_size=10,
        eval_mb_size=EVAL_MB, log_dir=str(tmp / "bridge"),
        evaluator=EvaluationPlugin(segment_matrix_metrics(stream=stream), loggers=[]))
    strat.eval(bm.test_stream)
    for exp in bm.train_stream:
        strat.train(exp)
        strat.eval(bm.test_stream)
    strat.close()
    return doc_n, json.loads((tmp / "bridge" / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["Replay", "TAME"])
def test_bridge_equals_native(name, tmp_path):
    """Replay (a memory drawn by its own generator) and TAME (experts spawned at run time,
    a selector trained before each evaluation, pruning at the end) give bit-equal accuracy
    matrices, and the same final metrics, natively and inside Avalanche's loop."""
    from adaptlab import strategies

    # TAME needs segments long enough for its detector to fire; Replay needs no more than 120
    size = {"Replay": {"max_samples_per_segment": 120}, "TAME": {"repeats": 3}}[name]
    stream = split(source="digits", classes_per_segment=2, labels="local", batch_size=10,
                   test_samples_per_segment=60, **size)
    kwargs = {"Replay": {"memory_size": 100},
              "TAME": {"experts": {"lr": 0.1, "output": "sigmoid"},
                       "detector": {"test": "threshold", "window": 50, "grace_steps": 10},
                       "memory": {"selector_capacity": 100, "retrain_capacity": 10},
                       "selector": {"epochs": 5}, "pruning": {"retrain_epochs": 5}}}[name]
    doc_n, doc_b = _native_and_bridge(getattr(strategies, name), kwargs, stream, tmp_path)
    assert doc_b["backend"] == "avalanche:StreamLearnerStrategy"
    assert doc_n["status"] == doc_b["status"] == "completed"
    R_n = doc_n["accuracy_matrix"]["rows"]
    assert len(R_n) == 5 and R_n == doc_b["accuracy_matrix"]["rows"]  # bit-equal, every row
    assert doc_n["accuracy_matrix"]["init"] == doc_b["accuracy_matrix"]["init"]
    assert doc_n["final"] == doc_b["final"]
    assert doc_n["per_segment"] == doc_b["per_segment"]
    assert doc_n["shift_detection"] == doc_b["shift_detection"]
    if name == "TAME":  # the learner summary ran in both: experts were found and scored
        assert doc_n["final"]["learner"]["n_experts"] >= 2
        assert doc_n["final"]["learner"]["acc_class_il"] is not None
    else:
        assert doc_n["final"]["learner"]["n_experts"] is None
