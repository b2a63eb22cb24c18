"""`adaptlab fit|validate|test --config …`: a LightningCLI over stream learners.

- `model:` names a learner (`Finetune`, `Replay`, `Joint`, … or a `class_path`).
- `data:` is a `StreamDataModule`; `data.stream:` names a stream config (`Split`, …); or,
  with `class_path:`, another data module (`adaptlab.episodes.EpisodeDataModule`).
- `evaluator:` configures the `StreamEvaluator`, always present during `fit`.
- The learner's `input_shape`, `n_classes` and `batch_size` are linked from the built stream.
- `threads:` sets `torch.set_num_threads` (tiny models run fastest single-threaded).
- Modules in the current folder are importable, as with `python -m`: a config can name your
  own stream class (`class_path: my_streams.MyStream`) or loader (`source: my_data:load`).
Bad input ends with one line on stderr and exit code 1 (`ADAPTLAB_DEBUG=1` shows the trace).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import adaptlab.strategies  # noqa: F401  (registers the learners for `--model Name`)

from ._lightning_private import CLI_CKPT_HOOK
from .data import StreamDataModule, require_one_epoch, require_whole_stream
from .distributed import StreamDDPStrategy
from .evaluation import StreamEvaluator
from .learner import NonFiniteLossError, StreamLearner

LOGGER_DEFAULT = {
    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "lightning_logs", "name": "default", "default_hp_metric": False},
}


#: Standard LightningCLI options adaptlab does not take, and the adaptlab way instead.
REFUSED = {
    "--optimizer": "learners build their own optimizers: set --model.init_args.optimizer "
    "(sgd, adam, adamw), --model.init_args.lr and the learner's schedule options",
    "--lr_scheduler": "learners own their schedules: see the learner's options "
    "(`adaptlab fit --model <Learner> --help`, e.g. TAME's experts.lr_milestones)",
}


class AdaptLabParser(LightningArgumentParser):
    """Configuration errors as one line naming the option, not a screen of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        refused = next((o for o in REFUSED if f"{o} " in message + " " or f"{o}=" in message),
                       None)
        moved = _moved_key(message)
        if refused is not None:
            print(f"adaptlab: error: {refused}: {REFUSED[refused]}", file=sys.stderr)
        elif moved is not None:
            print(f"adaptlab: error: {moved}", file=sys.stderr)
        else:
            print(f"adaptlab: error: {condense(message)} (`adaptlab fit --help` lists the "
                  "options)", file=sys.stderr)
        sys.exit(2)


def _moved_key(message: str) -> str | None:
    """A learner option that moved into a settings group (a learner's `MOVED_KEYS`, e.g.
    TAME's `window` -> `detector.window`), named with its new key; None otherwise."""
    match = re.search(r"Option '(\w+)' is not accepted", message)
    if match is None:
        return None
    key, stack = match.group(1), list(StreamLearner.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        new = getattr(cls, "MOVED_KEYS", {}).get(key)
        if new is not None:
            return (f"model.init_args.{key}: {cls.__name__}'s settings are grouped; it is now "
                    f"model.init_args.{new}")
    return None


NOISE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Given value type:",
         "- Expected a <class 'NoneType'>")


def condense(message: str) -> str:
    """jsonargparse's nested error report folded onto one line, the generic parts dropped."""
    parts = []
    for line in message.splitlines():
        line = line.strip().lstrip("- ").strip()
        if line and not any(line.startswith(n.lstrip("- ")) for n in NOISE):
            if line.rstrip(":") not in parts:
                parts.append(line.rstrip(":"))
    return "; ".join(parts) or message.strip()


