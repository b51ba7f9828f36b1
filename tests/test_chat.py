"""Chat data (megaspec.train.chat), isolated packing and --show_data, each against a hand-built oracle."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from megaspec.train.chat import ChatError, render_spans, to_messages
from megaspec.train.data import (
    IGNORE,
    DataConfig,
    DataError,
    build_datasets,
    build_examples,
    collate,
    document_positions,
    pack_examples,
)
from megaspec.train.embedded import embedded_tokenizer, tiny_llama_config
from megaspec.train.show_data import show_examples

# SmolLM2-Instruct's template without its default system prompt: plain ChatML
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# renders the last assistant turn differently from earlier ones, as templates that drop old reasoning do
UNSTABLE = ("{% for m in messages %}{% if loop.last %}{{ '<L>' }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat"},
    {"role": "assistant", "content": "the dog ran"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "it sat"},
]


@pytest.fixture(scope="module")
def chatml_tok():
    """The embedded tokenizer with ChatML's two special tokens and template."""
    tok = embedded_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and template when its GGUF has been converted (python -m megaspec.assets smollm2)."""
    from megaspec.train.data import load_tokenizer

    folders = sorted((Path.home() / ".cache" / "megaspec" / "gguf").glob("SmolLM2-135M-Instruct*/"))
    if not folders or not (folders[0] / "tokenizer.json").exists():
        pytest.skip("SmolLM2 not converted (python -m megaspec.assets smollm2)")
    return load_tokenizer(str(folders[0]))


def hand_masked(tok, messages: list[dict], header: str = "") -> tuple[list[int], list[int]]:
    """ChatML by hand: every piece tokenized alone; an assistant turn's content and end-of-turn trained, the rest not."""
    ids, labels = [], []

    def add(text: str, trained: bool) -> None:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))

    if header:
        add(header, False)
    for m in messages:
        add(f"<|im_start|>{m['role']}\n", False)
        add(f"{m['content']}<|im_end|>\n", m["role"] == "assistant")
    return ids, labels


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_assistant_turn_is_trained_and_nothing_else(tmp_path, chatml_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), _, _ = build_examples(DataConfig(dataset=str(path), eval_fraction=0.0, chat_template="auto"), chatml_tok)
    ids, labels = hand_masked(chatml_tok, CONVERSATION)
    assert example == (ids, labels)
    assert sum(label != IGNORE for label in labels) == len(chatml_tok("the dog ran<|im_end|>\nit sat<|im_end|>\n",
                                                                        add_special_tokens=False)["input_ids"])


def test_sharegpt_conversations_equal_messages(tmp_path, chatml_tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    path = write_jsonl(tmp_path / "share.jsonl", [{"conversations": sharegpt}])
    (example,), _, _ = build_examples(DataConfig(dataset=str(path), eval_fraction=0.0, chat_template="auto"), chatml_tok)
    assert example == hand_masked(chatml_tok, CONVERSATION)


def test_prompt_response_uses_the_template_unless_none(tmp_path, chatml_tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the cat", "response": "sat"}])
    cfg = DataConfig(dataset=str(path), eval_fraction=0.0, chat_template="auto")
    (example,), _, _ = build_examples(cfg, chatml_tok)
    assert example == hand_masked(chatml_tok, [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}])
    cfg.chat_template = "none"
    (plain,), _, _ = build_examples(cfg, chatml_tok)
    prompt = [chatml_tok.bos_token_id] + chatml_tok("the cat", add_special_tokens=False)["input_ids"]
    assert plain[1] == [IGNORE] * len(prompt) + chatml_tok("sat", add_special_tokens=False)["input_ids"] + [chatml_tok.eos_token_id]


def test_template_file_is_used(tmp_path, chatml_tok):
    tok = embedded_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert not tok.chat_template
    (tmp_path / "chatml.jinja").write_text(CHATML)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), _, _ = build_examples(
        DataConfig(dataset=str(path), eval_fraction=0.0, chat_template=str(tmp_path / "chatml.jinja")), tok)
    assert example == hand_masked(tok, CONVERSATION)
    with pytest.raises(DataError, match="has no chat template; pass --chat_template FILE.jinja"):
        build_examples(DataConfig(dataset=str(path), eval_fraction=0.0, chat_template="auto"), tok)


