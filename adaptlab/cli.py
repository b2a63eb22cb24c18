"""`adaptlab fit|validate|test --config …`: a LightningCLI over stream learners.

- `model:` names a learner (`Finetune`, `Replay`, `Joint`, … or a `class_path`).
- `data:` is a `StreamDataModule`; `data.stream:` names a stream config (`Split`, …).
- `evaluator:` configures the `StreamEvaluator`, always present during `fit`.
- The learner's `input_shape`, `n_classes` and `batch_size` are linked from the built stream.
- `threads:` sets `torch.set_num_threads` (tiny models run fastest single-threaded).
Bad input ends with one line on stderr and exit code 1 (`ADAPTLAB_DEBUG=1` shows the trace).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import adaptlab.strategies  # noqa: F401  (registers the learners for `--model Name`)

from .data import StreamDataModule
from .evaluation import StreamEvaluator
from .learner import NonFiniteLossError, StreamLearner

LOGGER_DEFAULT = {
    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "lightning_logs", "name": "default", "default_hp_metric": False},
}


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
        for attr in ("input_shape", "n_classes", "batch_size"):
            parser.link_arguments(
                "data", f"model.init_args.{attr}",
                compute_fn=_getter(attr), apply_on="instantiate",
            )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        threads = cfg.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads: must be >= 1, got {threads}")
            torch.set_num_threads(threads)


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
    try:
        AdaptLabCLI(
            StreamLearner, StreamDataModule, subclass_mode_model=True,
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