class AdaptLabCLI(LightningCLI):
    """LightningCLI with the evaluator, thread control and stream→learner links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch.set_num_threads before anything runs (1 is fastest for tiny models)",
        )
        parser.add_lightning_class_args(StreamEvaluator, "evaluator")
        parser.add_argument(
            "--progress_bar.refresh_rate", type=int, default=50,
            help="the default progress bar's refresh rate in Lightning steps (0: off); "
                 "`trainer.enable_progress_bar: false` or a progress bar of your own replace it",
        )
        # `data:` is a StreamDataModule unless it names another class (`class_path:`)
        parser.set_defaults({"data": {"class_path": "adaptlab.data.StreamDataModule"}})
        for attr in LINKED:
            parser.link_arguments(
                "data", f"model.init_args.{attr}",
                compute_fn=_getter(attr), apply_on="instantiate",
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._fill_seeds()  # before a checkpoint is checked against the config

    def _fill_seeds(self) -> None:
        """`seed_everything` reaches every seed the config leaves unset (null): the learner's,
        the stream's, the data module's. A seed set explicitly is kept."""
        cfg = self.config[self.config["subcommand"]] if "subcommand" in self.config else (
            self.config)
        seed = cfg.get("seed_everything")
        if isinstance(seed, bool) or not isinstance(seed, int):
            return  # false (no seeding) or true (drawn later, in before_instantiate_classes)
        for path in ("model.init_args", "data.init_args", "data.init_args.stream.init_args"):
            node = cfg
            for key in path.split("."):
                node = node.get(key) if hasattr(node, "get") else None
                if node is None:
                    break
            if node is not None and "seed" in node and node["seed"] is None:
                node["seed"] = seed

    def before_instantiate_classes(self) -> None:
        self._fill_seeds()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._add_progress_bar(cfg)
        trainer = cfg.get("trainer")
        data = cfg.get("data") or {}
        if trainer is not None and self.subcommand == "fit" and (
                data.get("class_path") == f"{StreamDataModule.__module__}.StreamDataModule"):
            require_whole_stream(trainer)  # a config check: before any logger writes a file
        if trainer is not None:
            refuse_manual_options(trainer)
        if (trainer is not None and not trainer.get("logger")
                and not trainer.get("default_root_dir")):
            # without a logger, each run still gets its own folder instead of the current one
            trainer["default_root_dir"] = _next_version(os.path.join("lightning_logs", "no_logger"))
        if cfg.get("trainer", {}).get("strategy") in ("ddp", "ddp_find_unused_parameters_true"):
            # Stream learners run several forward/backward pairs per step and may create
            # modules at run time: torch's wrapping DDP cannot serve them.
            cfg["trainer"]["strategy"] = StreamDDPStrategy.strategy_name
        threads = cfg.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads: must be >= 1, got {threads}")
            torch.set_num_threads(threads)


    @staticmethod
    def _add_progress_bar(cfg: Any) -> None:
        """The default progress bar, unless the user turned bars off or brought their own."""
        from jsonargparse import Namespace
        from pytorch_lightning.callbacks import ProgressBar

        trainer = cfg.get("trainer")
        rate = (cfg.get("progress_bar") or {}).get("refresh_rate", 50)
        if trainer is None or trainer.get("enable_progress_bar") is False:
            return
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        for cb in callbacks:
            path = cb.get("class_path") if hasattr(cb, "get") else None
            cls = _import(path) if isinstance(path, str) else type(cb)
            if isinstance(cls, type) and issubclass(cls, ProgressBar):
                return
        callbacks.append(Namespace(class_path=f"{TQDMProgressBar.__module__}.TQDMProgressBar",
                                   init_args=Namespace(refresh_rate=rate, process_position=0,
                                                       leave=False)))
        trainer["callbacks"] = callbacks

    def _check_ckpt_path(self) -> None:
        """Check a checkpoint against the config instead of merging its hyperparameters in
        (Lightning calls it by a private name: `_lightning_private.CLI_CKPT_HOOK`).

        LightningCLI replaces the configured model with the checkpoint's; here the config (plus
        the seed) defines the run, so a checkpoint from another learner or with other learner
        settings is refused, naming what differs.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt_path!r}")
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:  # a truncated or foreign file
            raise ValueError(
                f"ckpt_path: {ckpt_path!r} is not a readable checkpoint ({type(err).__name__})"
            ) from None
        saved = dict(ckpt.get("hyper_parameters", {}))
        model = self.config[sub]["model"]
        theirs, mine = saved.pop("_class_path", None), model.get("class_path")
        if theirs and mine and theirs != mine:
            raise ValueError(
                f"checkpoint: written by learner {theirs.rsplit('.', 1)[-1]}, not "
                f"{mine.rsplit('.', 1)[-1]}; resume with the config that wrote it"
            )
        ours = model.get("init_args") or {}
        for key, value in saved.items():
            if key.startswith("_") or key in LINKED or key not in ours:
                continue
            if _plain(ours[key]) != _plain(value):
                raise ValueError(
                    f"checkpoint: written with model.{key}={value!r}, the config says "
                    f"{ours[key]!r}; resume with the config that wrote it"
                )

    def before_predict(self) -> None:
        """`predict` writes `predictions.pt` (per segment: preds, labels, experts) to the run's
        folder and prints each segment's accuracy; it writes no metrics.json."""
        self._check_checkpoint_fits()
        self.trainer.callbacks.append(PredictionFile())

    def before_test(self) -> None:
        self._check_checkpoint_fits()

    def before_validate(self) -> None:
        self._check_checkpoint_fits()

    def _check_checkpoint_fits(self) -> None:
        """A checkpoint from another stream is refused in one line before anything runs or
        is written (its shapes would fail deep in `load_state_dict`)."""
        path = self.config[self.subcommand].get("ckpt_path")
        if not path or not os.path.isfile(path) or not isinstance(self.datamodule,
                                                                   StreamDataModule):
            return
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        saved = ckpt.get("hyper_parameters", {})
        for key in ("n_classes", "input_shape"):
            theirs, mine = saved.get(key), getattr(self.model, key, None)
            if theirs is not None and mine is not None and _plain(theirs) != _plain(mine):
                raise ValueError(
                    f"checkpoint: written for a stream with {key} {_plain(theirs)}, this one has "
                    f"{_plain(mine)}; resume with the config and data that wrote it"
                )
        state = ckpt.get(type(self.datamodule).__qualname__) or {}
        theirs = state.get("fingerprint")
        if theirs is not None and self.subcommand == "fit" and (
                theirs != self.datamodule.stream.fingerprint):
            raise ValueError(
                "checkpoint: it was written for another stream (fingerprint "
                f"{theirs[:12]}… vs {self.datamodule.stream.fingerprint[:12]}…); resume with "
                "the config and seed that wrote it"
            )

    def before_fit(self) -> None:
        """Fail before training, not after it, when the run cannot write its outputs.

        The evaluator scores streams: with another data module (the episodes of StreamAdapter's
        Stage A/B) it is taken out and the learner reports its own metrics."""
        if not isinstance(self.datamodule, StreamDataModule):
            self.trainer.callbacks = [
                cb for cb in self.trainer.callbacks if not isinstance(cb, StreamEvaluator)
            ]
        require_one_epoch(self.trainer)
        self._check_checkpoint_fits()
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        try:
            os.makedirs(log_dir, exist_ok=True)
            probe = os.path.join(log_dir, ".adaptlab_write_probe")
            with open(probe, "w") as fh:
                fh.write("ok")
            os.remove(probe)
        except OSError as err:
            raise ValueError(
                f"log dir {log_dir!r} is not writable ({err.strerror}); set "
                "--trainer.logger.init_args.save_dir to a writable folder"
            ) from None


