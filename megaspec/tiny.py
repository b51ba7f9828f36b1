"""The embedded default: a tiny LLaMA config, a generated corpus and a tokenizer trained on it in code."""

import random
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

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
