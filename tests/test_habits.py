"""Lightning users' habits (issue "habits just work"): the exact command a user types, and a
check of what it produced, not only of the exit code. Runs the real CLI in-process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from adaptlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "configs/finetune/split_digits.yaml")
TAME = str(ROOT / "configs/tame/split_digits.yaml")
S = "--data.stream.init_args."
SMALL = [f"{S}max_samples_per_segment", "40", f"{S}test_samples_per_segment", "20",
         f"{S}repeats", "1", "--progress_bar.refresh_rate", "0",
         "--evaluator.print_table", "false"]


def fit(config: str, *extra: str) -> None:
    main(["fit", "--config", config, *SMALL, *extra])


def refused(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code), capsys.readouterr().err.strip()


def metrics(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]


def test_csv_logger(tmp_path) -> None:
    fit(FINETUNE, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path))
    [doc] = metrics(tmp_path)
    assert doc["status"] == "completed"
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    final = [r for r in rows if r.get("final/acc_final")]
    assert float(final[-1]["final/acc_final"]) == pytest.approx(doc["final"]["acc_final"])
    assert any(r.get("Top1_Acc_Stream/eval_phase/test_stream") for r in rows)


def test_no_logger_gives_each_run_its_own_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fit(FINETUNE, "--trainer.logger", "false")
    fit(FINETUNE, "--trainer.logger", "false")
    runs = sorted((tmp_path / "lightning_logs" / "no_logger").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    assert all((r / "metrics.json").exists() for r in runs)
    assert not (tmp_path / "metrics.json").exists()


def test_hparams_have_no_parser_internals(tmp_path) -> None:
    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path))
    run = json.loads(next(tmp_path.rglob("run.json")).read_text())
    assert "learner/lr" in run["hparams"]
    assert not [k for k in run["hparams"] if "/_" in k]


@pytest.mark.parametrize("extra", [
    ["--trainer.enable_progress_bar", "false"],
    ["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "7"],
], ids=["bars off", "own bar"])
def test_progress_bar_options(extra, tmp_path) -> None:
    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path), *extra)
    assert metrics(tmp_path)[0]["status"] == "completed"


def test_periodic_checkpoints_fire_at_the_requested_cadence(tmp_path) -> None:
    """`every_n_train_steps` counts updates; chunks of 50 mini-batches and segment ends used to
    skip most multiples."""
    fit(FINETUNE, f"{S}max_samples_per_segment", "200", "--trainer.logger.init_args.save_dir",
        str(tmp_path), "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", "7", "--trainer.callbacks.save_top_k", "-1")
    steps = sorted(int(p.stem.split("step=")[1]) for p in tmp_path.rglob("*.ckpt"))
    assert steps == list(range(7, 100 + 1, 7))  # 5 segments x 20 updates


def test_accuracies_are_monitorable(tmp_path) -> None:
    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/acc_exp000",
        "--trainer.callbacks.mode", "max", "--trainer.callbacks.patience", "10",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/acc_seen",
        "--trainer.callbacks.mode", "max", "--trainer.callbacks.every_n_train_steps", "4",
        "--trainer.callbacks.filename", "best", "--trainer.callbacks.save_top_k", "1")
    [doc] = metrics(tmp_path)
    assert doc["status"] == "completed"
    ckpt = torch.load(next(tmp_path.rglob("best.ckpt")), weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    seen = [sum(r["acc"][: i + 1]) / (i + 1) for i, r in enumerate(doc["accuracy_matrix"]["rows"])]
    assert float(state["best_model_score"]) == pytest.approx(max(seen))


def test_seed_everything_reaches_learner_and_stream(tmp_path) -> None:
    for name, extra in [("a", []), ("b", ["--seed_everything", "5"]),
                        ("c", ["--seed_everything", "5", "--model.init_args.seed", "0",
                               f"{S}seed", "0"])]:
        fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path / name), *extra)
    a, b, c = (metrics(tmp_path / n)[0] for n in "abc")
    assert b["stream"]["seed"] == 5 and a["stream"]["seed"] == c["stream"]["seed"] == 0
    assert b["accuracy_matrix"] != a["accuracy_matrix"]
    assert c["accuracy_matrix"] == a["accuracy_matrix"]


@pytest.mark.parametrize("config,experts", [(FINETUNE, False), (TAME, True)],
                         ids=["Finetune", "TAME"])
def test_predict_writes_predictions_not_metrics(config, experts, tmp_path, capsys) -> None:
    fit(config, "--trainer.logger.init_args.save_dir", str(tmp_path / "fit"))
    [doc] = metrics(tmp_path / "fit")
    ckpt = next((tmp_path / "fit").rglob("*.ckpt"))
    main(["predict", "--config", config, *SMALL, "--ckpt_path", str(ckpt),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "predict")])
    assert not metrics(tmp_path / "predict")
    out = torch.load(next((tmp_path / "predict").rglob("predictions.pt")), weights_only=True)
    last = doc["accuracy_matrix"]["rows"][-1]["acc"]
    assert [e["segment"] for e in out["segments"]] == doc["accuracy_matrix"]["columns"]
    for entry, acc in zip(out["segments"], last):
        assert (entry["preds"] == entry["labels"]).float().mean().item() == pytest.approx(acc)
        assert ("experts" in entry) == experts
    assert "predictions.pt:" in capsys.readouterr().out


def test_refusals_name_the_adaptlab_way(tmp_path, capsys) -> None:
    code, err = refused(["fit", "--config", FINETUNE, "--optimizer", "torch.optim.Adam"], capsys)
    assert code == 2 and err == (
        "adaptlab: error: --optimizer: learners build their own optimizers: set "
        "--model.init_args.optimizer (sgd, adam, adamw), --model.init_args.lr and the "
        "learner's schedule options")
    logs = tmp_path / "logs"
    code, err = refused(["fit", "--config", FINETUNE, "--trainer.max_steps", "5",
                         "--trainer.logger.init_args.save_dir", str(logs)], capsys)
    assert code == 1 and err.splitlines()[-1].startswith(
        "adaptlab: error: trainer.max_steps: a run is one pass over the stream (got 5)")
    assert not logs.exists()


def test_tame_on_global_labels_says_why(tmp_path) -> None:
    with pytest.warns(UserWarning, match="meant for task-local labels"):
        fit(TAME, f"{S}labels", "global", "--trainer.logger.init_args.save_dir", str(tmp_path))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!.*task-local labels)")
        fit(TAME, "--trainer.logger.init_args.save_dir", str(tmp_path / "local"))


def test_table_reads_any_run_folder(tmp_path) -> None:
    """tools/table.py over a folder with a stream run, a failed one and a StreamAdapter stage
    (written with the same metrics.json frame): run names, status, unfinished left out."""
    import sys

    from adaptlab.jsonio import metrics_document, write_json_atomic

    sys.path.insert(0, str(ROOT / "tools"))
    import table

    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path))
    for run in ("stage_a", "broken"):
        (tmp_path / run / "version_0").mkdir(parents=True)
    write_json_atomic(str(tmp_path / "stage_a" / "version_0" / "metrics.json"),
                      metrics_document("completed", final={"update_steps": 3},
                                       stage_a={"icl_check": {"passed": True}}))
    write_json_atomic(str(tmp_path / "broken" / "version_0" / "metrics.json"),
                      metrics_document("failed"))
    shown = table.main([str(tmp_path)])
    rows = shown.splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == [
        "finetune_split_digits/version_0", "stage_a/version_0"]
    assert "| split_digits |" in rows[0] and "| — |" in rows[1]
    assert "broken/version_0" in table.main([str(tmp_path), "--all"])


def test_readme_resume_snippet_is_resumable(tmp_path) -> None:
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("**Resume.**", 1)[1]
    snippet = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "ckpt.yaml").write_text(snippet)
    args = ["--config", FINETUNE, "--config", str(tmp_path / "ckpt.yaml"),
            "--progress_bar.refresh_rate", "0", "--evaluator.print_table", "false"]
    main(["fit", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / "whole")])
    ckpts = sorted(p.name for p in (tmp_path / "whole").rglob("*.ckpt"))
    assert ckpts == ["epoch=0-step=500.ckpt", "last.ckpt"]  # 629 updates in the run
    mid = next((tmp_path / "whole").rglob("epoch=0-step=500.ckpt"))
    main(["fit", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / "resumed"),
          "--ckpt_path", str(mid)])
    whole, resumed = metrics(tmp_path / "whole")[0], metrics(tmp_path / "resumed")[0]
    assert resumed["status"] == "completed"
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["final"] == whole["final"]


def test_early_stopping_acts_at_segment_ends(tmp_path, capsys) -> None:
    """Finetune forgets segment 0 as soon as segment 1 is learnt: EarlyStopping on its accuracy
    (patience 0) stops the run at the second segment end, and the run reports what it reached."""
    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/acc_exp000",
        "--trainer.callbacks.mode", "max", "--trainer.callbacks.patience", "0")
    [doc] = metrics(tmp_path)
    rows = doc["accuracy_matrix"]["rows"]
    assert doc["status"] == "stopped_early" and len(rows) == 2
    assert rows[1]["acc"][0] < rows[0]["acc"][0]
    assert "stopped early at sample 80" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("accumulate_grad_batches", "2", "trainer.accumulate_grad_batches: a stream learner updates "
     "once per mini-batch; to learn from more samples per update raise the stream's batch_size "
     "(got 2)"),
    ("gradient_clip_val", "1.0", "trainer.gradient_clip_val: stream learners make their own "
     "updates (manual optimization), so Lightning's clipping never runs; lower the lr (got 1.0)"),
    ("limit_train_batches", "2", "trainer.limit_train_batches: a run is one pass over the stream "
     "(got 2); shorten the stream instead: --data.stream.init_args.max_samples_per_segment N, "
     "repeats, or order"),
    ("fast_dev_run", "true", "trainer.fast_dev_run: a run is one pass over the stream (got "
     "True); shorten the stream instead: --data.stream.init_args.max_samples_per_segment N, "
     "repeats, or order"),
])
def test_trainer_options_stream_runs_cannot_honour(option, value, message, tmp_path,
                                                   capsys) -> None:
    logs = tmp_path / "logs"
    code, err = refused(["fit", "--config", FINETUNE, f"--trainer.{option}", value,
                         "--trainer.logger.init_args.save_dir", str(logs)], capsys)
    assert code == 1 and err.splitlines()[-1] == f"adaptlab: error: {message}"
    assert not logs.exists()


def test_checkpoint_from_other_data_is_refused_before_anything_runs(tmp_path, capsys) -> None:
    import numpy as np

    fit(FINETUNE, "--trainer.logger.init_args.save_dir", str(tmp_path / "digits"))
    ckpt = str(next((tmp_path / "digits").rglob("*.ckpt")))
    rng = np.random.default_rng(0)
    y = np.arange(300) % 6
    np.savez(tmp_path / "six.npz", x_train=rng.normal(size=(200, 20)), y_train=y[:200],
             x_test=rng.normal(size=(100, 20)), y_test=y[200:])
    logs = tmp_path / "logs"
    for extra, message in [
        (["--data.stream.init_args.source", str(tmp_path / "six.npz")],
         "checkpoint: written for a stream with n_classes 10, this one has 6; resume with the "
         "config and data that wrote it"),
        (["--data.stream.init_args.seed", "3"], "checkpoint: it was written for another stream"),
    ]:
        code, err = refused(["fit", "--config", FINETUNE, *SMALL, *extra, "--ckpt_path", ckpt,
                             "--trainer.logger.init_args.save_dir", str(logs)], capsys)
        assert code == 1 and err.splitlines()[-1].startswith(f"adaptlab: error: {message}")
        assert not logs.exists()


def test_the_cli_is_quiet(tmp_path) -> None:
    """`make run`-style output: the progress bar, then the results table; no banners, tips,
    model summary or warnings that say nothing about the run."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "adaptlab.cli", "fit", "--config", FINETUNE, *SMALL[:-2],
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for noise in ("Tip:", "GPU available", "Trainable params", "LeafSpec", "log_every_n_steps",
                  "Total length of", "Warning", "warn("):
        assert noise not in text, noise
    assert "accuracy matrix" in out.stdout and "metrics.json:" in out.stdout
