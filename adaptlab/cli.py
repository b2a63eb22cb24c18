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
import sys
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import adaptlab.strategies  # noqa: F401  (registers the learners for `--model Name`)

from .data import StreamDataModule, require_one_epoch
from .distributed import StreamDDPStrategy
from .evaluation import StreamEvaluator
from .learner import NonFiniteLossError, StreamLearner

LOGGER_DEFAULT = {
    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "lightning_logs", "name": "default", "default_hp_metric": False},
}


class AdaptLabParser(LightningArgumentParser):
    """Configuration errors as one line naming the option, not a screen of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        print(f"adaptlab: error: {condense(message)} (`adaptlab fit --help` lists the options)",
              file=sys.stderr)
        sys.exit(2)


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
        parser.add_lightning_class_args(TQDMProgressBar, "progress_bar")
        parser.set_defaults({"progress_bar.refresh_rate": 50})
        # `data:` is a StreamDataModule unless it names another class (`class_path:`)
        parser.set_defaults({"data": {"class_path": "adaptlab.data.StreamDataModule"}})
        for attr in LINKED:
            parser.link_arguments(
                "data", f"model.init_args.{attr}",
                compute_fn=_getter(attr), apply_on="instantiate",
            )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("trainer", {}).get("strategy") in ("ddp", "ddp_find_unused_parameters_true"):
            # Stream learners run several forward/backward pairs per step and may create
            # modules at run time: torch's wrapping DDP cannot serve them.
            cfg["trainer"]["strategy"] = StreamDDPStrategy.strategy_name
        threads = cfg.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads: must be >= 1, got {threads}")
            torch.set_num_threads(threads)


    def _parse_ckpt_path(self) -> None:
        """Check a checkpoint against the config instead of merging its hyperparameters in.

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

    def before_fit(self) -> None:
        """Fail before training, not after it, when the run cannot write its outputs.

        The evaluator scores streams: with another data module (the episodes of StreamAdapter's
        Stage A/B) it is taken out and the learner reports its own metrics."""
        if not isinstance(self.datamodule, StreamDataModule):
            self.trainer.callbacks = [
                cb for cb in self.trainer.callbacks if not isinstance(cb, StreamEvaluator)
            ]
        require_one_epoch(self.trainer)
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


def main(args: list[str] | None = None) -> None:
    """Console entry point; exits non-zero with a one-line message on bad input."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after installed packages: a local file cannot shadow them
    try:
        AdaptLabCLI(
            StreamLearner, pl.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=AdaptLabParser,
            seed_everything_default=0,
            trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "logger": LOGGER_DEFAULT},
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
