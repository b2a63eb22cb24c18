"""Text tasks for a Hugging Face causal LM: local JSONL files, a prompt template, option scoring.

A task is one JSONL file, `<tasks_dir>/<name>.jsonl`, one example a line:
`{"input": "…", "options": ["…", "…"], "answer": 0}`. A demonstration is the template filled
with the input and the right option; a query is the template up to `{output}`, and its answer
is the option with the highest summed log-likelihood as a continuation (option scoring, as
in the evaluation of the StreamAdapter paper's classification tasks). Episodes (k demos and q
queries of one task) are a pure function of (seed, task, k, index), so methods compare on the
same ones. `TextEpisodeDataModule` serves them to a learner (StreamAdapter's Stage B on an LLM,
`strategies/stream_adapter_hf.py`); `TextStream` serves the tasks as a non-stationary stream
(one task after another, no task labels) to the test-time learner. Needs the `llm` extra
(`transformers`) for the tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from .streams import Stream, StreamBuilder
from .streams.core import Purpose, Segment, digest, require_positive, rng

DEFAULT_TEMPLATE = "Input: {input}\nOutput: {output}\n\n"


@dataclass(frozen=True)
class TextExample:
    input: str
    options: tuple[str, ...]
    answer: int


def load_task(tasks_dir: str, name: str) -> list[TextExample]:
    """Read `<tasks_dir>/<name>.jsonl`; every line needs `input`, `options`, `answer`."""
    path = os.path.join(tasks_dir, f"{name}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tasks: no file {path!r} (one JSONL file per task)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            opts = tuple(str(o) for o in row["options"])
            ans = int(row["answer"])
            if len(opts) < 2 or not 0 <= ans < len(opts):
                raise ValueError(f"{path}:{n}: need >= 2 options and 0 <= answer < len(options)")
            out.append(TextExample(str(row["input"]), opts, ans))
    if len(out) < 2:
        raise ValueError(f"{path}: a task needs at least 2 examples")
    return out


class PromptFormat:
    """Tokenises demos and queries with one template (`{input}`, `{output}`).

    `demo(ex)` is the filled template; `query(ex)` the part before `{output}` (the prompt) and
    one continuation per option. No special tokens are added: a demo stream is plain text.
    """

    def __init__(self, tokenizer: Any, template: str = DEFAULT_TEMPLATE) -> None:
        if template.count("{output}") != 1 or "{input}" not in template.split("{output}")[0]:
            raise ValueError("template: needs {input} before exactly one {output}")
        self.tok = tokenizer
        self.prefix, self.suffix = template.split("{output}")

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def demo(self, ex: TextExample) -> list[int]:
        return self.ids(self.prefix.format(input=ex.input) + ex.options[ex.answer] + self.suffix)

    def query(self, ex: TextExample) -> tuple[list[int], list[list[int]]]:
        """The prompt and, per option, its continuation tokens (tokenised with the prompt, so
        the split follows the tokenizer's merges; at least one token each)."""
        prompt_text = self.prefix.format(input=ex.input)
        prompt = self.ids(prompt_text)
        conts = []
        for opt in ex.options:
            full = self.ids(prompt_text + opt)
            cut = len(prompt) if full[:len(prompt)] == prompt else len(prompt) - 1
            conts.append(full[cut:] or self.ids(opt))
        return prompt, conts


@dataclass
class TextEpisode:
    """One task's k demonstrations (token ids, concatenated) and q queries."""

    task: str
    context: list[int]
    prompts: list[list[int]]
    options: list[list[list[int]]]
    answers: list[int]


def draw_episode(examples: Sequence[TextExample], fmt: PromptFormat, task: str, k: int,
                 n_query: int, seed: int, key: int) -> TextEpisode:
    """k demos and n_query queries, distinct examples when the task has enough (demos are
    drawn with replacement beyond that), from (seed, task, k, key)."""
    g = np.random.default_rng([seed, zlib.crc32(task.encode()), k, key])
    order = g.permutation(len(examples))
    queries = [examples[i] for i in order[:n_query]]
    pool = order[n_query:] if len(order) > n_query else order
    picks = pool[:k] if k <= len(pool) else g.choice(pool, size=k, replace=True)
    context: list[int] = []
    for i in picks:
        context += fmt.demo(examples[int(i)])
    prompts, options = zip(*(fmt.query(q) for q in queries)) if queries else ((), ())
    return TextEpisode(task, context, list(prompts), list(options), [q.answer for q in queries])


def pad_rows(rows: Sequence[Sequence[int]], pad: int, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real positions; T is `width` (default the
    longest row's length)."""
    if width is None:
        width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids (N, T), attention mask (N, T)) -> logits (N, T, V)."""


def continuation_logprob(logits_fn: LogitsFn, prefixes: Sequence[Sequence[int]],
                         conts: Sequence[Sequence[int]], pad: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Σ log p(continuation | prefix) per row (N,), all rows in one right-padded batch."""
    rows = [list(p) + list(c) for p, c in zip(prefixes, conts)]
    ids, mask = pad_rows(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    logp = logits_fn(ids, mask.long()).float().log_softmax(-1)
    target = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(prefixes, conts)):
        target[i, len(p):len(p) + len(c)] = True
    # position t predicts token t + 1
    tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return (tok_lp * target[:, 1:].to(tok_lp.dtype)).sum(-1)


def option_scores(logits_fn: LogitsFn, episodes: Sequence[TextEpisode], pad: int,
                  with_context: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Option log-likelihoods (B, q, n_opt), −inf for missing options; the rows of an
    episode are contiguous (episode, query, option) so a side branch can repeat its state.
    `with_context`: the demos precede each prompt in the window (ICL); else no context."""
    n_opt = max(len(o) for ep in episodes for o in ep.options)
    prefixes, conts, where = [], [], []
    for b, ep in enumerate(episodes):
        for j, (prompt, opts) in enumerate(zip(ep.prompts, ep.options)):
            for o in range(n_opt):
                cont = opts[o] if o < len(opts) else opts[0]
                prefixes.append((ep.context if with_context else []) + prompt)
                conts.append(cont)
                where.append((b, j, o, o < len(opts)))
    lp = continuation_logprob(logits_fn, prefixes, conts, pad, device)
    q = max(len(ep.prompts) for ep in episodes)
    out = torch.full((len(episodes), q, n_opt), -math.inf, device=lp.device)
    for (b, j, o, real), v in zip(where, lp):
        if real:
            out[b, j, o] = v
    return out


def accuracy(scores: torch.Tensor, episodes: Sequence[TextEpisode]) -> torch.Tensor:
    """Per-episode accuracy (B,) of the argmax option."""
    answers = torch.tensor([ep.answers for ep in episodes], device=scores.device)
    return (scores.argmax(-1) == answers).float().mean(-1)


class TextEpisodeDataModule(pl.LightningDataModule):
    """Episodes of local JSONL text tasks, one batch a step (Stage B on a causal LM).

    Args:
        model_path: the local model folder; its tokenizer is used.
        tasks_dir: the folder of `<task>.jsonl` files.
        tasks: the seen tasks (training batches: `per_task` episodes of each).
        eval_tasks: tasks evaluated at the end (seen and unseen; default: `tasks`).
        template: the prompt template (`{input}` … `{output}`).
        n_query, per_task, k_min, k_max: queries per episode, episodes per task and batch,
            demonstration counts (log-uniform, one k per batch).
        steps: batches in the run (set it to `trainer.max_steps`).
        seed: the batches.
    """

    def __init__(
        self, *, model_path: str, tasks_dir: str, tasks: Sequence[str],
        eval_tasks: Sequence[str] | None = None, template: str = DEFAULT_TEMPLATE,
        n_query: int = 2, per_task: int = 2, k_min: int = 1, k_max: int = 16,
        steps: int = 100, seed: int | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        if not 1 <= k_min <= k_max:
            raise ValueError(f"k_min, k_max: need 1 <= k_min <= k_max, got {k_min}, {k_max}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.fmt = PromptFormat(self.tokenizer, template)
        self.tasks = list(tasks)
        self.eval_tasks = list(eval_tasks or tasks)
        self.data = {t: load_task(tasks_dir, t) for t in dict.fromkeys(self.tasks +
                                                                        self.eval_tasks)}
        self.n_query, self.per_task = n_query, per_task
        self.k_min, self.k_max, self.steps = k_min, k_max, steps
        self.seed = 0 if seed is None else int(seed)
        pad = self.tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    # what the CLI links into the learner
    @property
    def input_shape(self) -> tuple[int]:
        return (1,)

    @property
    def n_classes(self) -> int:
        return len(self.tokenizer)

    @property
    def batch_size(self) -> int:
        return self.per_task * len(self.tasks)

    def draw_k(self, step: int) -> int:
        g = np.random.default_rng([self.seed, 1000, step])
        lo, hi = math.log(self.k_min), math.log(self.k_max + 1)
        return min(self.k_max, max(self.k_min, int(math.exp(g.uniform(lo, hi)))))

    def batch(self, i: int) -> list[TextEpisode]:
        """Batch `i`: `per_task` episodes of every seen task with one shared k."""
        k = self.draw_k(i)
        return [draw_episode(self.data[t], self.fmt, t, k, self.n_query, self.seed,
                             key=i * 1000 + j)
                for t in self.tasks for j in range(self.per_task)]

    def eval_episodes(self, task: str, k: int, n: int, seed: int) -> list[TextEpisode]:
        """`n` fixed evaluation episodes of `task` at `k` (independent of the training seed)."""
        return [draw_episode(self.data[task], self.fmt, task, k, self.n_query, seed,
                             key=10**9 + i) for i in range(n)]

    def train_dataloader(self) -> Iterator[list[TextEpisode]]:
        return _Batches(self)

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        return batch  # token lists; the learner moves the tensors it builds


class _Batches:
    def __init__(self, dm: TextEpisodeDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.steps

    def __iter__(self) -> Iterator[list[TextEpisode]]:
        for i in range(self.dm.steps):
            yield self.dm.batch(i)


# ----- a test-time stream of text tasks ------------------------------------------------------

PAD = -1
"""Fill of a packed example row past its tokens (never a token id)."""


@dataclass
class PackedExample:
    """One text example as the test-time learner reads it from a stream row: the prompt, one
    continuation per option, and per option the demonstration it makes when it is the answer."""

    prompt: list[int]
    options: list[list[int]]
    demos: list[list[int]]


def pack_example(fmt: PromptFormat, ex: TextExample) -> list[int]:
    """`[n_opt, len(prompt), len(cont_o)…, len(demo_o)…, prompt, conts…, demos…]`: an example
    as one row of token ids, so a stream can carry text as a plain tensor. Every option's demo
    is packed (the label picks one), so the row says nothing of the answer."""
    prompt, conts = fmt.query(ex)
    demos = [fmt.demo(TextExample(ex.input, ex.options, o)) for o in range(len(ex.options))]
    head = [len(ex.options), len(prompt), *map(len, conts), *map(len, demos)]
    return head + prompt + [t for c in conts for t in c] + [t for d in demos for t in d]


def unpack_rows(x: torch.Tensor) -> list[PackedExample]:
    """The inverse of `pack_example` for a batch of rows (B, T)."""
    out = []
    for row in x.tolist():
        n = int(row[0])
        lens = [int(v) for v in row[1:2 + 2 * n]]
        pos = 2 + 2 * n
        parts = []
        for length in lens:
            parts.append([int(t) for t in row[pos:pos + length]])
            pos += length
        out.append(PackedExample(parts[0], parts[1:1 + n], parts[1 + n:]))
    return out


class TextStream(StreamBuilder):
    """A test-time stream of local JSONL text tasks (StreamAdapter §6 on a causal LM): each
    segment is one task, its labelled examples arrive in mini-batches, nobody says when the
    task changes; `order` may repeat a task (fresh examples while the task has them).

    A sample is one example packed as a row of token ids (`pack_example`, padded with `PAD`),
    `y` the index of its answer option; `n_classes` is the most options of any task. Each task
    keeps `n_test` held-out examples for the accuracy matrix.

    Args:
        model_path: the local model folder whose tokenizer encodes the text.
        tasks_dir, tasks: the `<task>.jsonl` files and the task names (segment ids).
        order: indices into `tasks`, one per segment (default: each task once).
        examples_per_segment, batch_size, n_test: examples per occurrence, per `observe`,
            held out per task.
        template: the prompt template (Stage B's, for the adapter it trained).
        seed: which examples go where.
    """

    kind = "text"

    def __init__(
        self, *, model_path: str, tasks_dir: str, tasks: Sequence[str],
        order: list[int] | None = None, examples_per_segment: int = 16, batch_size: int = 4,
        n_test: int = 16, template: str = DEFAULT_TEMPLATE, seed: int | None = None,
    ) -> None:
        for name, val in (("examples_per_segment", examples_per_segment),
                          ("batch_size", batch_size), ("n_test", n_test)):
            require_positive(name, val)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks: name at least one task")
        self.order = list(range(len(self.tasks))) if order is None else [int(o) for o in order]
        if not self.order or any(not 0 <= o < len(self.tasks) for o in self.order):
            raise ValueError(f"order: task indices must be in [0, {len(self.tasks)}), "
                             f"got {order!r}")
        PromptFormat(None, template)  # refuse a bad template before loading anything
        self.model_path, self.tasks_dir, self.template = model_path, tasks_dir, template
        self.per, self.batch_size, self.n_test = examples_per_segment, batch_size, n_test
        self.seed = 0 if seed is None else int(seed)  # the CLI fills it from seed_everything

    def params(self) -> dict[str, Any]:
        return {"model_path": os.path.abspath(self.model_path), "tasks": self.tasks,
                "order": self.order, "examples_per_segment": self.per,
                "batch_size": self.batch_size, "n_test": self.n_test,
                "template": self.template, "seed": self.seed}

    def build(self) -> Stream:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        fmt = PromptFormat(tok, self.template)
        used = sorted(set(self.order))
        data = {t: load_task(self.tasks_dir, self.tasks[t]) for t in used}
        train: dict[int, list[list[int]]] = {}
        labels: dict[int, list[int]] = {}
        tests: dict[int, tuple[list[list[int]], list[int]]] = {}
        for t in used:
            ex = data[t]
            if len(ex) <= self.n_test:
                raise ValueError(f"n_test: task {self.tasks[t]!r} has {len(ex)} examples, "
                                 f"keep fewer than that for testing")
            perm = rng(self.seed, Purpose.ICL_EVAL, zlib.crc32(self.tasks[t].encode())
                       ).permutation(len(ex))
            test, pool = perm[:self.n_test], perm[self.n_test:]
            need = self.order.count(t) * self.per  # occurrences draw in turn, cycling the pool
            picks = [int(pool[i % len(pool)]) for i in range(need)]
            train[t] = [pack_example(fmt, ex[i]) for i in picks]
            labels[t] = [ex[i].answer for i in picks]
            tests[t] = ([pack_example(fmt, ex[int(i)]) for i in test],
                        [ex[int(i)].answer for i in test])
        rows = [r for t in used for r in train[t] + tests[t][0]]
        width = max(len(r) for r in rows)
        seen: dict[int, int] = {}
        xs, ys = [], []
        for t in self.order:
            j = seen.get(t, 0)
            seen[t] = j + 1
            xs += train[t][j * self.per:(j + 1) * self.per]
            ys += labels[t][j * self.per:(j + 1) * self.per]
        x = pad_rows(xs, PAD, width)[0]
        test_sets = {t: (pad_rows(tests[t][0], PAD, width)[0], torch.tensor(tests[t][1]))
                     for t in used}
        n_occ = len(self.order)
        segments = tuple(Segment(t, self.tasks[t], "text", {"task": self.tasks[t]},
                                 self.per * self.order.count(t), self.n_test) for t in used)
        params = self.params()
        return Stream(
            name="text_" + "_".join(self.tasks[t] for t in used)[:64], kind=self.kind, x=x,
            y=torch.tensor(ys, dtype=torch.long),
            segment_ids=torch.from_numpy(np.repeat(np.asarray(self.order, np.int64), self.per)),
            segments=segments, test_sets=test_sets, batch_size=self.batch_size,
            n_classes=max(len(e.options) for t in used for e in data[t]),
            eval_positions=tuple(self.per * (i + 1) for i in range(n_occ)),
            row_segments=tuple(self.order), first_rows=tuple(self.order.index(t) for t in used),
            true_shifts=tuple(self.per * i for i in range(1, n_occ)
                              if self.order[i] != self.order[i - 1]),
            seed=self.seed, split_seed=self.seed, params=params,
            source_fingerprint="text:" + digest(x.numpy(), *(
                s.numpy() for t in used for s in test_sets[t])),
            order_digest="",
        )