def test_smollm2_template_masks_like_the_oracle(tmp_path):
    tok = smollm2_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:]}, {"messages": CONVERSATION}])
    examples, _, _ = build_examples(DataConfig(dataset=str(path), eval_fraction=0.0, chat_template="auto"), tok)
    default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    oracle = [hand_masked(tok, CONVERSATION[1:], header=default_system), hand_masked(tok, CONVERSATION)]
    assert sorted(examples) == sorted(oracle)


def test_malformed_chats_and_unstable_templates_fail_in_one_line(chatml_tok):
    with pytest.raises(ChatError, match="no assistant turn"):
        to_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatError, match="turn 2 has no 'role'"):
        to_messages([{"role": "user", "content": "hi"}, {"content": "x"}])
    with pytest.raises(ChatError, match="not prefix-stable at turn 2"):
        render_spans(CONVERSATION[1:], chatml_tok, UNSTABLE)
    with pytest.raises(ChatError, match="failed to render"):
        render_spans(CONVERSATION, chatml_tok, "{{ raise_exception('system turns are not supported') }}")


# --- isolated packing ----------------------------------------------------------------------------
def test_document_positions_restart_at_documents_blocks_and_padding():
    # lengths 3, 4, 2 and 3 pads in blocks of 4: [a a a b] [b b b c] [c p p p]; a block-spanning tail and the padding restart
    assert document_positions([3, 4, 2], 3, 4).tolist() == [[0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 1, 2]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_isolated_packed_losses_equal_each_document_alone(attn):
    """A packed block's per-token losses are each document's losses computed alone (fp32); naive packing's are not."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64)).eval()
    model.config._attn_implementation = attn
    model.config.use_cache = False  # as the loop sets it: transformers reads packed positions only without a cache
    docs = [torch.randint(3, 64, (n,)).tolist() for n in (5, 9, 3, 7)]
    examples = [(d, d) for d in docs]  # 24 tokens: one block of 24
    losses = {}
    for isolate in (True, False):
        blocks = pack_examples(examples, seq_len=24, pad_id=0, isolate=isolate)
        batch = collate([blocks[0]])
        assert ("position_ids" in batch) == isolate and ("attention_mask" in batch) != isolate
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[0]
        losses[isolate] = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], reduction="none")
    start = 0
    for d in docs:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([d])).logits[0]
        expected = torch.nn.functional.cross_entropy(alone[:-1], torch.tensor(d[1:]), reduction="none")
        torch.testing.assert_close(losses[True][start : start + len(d) - 1], expected, rtol=1e-5, atol=1e-5)
        if start:  # a later document in a naive block attends to the ones before it
            assert (losses[False][start : start + len(d) - 1] - expected).abs().max() > 1e-3
        start += len(d)


def test_isolated_blocks_flow_through_build_datasets(tmp_path, chatml_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 6)
    train, _ = build_datasets(DataConfig(dataset=str(path), seq_len=32, eval_fraction=0.0, packing="isolated",
                                         chat_template="auto"), chatml_tok)
    ids, labels = hand_masked(chatml_tok, CONVERSATION)
    length = len(ids)
    positions, position = [], 0  # by hand: count within the conversation, restart at a new one or a new block
    for i in range(6 * length):
        position = 0 if i % length == 0 or i % 32 == 0 else position + 1
        positions.append(position)
    pad = -len(positions) % 32
    positions += list(range(pad))  # the padding of the last block: one more document
    labels = labels * 6 + [IGNORE] * pad
    kept = [b for b in range(len(positions) // 32) if any(x != IGNORE for x in labels[b * 32 + 1 : b * 32 + 32])]
    assert train.position_ids.tolist() == [positions[b * 32 : b * 32 + 32] for b in kept]
    assert len(kept) < len(positions) // 32  # some blocks hold only prompt tokens and are dropped


# --- --show_data ---------------------------------------------------------------------------------
def test_show_data_brackets_exactly_the_trained_tokens(chatml_tok):
    ids, labels = hand_masked(chatml_tok, CONVERSATION[1:3])
    shown = show_examples([(ids, labels)], chatml_tok, colour=False)
    assert shown.splitlines()[0] == f"--- example 1: {len(ids)} tokens, {sum(x != IGNORE for x in labels)} trained"
    assert "[[the dog ran<|im_end|>\n]]" in shown and shown.count("[[") == 1
    coloured = show_examples([(ids, labels)], chatml_tok, colour=True)
    assert "\x1b[1;32mthe dog ran<|im_end|>\n\x1b[0m" in coloured


def test_show_data_prints_the_first_examples_and_starts_nothing(tmp_path, capsys):
    import torch.distributed as torch_dist

    from tests.test_bad_inputs import script

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    out = tmp_path / "runs" / "out"
    joined_before = torch_dist.is_initialized()  # another in-process test's group is not this test's concern
    code = script("train").main(["--dataset", str(path), "--chat_template", str(tmp_path / "chatml.jinja"),
                                 "--show_data", "3", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists() and torch_dist.is_initialized() == joined_before
    shown = [line for line in printed.splitlines() if line.startswith("--- example")]
    assert len(shown) == 3
    # one bracketed span per example: the answer with its end of turn, nothing of the prompt
    spans = re.findall(r"\[\[(.*?)\]\]", printed.split("\n", 1)[1], flags=re.S)
    assert len(spans) == 3 and all(re.fullmatch(r"a[0-7]<\|im_end\|>\n", span) for span in spans), printed


@pytest.mark.slow
def test_zero3_run_on_isolated_chat_blocks_starts_at_the_plain_model_loss(tmp_path):
    """The engine's first loss (adapters start at zero) is the plain HF model's on the same isolated batch; eval runs."""
    from megaspec.train.config import TrainConfig
    from megaspec.train.data import batch_iterator
    from megaspec.train.embedded import embedded_base, embedded_instructions
    from megaspec.train.loop import data_config, run_tokenizer
    from tests.distributed import REPO
    from tests.launcher import check, metrics, run_train

    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in embedded_instructions(200, seed=4)]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    out = tmp_path / "run"
    check(run_train(["--dataset", str(path), "--chat_template", str(tmp_path / "chatml.jinja"), "--seq_len", "64",
                     "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--max_steps", "4", "--eval_every", "4",
                     "--save_every", "4", "--n_coeffs", "200", "--output_dir", str(out)], ranks=1))
    records = metrics(out)
    assert records[0]["step"] == 1 and "eval_loss" in records[-1]

    cfg = TrainConfig(dataset=str(path), chat_template=str(tmp_path / "chatml.jinja"), seq_len=64)
    model = LlamaForCausalLM.from_pretrained(str(embedded_base()), dtype=torch.float32)
    model.config.use_cache = False
    first = {}
    for packing in ("isolated", "naive"):
        cfg.packing = packing
        train, _ = build_datasets(data_config(cfg), run_tokenizer(cfg))
        with torch.no_grad():
            first[packing] = float(model(**next(batch_iterator(train, 4, cfg.seed))).loss)
    assert records[0]["loss"] == pytest.approx(first["isolated"], rel=1e-4)
    assert abs(first["naive"] - first["isolated"]) > 1e-3


def test_generate_prompts_as_the_templated_records_trained(chatml_tok):
    """complete() with a template feeds the user turn and the assistant header: the prompt of a trained chat's reply."""
    from megaspec.export.generate import complete

    torch.manual_seed(0)
    config = tiny_llama_config(len(chatml_tok))
    model = LlamaForCausalLM(config).eval()
    prompt = [{"role": "user", "content": "the cat"}]
    text, (span,) = render_spans([*prompt, {"role": "assistant", "content": "x"}], chatml_tok, CHATML)
    ids = torch.tensor([chatml_tok(text[: span[0]], add_special_tokens=False)["input_ids"]])  # oracle: up to the reply
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              pad_token_id=chatml_tok.pad_token_id, eos_token_id=chatml_tok.eos_token_id)
    got = complete(model, chatml_tok, "the cat", max_new_tokens=4, greedy=True, template=CHATML)
    assert got == chatml_tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    untemplated = complete(model, chatml_tok, "the cat", max_new_tokens=4, greedy=True)
    bos_ids = torch.tensor([[chatml_tok.bos_token_id, *chatml_tok("the cat", add_special_tokens=False)["input_ids"]]])
    plain = model.generate(input_ids=bos_ids, attention_mask=torch.ones_like(bos_ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=chatml_tok.pad_token_id, eos_token_id=chatml_tok.eos_token_id)
    assert untemplated == chatml_tok.decode(plain[0, bos_ids.shape[1]:], skip_special_tokens=True)
