"""Text tasks for a Hugging Face causal LM: local JSONL files, a prompt template, option scoring.

A task is one JSONL file, `<tasks_dir>/<name>.jsonl`, one example a line:
`{"input": "…", "options": ["…", "…"], "answer": 0}`. A demonstration is the template filled
with the input and the right option; a query is the template up to `{output}`, and its answer
is the option with the highest summed log-likelihood as a continuation (option scoring, as
in the evaluation of the StreamAdapter paper's classification tasks). Episodes (k demos and q
queries of one task) are a pure function of (seed, task, k, index), so methods compare on the
same ones. `TextEpisodeDataModule` serves them to a learner (StreamAdapter's Stage B on an LLM,
`strategies/stream_adapter_hf.py`). Needs the `llm` extra (`transformers`) for the tokenizer.
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


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real positions."""
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
