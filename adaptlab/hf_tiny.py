"""Tiny random-weight Hugging Face models, tokenizer and text tasks, built offline.

For tests and the CPU smoke run of StreamAdapter on an LLM: nothing is downloaded. The
tokenizer is a byte-level BPE trained here on the tasks' own words (so any text encodes); the
models are random `LlamaConfig` (grouped-query attention, rotary positions) or `GPT2Config`
(learned positions, fused `Conv1D` projections) networks written with `save_pretrained`.
The tasks are random word → label maps (`map_<i>`), one JSONL file each
(`adaptlab.hf_text` format). Numbers from these models mean nothing; the path is exercised.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .seeding import seeded

FAMILIES = ("llama", "gpt2")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(g: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(g.choice(list(LETTERS), size=int(g.integers(3, 6))))
        if w not in out:
            out.append(w)
    return out


def make_text_tasks(tasks_dir: str, n_tasks: int = 6, n_examples: int = 48, n_items: int = 12,
                    n_options: int = 2, seed: int = 0) -> list[str]:
    """`map_0 … map_{n−1}`: each a random map of `n_items` words onto `n_options` label words;
    returns the task names."""
    g = np.random.default_rng(seed)
    os.makedirs(tasks_dir, exist_ok=True)
    names = []
    for t in range(n_tasks):
        items, labels = _words(g, n_items), _words(g, n_options)
        table = g.integers(0, n_options, size=n_items)
        name = f"map_{t}"
        with open(os.path.join(tasks_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(n_examples):
                i = int(g.integers(n_items))
                f.write(json.dumps({"input": items[i], "options": labels,
                                    "answer": int(table[i])}) + "\n")
        names.append(name)
    return names


def make_tokenizer(path: str, corpus: list[str], vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer trained on `corpus`, saved with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(path)


def tiny_config(family: str, vocab_size: int, n_positions: int = 256) -> object:
    """A 2-layer, width-32 config: Llama (4 heads, 2 key/value heads) or GPT-2 (4 heads)."""
    from transformers import GPT2Config, LlamaConfig

    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=n_positions, pad_token_id=0,
                           bos_token_id=1, eos_token_id=1)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                          n_positions=n_positions, bos_token_id=1, eos_token_id=1,
                          pad_token_id=0)
    raise ValueError(f"family: {family!r} is not one of {FAMILIES}")


def make_tiny_llm(path: str, family: str = "llama", tasks_dir: str | None = None,
                  seed: int = 0, n_positions: int = 256) -> str:
    """Write a tiny random model and its tokenizer to `path` (trained on the words of the
    tasks in `tasks_dir`, if given); returns `path`."""
    from transformers import AutoModelForCausalLM

    corpus = ["Input: Output: \n\n"]
    if tasks_dir:
        for name in sorted(os.listdir(tasks_dir)):
            with open(os.path.join(tasks_dir, name), encoding="utf-8") as f:
                corpus += [" ".join([r["input"], *r["options"]])
                           for r in map(json.loads, f)]
    make_tokenizer(path, corpus)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(path, local_files_only=True))
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, n_positions))
    model.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m adaptlab.hf_tiny --out artifacts/tiny_llm`: text tasks in `<out>/tasks`,
    a tiny random model in `<out>/<family>`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="artifacts/tiny_llm")
    ap.add_argument("--family", choices=FAMILIES, default="llama")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tasks = os.path.join(args.out, "tasks")
    names = make_text_tasks(tasks, seed=args.seed)
    path = make_tiny_llm(os.path.join(args.out, args.family), args.family, tasks, args.seed)
    print(f"tasks {names} in {tasks}; model in {path}")


if __name__ == "__main__":
    main()
