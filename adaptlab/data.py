"""`StreamDataModule`: feeds a Stream to a Lightning Trainer in order, sliced from tensors.

One pass over the stream is one Lightning epoch. Each Lightning step receives one *chunk*
(`batches_per_step * B` samples, never crossing an evaluation point) as a plain `(x, y)`
2-tuple; the learner splits it into `observe` calls. The stream position lives here and is
checkpointed, so a resumed run continues at the exact sample. Segment ids never enter the
batch: callbacks read them through `batch_meta()`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from .streams import Stream, StreamBuilder
from .streams.core import require_positive


class ChunkDataset(Dataset):
    """Item i is the slice `[starts[i], ends[i])` of the stream: one call per chunk, no
    per-sample indexing and no collation. uint8 images become float once per chunk. Under
    data parallelism `index[i]` holds this rank's share of chunk i instead (one gather)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, starts: list[int], ends: list[int],
                 index: list[torch.Tensor] | None = None):
        self.x, self.y, self.starts, self.ends, self.index = x, y, starts, ends, index
        self.calls = 0

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.index is not None:
            x, y = self.x[self.index[i]], self.y[self.index[i]]
        else:
            s, e = self.starts[i], self.ends[i]
            x, y = self.x[s:e], self.y[s:e]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return x, y


