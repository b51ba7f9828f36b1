"""The embedded default: a tiny LLaMA, a generated corpus and instruction task, a tokenizer trained on
them in code, and the tiny LLaMA pretrained on that corpus (built once and cached).

Fine-tuning a randomly initialised model says little about an adapter, so the default job first
pretrains the tiny model (plain PyTorch, one thread, fixed seed: the same bytes on every machine)
on the embedded corpus and then fine-tunes it on the shifted embedded instruction task. Nothing is
read from disk or downloaded.
"""

from __future__ import annotations

import os
import random
import shutil
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from megaspec.distributed.comm import barrier, rank

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # BpeTrainer numbers special tokens first, in the order given
EMBEDDED_VOCAB_SIZE = 512

COLOURS = {
    "the sky": "blue",
    "grass": "green",
    "the sun": "yellow",
    "snow": "white",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "a lemon": "yellow",
    "the sea": "blue",
    "a leaf": "green",
    "milk": "white",
}
WORDS = ["cat", "dog", "tree", "moon", "star", "fish", "bird", "rain", "road", "ship"]
LETTERS = string.ascii_lowercase


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer LLaMA with grouped-query attention (k/v projections are 64 -> 32, non-square)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _sentence(rng: random.Random) -> str:
    """One templated sentence whose ending is predictable from its beginning."""
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a} plus {b} is {a + b}."
    if kind == 1:
        thing = rng.choice(sorted(COLOURS))
        return f"{thing} is {COLOURS[thing]}."
    if kind == 2:
        a = rng.randrange(90)
        return f"count from {a}: " + " ".join(str(i) for i in range(a, a + 5)) + "."
    if kind == 3:
        i = rng.randrange(len(LETTERS) - 4)
        return f"after {LETTERS[i]} come " + " ".join(LETTERS[i + 1 : i + 5]) + "."
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    return f"say {word} {n} times: " + " ".join([word] * n) + "."


def embedded_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic documents of 2-6 templated sentences (arithmetic, colours, counting, letters)."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(n_docs)]


def _question(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of a small instruction task."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"add {a} and {b}", str(a + b)
    if kind == 1:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        return f"reverse: {word}", word[::-1]
    if kind == 2:
        thing = rng.choice(sorted(COLOURS))
        return f"what colour is {thing}?", COLOURS[thing]
    i = rng.randrange(len(LETTERS) - 1)
    return f"next letter after {LETTERS[i]}", LETTERS[i + 1]


def embedded_instructions(n: int = 1000, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic prompt/response records, e.g. 'Q: add 3 and 4\\nA:' -> ' 7'."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question, answer = _question(rng)
        records.append({"prompt": f"Q: {question}\nA:", "response": f" {answer}"})
    return records


def _train_bpe() -> Tokenizer:
    """Byte-level BPE trained on a fixed sample of the embedded data (deterministic, ~50 ms)."""
    texts = embedded_corpus(400, seed=0)
    texts += [r["prompt"] + r["response"] for r in embedded_instructions(400, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # LLaMA tokenizers prepend BOS when add_special_tokens=True; do the same.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def embedded_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded byte-level BPE tokenizer: no files, no downloads, same ids in every process."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(), bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )


# --- the pretrained base -------------------------------------------------------------------------
PRETRAIN_STEPS = 300
PRETRAIN = {"lr": 3e-3, "batch": 16, "seq_len": 128, "seed": 0}
VERSION = "v1"


def cache_root() -> Path:
    """Where built artefacts are cached ($MEGASPEC_CACHE, default ~/.cache/megaspec)."""
    return Path(os.environ.get("MEGASPEC_CACHE", "~/.cache/megaspec")).expanduser()


def pretrain_tiny(out: Path, steps: int = PRETRAIN_STEPS) -> Path:
    """Train the tiny LLaMA on the embedded corpus and save it with its tokenizer (HF format)."""
    from transformers import LlamaForCausalLM

    # imported here: megaspec.train.data reads the embedded corpus and tokenizer from this module
    from megaspec.train.data import DataConfig, batch_iterator, build_datasets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical on every machine regardless of its cores
    try:
        tokenizer = embedded_tokenizer()
        data = DataConfig(dataset=None, seq_len=PRETRAIN["seq_len"], seed=PRETRAIN["seed"], format="text", eval_fraction=0.0)
        train_set, _ = build_datasets(data, tokenizer)
        torch.manual_seed(PRETRAIN["seed"])
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PRETRAIN["lr"], total_steps=steps, pct_start=0.1)
        batches = batch_iterator(train_set, PRETRAIN["batch"], PRETRAIN["seed"])
        model.train()
        for _ in range(steps):
            batch = next(batches)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    return out


def embedded_base() -> Path:
    """The cached pretrained tiny LLaMA folder; rank 0 builds it on first use, the others wait."""
    path = cache_root() / f"tiny-llama-{VERSION}-{PRETRAIN_STEPS}"
    if rank() == 0 and not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pretrain_tiny(path)
    barrier()
    return path
