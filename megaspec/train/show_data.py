"""`launch/train.py --show_data N`: the first training examples as the model sees them, trained tokens marked."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from transformers import PreTrainedTokenizerBase

from megaspec.train.data import IGNORE, DataConfig, Example, build_examples

ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def mark_example(example: Example, tokenizer: PreTrainedTokenizerBase, colour: bool) -> str:
    """The example's text with its trained tokens (label != -100) in green, or in [[...]] without colour."""
    ids, labels = example
    out = []
    for trained, run in groupby(zip(ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
        out.append((f"{ANSI_TRAINED}{text}{ANSI_RESET}" if colour else f"[[{text}]]") if trained else text)
    return "".join(out)


def show_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, colour: bool) -> str:
    """Each example under a header line giving its token and trained-token counts."""
    blocks = []
    for i, example in enumerate(examples, start=1):
        trained = sum(label != IGNORE for label in example[1])
        blocks.append(f"--- example {i}: {len(example[0])} tokens, {trained} trained\n{mark_example(example, tokenizer, colour)}")
    return "\n".join(blocks)


def show_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, n: int, colour: bool) -> str:
    """The first n training examples (the train split's order, before packing), formatted and marked."""
    train, _, name = build_examples(cfg, tokenizer)
    legend = "green" if colour else "[[...]]"
    head = (f"{name}: first {min(n, len(train))} of {len(train)} training examples, packing {cfg.packing}, "
            f"seq_len {cfg.seq_len}; trained tokens in {legend}")
    return head + "\n" + show_examples(train[:n], tokenizer, colour)