setattr(AdaptLabCLI, CLI_CKPT_HOOK, AdaptLabCLI._check_ckpt_path)


class PredictionFile(BasePredictionWriter):
    """Saves `predict`'s outputs on the stream's test sets, one entry per segment."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           predictions: Any, batch_indices: Any) -> None:
        per_loader = predictions if predictions and isinstance(predictions[0], list) else [
            predictions]
        stream = trainer.datamodule.stream
        out: dict[str, Any] = {"stream": stream.name, "fingerprint": stream.fingerprint,
                               "segments": []}
        for seg, batches in zip(stream.segments, per_loader):
            entry = {"segment": seg.id, "name": seg.name}
            for key in batches[0]:
                entry[key] = torch.cat([b[key] for b in batches]).cpu()
            out["segments"].append(entry)
        if not trainer.is_global_zero:
            return
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "predictions.pt")
        torch.save(out, path)
        for e in out["segments"]:
            acc = (e["preds"] == e["labels"]).float().mean().item()
            experts = "" if "experts" not in e else (
                f", experts {sorted(set(e['experts'].tolist()))}")
            print(f"segment {e['segment']} ({e['name']}): accuracy {acc:.4f} on "
                  f"{len(e['labels'])} samples{experts}")
        print(f"predictions.pt: {path}")


LINKED = ("input_shape", "n_classes", "batch_size")


def _plain(value: Any) -> Any:
    """Comparable form of a hyperparameter (tuples and lists alike, namespaces as dicts)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Trainer options that assume Lightning's automatic optimization, and the adaptlab way.