def shard_index(start: int, end: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of every mini-batch in `[start, end)`: contiguous, near-equal parts."""
    return torch.cat([
        torch.arange(p, min(p + batch_size, end)).tensor_split(world)[rank]
        for p in range(start, end, batch_size)
    ])


class StreamLoader:
    """The training loader: chunks in stream order, resumable at the exact chunk.

    Its length is the whole epoch's chunk count, and iteration starts at the chunk where the
    data module's restored `samples_consumed` points. Lightning sees a stateful loader (it
    has `state_dict`), so after a mid-epoch resume it expects exactly the remaining chunks.
    """

    def __init__(self, dataset: ChunkDataset, first: int = 0, pin_memory: bool = False):
        self.dataset, self.first, self.pin_memory = dataset, first, pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for i in range(self.first, len(self.dataset)):
            x, y = self.dataset[i]
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position is the data module's `samples_consumed`

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def chunk_plan(
    n: int, eval_positions: tuple[int, ...], chunk: int, start: int = 0
) -> tuple[list[int], list[int]]:
    """Chunk boundaries from `start`: at most `chunk` samples, cut at every eval position."""
    starts, ends = [], []
    p = start
    stops = [e for e in eval_positions if e > start]
    for stop in stops:
        while p < stop:
            q = min(p + chunk, stop)
            starts.append(p)
            ends.append(q)
            p = q
    if p != n:
        raise RuntimeError(f"chunk plan ended at {p}, not at the stream's end {n}")
    return starts, ends


class StreamDataModule(pl.LightningDataModule):
    """Serve a stream in order; per-segment test sets for the evaluator and `test`/`validate`.

    Args:
        stream: a stream config (`adaptlab.streams.Split`, …) or an already built `Stream`.
        batches_per_step: `observe` calls per Lightning step; > 1 amortises the Trainer's
            per-step overhead on tiny batches.
        eval_batch_size: batch size for evaluating test sets.
        presentation: `"stream"` (in order) or `"iid"` (one seeded shuffle of the whole
            stream, evaluated once: the Joint upper bound). `None` lets the learner ask
            (its `presentation` attribute).
        device_cache: keep the whole stream on the accelerator (no copy per step).
    """

    def __init__(
        self,
        stream: StreamBuilder | Stream,
        batches_per_step: int = 50,
        eval_batch_size: int = 1024,
        presentation: str | None = None,
        device_cache: bool = False,
    ) -> None:
        super().__init__()
        require_positive("batches_per_step", batches_per_step)
        require_positive("eval_batch_size", eval_batch_size)
        if presentation not in (None, "stream", "iid"):
            raise ValueError(f"presentation: {presentation!r} is not 'stream' or 'iid'")
        self.config = stream
        self.batches_per_step = batches_per_step
        self.eval_batch_size = eval_batch_size
        self.presentation = presentation
        self.device_cache = device_cache
        self.samples_consumed = 0
        # extra chunk ends every this many samples: the evaluator's anytime points, periodic
        # checkpoints (see `setup`)
        self.stop_periods: set[int] = set()
        self._plan: tuple[list[int], list[int], list[torch.Tensor] | None] = ([], [], None)
        self._next_chunk = 0
        self._base: Stream | None = stream if isinstance(stream, Stream) else None
        self._stream: Stream | None = None
        self._chunk: tuple[int, int] = (0, 0)
        self._loader_dataset: ChunkDataset | None = None

    # -- the stream ---------------------------------------------------------------------------
    @property
    def base_stream(self) -> Stream:
        """The stream as configured (built once, on first use)."""
        if self._base is None:
            self._base = self.config.build()
        return self._base

    @property
    def stream(self) -> Stream:
        """The stream as presented to the learner (in order, or i.i.d. for Joint)."""
        if self._stream is None:
            self._stream = self._present(self.presentation or "stream")
        return self._stream

    def _present(self, presentation: str) -> Stream:
        return self.base_stream.iid() if presentation == "iid" else self.base_stream

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base_stream.input_shape

    @property
    def n_classes(self) -> int:
        return self.base_stream.n_classes

    @property
    def batch_size(self) -> int:
        return self.base_stream.batch_size

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        learner = trainer.lightning_module if trainer is not None else None
        if self._stream is None:
            wanted = self.presentation or getattr(learner, "presentation", "stream")
            self._stream = self._present(wanted)
        if stage == "fit" and trainer is not None:
            require_one_epoch(trainer)
            # `global_step` advances by a whole chunk per Lightning step; ending chunks at every
            # multiple of a checkpoint's `every_n_train_steps` lets it fire at that cadence
            for cb in trainer.checkpoint_callbacks:
                every = int(getattr(cb, "_every_n_train_steps", 0) or 0)
                if every > 0:
                    self.stop_periods.add(every * self.base_stream.batch_size)
        if self.device_cache and trainer is not None:
            dev = trainer.strategy.root_device
            st = self.stream
            need = st.x.element_size() * st.x.nelement()
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                if need > 0.8 * free:
                    raise ValueError(
                        f"device_cache: the stream needs {need / 2**20:.0f} MiB but only "
                        f"{free / 2**20:.0f} MiB are free on {dev}; set device_cache: false"
                    )
            self._stream = _moved(st, dev)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> StreamLoader:
        st = self.stream
        stops = set(st.eval_positions)
        b = st.batch_size
        for every in sorted(self.stop_periods):  # rounded up to whole mini-batches
            stops |= {min(len(st), -(-p // b) * b) for p in range(every, len(st), every)}
        starts, ends = chunk_plan(
            len(st), tuple(sorted(stops)), self.batches_per_step * st.batch_size
        )
        if self.samples_consumed in ends:
            first = ends.index(self.samples_consumed) + 1
        elif self.samples_consumed == 0:
            first = 0
        else:
            raise ValueError(
                f"checkpoint: position {self.samples_consumed} is not a chunk boundary with "
                f"batches_per_step={self.batches_per_step}; resume with the value that wrote it"
            )
        index = None
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            if st.batch_size % world:
                raise ValueError(
                    f"batch_size: {st.batch_size} is not divisible by the {world} processes"
                )
            # Checked on the plan, which every rank shares, so all of them stop alike.
            short = [e - s for s, e in zip(starts, ends) if (e - s) % st.batch_size]
            if any(n % st.batch_size < world for n in short):
                raise ValueError(
                    f"trainer.devices: the stream ({len(st)} samples) has a mini-batch of fewer "
                    f"than {world} samples at a boundary or its end, which would leave a "
                    "process without data; change batch_size or max_samples_per_segment"
                )
            rank = trainer.global_rank
            index = [shard_index(s, e, st.batch_size, rank, world) for s, e in zip(starts, ends)]
        self._plan = (starts, ends, index)
        self._next_chunk = first
        self._loader_dataset = ChunkDataset(st.x, st.learner_labels(st.y), starts, ends, index)
        pin = st.x.device.type == "cpu" and torch.cuda.is_available()
        return StreamLoader(self._loader_dataset, first, pin_memory=pin)

    def _test_loaders(self) -> list[DataLoader]:
        loaders = []
        for seg in self.stream.segments:
            x, y = self.stream.test_sets[seg.id]
            starts = list(range(0, len(y), self.eval_batch_size))
            ends = [min(s + self.eval_batch_size, len(y)) for s in starts]
            loaders.append(DataLoader(ChunkDataset(x, y, starts, ends), batch_size=None))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        # During fit the StreamEvaluator judges the learner; `validate` evaluates test sets.
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            return []
        return self._test_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._test_loaders()

    def predict_dataloader(self) -> list[DataLoader]:
        """`predict` runs on every segment's test set, one loader per segment (in order)."""
        return self._test_loaders()

    def test_set(self, segment_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out `(x, y)` of one segment, x as float."""
        x, y = self.stream.test_sets[segment_id]
        return (x.float().div_(255.0) if x.dtype == torch.uint8 else x), y

    # -- position -----------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            starts, ends, _ = self._plan
            i = self._next_chunk
            self._chunk = (starts[i], ends[i])
            self.samples_consumed = ends[i]
            self._next_chunk += 1
        return batch

    def batch_meta(self) -> dict[str, Any]:
        """Per-chunk metadata for callbacks (never the learner): the current chunk's
        `[start, end)`, the true `segment_ids` of its samples, and `index`, the stream
        positions of the samples this process trained on (`None` without DDP: all)."""
        s, e = self._chunk
        _, _, index = self._plan
        local = index[self._next_chunk - 1] if index is not None else None
        return {"start": s, "end": e, "segment_ids": self.stream.segment_ids[s:e],
                "index": local}

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": self.samples_consumed, "fingerprint": self.stream.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = state.get("fingerprint")
        if theirs is not None and theirs != self.stream.fingerprint:
            raise ValueError(
                "checkpoint: it was written for another stream (fingerprint "
                f"{theirs[:12]}… vs {self.stream.fingerprint[:12]}…); resume with the config "
                "and seed that wrote it"
            )
        self.samples_consumed = int(state["samples_consumed"])


def require_one_epoch(trainer: pl.Trainer) -> None:
    """One pass over the stream is one epoch; more passes belong to the stream (`repeats`)."""
    if trainer.max_epochs != 1:
        raise ValueError(
            f"trainer.max_epochs: must be 1 (one pass over the stream is one epoch), got "
            f"{trainer.max_epochs}; use the stream's `repeats` for passes per segment"
        )


def require_whole_stream(trainer: Any) -> None:
    """The CLI's check: a run is the whole stream. A Lightning step is `batches_per_step`
    mini-batches and `global_step` counts optimizer updates, so `max_steps` would stop at a
    chunk's end with segments never evaluated. (In Python a Trainer's `max_steps` keeps its
    Lightning meaning.) `trainer` is a Trainer or its config."""
    def get(key: str) -> Any:
        return trainer.get(key) if hasattr(trainer, "get") else getattr(trainer, key)

    for key, whole in (("max_steps", (-1, None)), ("limit_train_batches", (None, 1.0)),
                       ("fast_dev_run", (None, False, 0))):
        value = get(key)
        if value not in whole:
            raise ValueError(
                f"trainer.{key}: a run is one pass over the stream (got {value}); "
                "shorten the stream instead: --data.stream.init_args.max_samples_per_segment "
                "N, repeats, or order"
            )


def _moved(st: Stream, device: torch.device) -> Stream:
    """A copy of the stream whose training tensors and test sets live on `device`."""
    import dataclasses

    moved = dataclasses.replace(
        st,
        x=st.x.to(device),
        y=st.y.to(device),
        test_sets={k: (x.to(device), y.to(device)) for k, (x, y) in st.test_sets.items()},
    )
    return moved