MANUAL = {
    "accumulate_grad_batches": (1, "a stream learner updates once per mini-batch; to learn "
                                "from more samples per update raise the stream's batch_size"),
    "gradient_clip_val": (None, "stream learners make their own updates (manual "
                          "optimization), so Lightning's clipping never runs; lower the lr"),
}


def refuse_manual_options(trainer: Any) -> None:
    """One line for Trainer options stream learners cannot honour, before anything runs."""
    for key, (neutral, why) in MANUAL.items():
        value = trainer.get(key)
        if value is not None and value != neutral:
            raise ValueError(f"trainer.{key}: {why} (got {value})")


def _next_version(folder: str) -> str:
    """`<folder>/version_<n>` for the first n not taken, as Lightning's loggers number runs."""
    n = 0
    while os.path.exists(os.path.join(folder, f"version_{n}")):
        n += 1
    return os.path.join(folder, f"version_{n}")


def _import(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _getter(attr: str) -> Any:
    def get(dm: StreamDataModule) -> Any:
        return getattr(dm, attr)

    get.__name__ = f"stream_{attr}"
    return get


USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError, PermissionError)


def user_message(err: BaseException) -> str:
    """The innermost user error of a chain (jsonargparse wraps errors raised while linking),
    folded onto one line."""
    while isinstance(err.__cause__, USER_ERRORS):
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(err).__name__


#: Lightning messages that say nothing about an adaptlab run: the fit loop's own validation is
#: empty by design (the evaluator judges the stream), steps are chunks so the logging
#: interval warning is moot, and LeafSpec is Lightning's own deprecation.
QUIET = (
    r"Total length of .* across ranks is zero",
    r"The number of training batches .* is smaller than the logging interval",
    r".*LeafSpec.* is deprecated",
    r"Couldn't infer the batch indices fetched from your dataloader",
    r"Using ModelCheckpoint with manual optimization",  # a chunk's state after its updates
)


def quiet() -> None:
    """One results table at the end: Lightning's banners, tips and moot warnings off."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch",
                 "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def main(args: list[str] | None = None) -> None:
    """Console entry point; exits non-zero with a one-line message on bad input."""
    quiet()
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after installed packages: a local file cannot shadow them
    try:
        AdaptLabCLI(
            StreamLearner, pl.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=AdaptLabParser,
            seed_everything_default=0,
            trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "logger": LOGGER_DEFAULT,
                              "enable_model_summary": False},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except USER_ERRORS as err:
        if os.environ.get("ADAPTLAB_DEBUG"):
            raise
        print(f"adaptlab: error: {user_message(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
