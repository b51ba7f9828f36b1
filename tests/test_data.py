"""Tests for megaspec.train.data and the embedded default in megaspec.train.embedded."""

import json
from itertools import islice
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from megaspec.train.data import (
    IGNORE,
    BlockDataset,
    DataConfig,
    DataError,
    batch_iterator,
    build_datasets,
    load_records,
    load_tokenizer,
    pack_examples,
    pad_examples,
    split_indices,
)
from megaspec.train.embedded import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    embedded_corpus,
    embedded_instructions,
    embedded_tokenizer,
    tiny_llama_config,
)

# (input_ids, labels): a text record, an instruction record with a 7-token masked prompt, a text record.
EXAMPLES = [
    ([1, 10, 11, 2], [1, 10, 11, 2]),
    ([1, 20, 21, 22, 23, 24, 25, 30, 2], [IGNORE] * 7 + [30, 2]),
    ([1, 40, 41, 42, 2], [1, 40, 41, 42, 2]),
]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pack_examples_matches_hand_computation():
    # 18 tokens in blocks of 4: [1 10 11 2] [1 20 21 22] [23 24 25 30] [2 1 40 41] [42 2 pad pad];
    # block 1 has no label and is dropped.
    blocks = pack_examples(EXAMPLES, seq_len=4, pad_id=0)
    assert blocks.input_ids.tolist() == [[1, 10, 11, 2], [23, 24, 25, 30], [2, 1, 40, 41], [42, 2, 0, 0]]
    assert blocks.labels.tolist() == [
        [1, 10, 11, 2],
        [-100, -100, -100, 30],
        [2, 1, 40, 41],
        [42, 2, -100, -100],
    ]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_pack_drops_block_whose_only_label_is_at_position_zero():
    # [1 10 11] [2 pad pad]: the second block's label 2 is never a target after the causal shift.
    blocks = pack_examples(EXAMPLES[:1], seq_len=3, pad_id=0)
    assert blocks.input_ids.tolist() == [[1, 10, 11]]


def test_pad_examples_matches_hand_computation():
    # The instruction record truncated to 6 tokens keeps only prompt: dropped.
    blocks = pad_examples(EXAMPLES, seq_len=6, pad_id=0)
    assert blocks.input_ids.tolist() == [[1, 10, 11, 2, 0, 0], [1, 40, 41, 42, 2, 0]]
    assert blocks.labels.tolist() == [[1, 10, 11, 2, -100, -100], [1, 40, 41, 42, 2, -100]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]


def test_txt_file_packs_into_hand_counted_blocks(tmp_path, tok):
    lines = [
        "the sky is blue.",
        "1 plus 2 is 3.",
        "",
        "count from 4: 4 5 6 7 8.",
        "say cat 2 times: cat cat.",
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    assert load_records(str(path)).column_names == ["text"]
    train, evals = build_datasets(DataConfig(dataset=str(path), seq_len=8, eval_fraction=0.0, seed=5), tok)
    docs = [line for line in lines if line]  # the blank line is filtered out
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(5)).tolist()
    stream = [t for i in order for t in [BOS_ID, *_ids(tok, docs[i]), EOS_ID]]
    n_blocks = -(-len(stream) // 8)
    expected = torch.tensor(stream + [PAD_ID] * (n_blocks * 8 - len(stream))).view(n_blocks, 8)
    if len(stream) % 8 == 1:  # a lone final token is no target: that block is dropped
        expected = expected[:-1]
    assert len(evals) == 0
    assert torch.equal(train.input_ids, expected)
    assert torch.equal(train.labels, expected.masked_fill(expected == PAD_ID, IGNORE))
    assert torch.equal(train.attention_mask, (expected != PAD_ID).long())


def test_instruction_masking_masks_exactly_the_prompt(tmp_path, tok):
    records = embedded_instructions(6, seed=1)
    path = _write_jsonl(tmp_path / "inst.jsonl", records)
    cfg = DataConfig(dataset=str(path), seq_len=32, eval_fraction=0.0, packing="none")
    train, _ = build_datasets(cfg, tok)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    assert len(train) == 6
    for row, i in enumerate(order):
        p, r = _ids(tok, records[i]["prompt"]), _ids(tok, records[i]["response"])
        n = 1 + len(p) + len(r) + 1
        assert train.input_ids[row, :n].tolist() == [BOS_ID, *p, *r, EOS_ID]
        assert train.labels[row].tolist() == [IGNORE] * (1 + len(p)) + r + [EOS_ID] + [IGNORE] * (32 - n)
        assert train.attention_mask[row].sum().item() == n


def test_alpaca_fields_map_to_prompt_and_response(tmp_path, tok):
    records = [
        {"instruction": "add 1 and 2", "input": "", "output": "3"},
        {"instruction": "reverse", "input": "abc", "output": "cba"},
    ]
    path = _write_jsonl(tmp_path / "alpaca.jsonl", records)
    train, _ = build_datasets(DataConfig(dataset=str(path), seq_len=64, eval_fraction=0.0, packing="none"), tok)
    prompts = sorted(
        tok.decode(row[(lab == IGNORE) & (mask == 1)][1:])
        for row, lab, mask in zip(train.input_ids, train.labels, train.attention_mask, strict=True)
    )
    assert prompts == [
        "### Instruction:\nadd 1 and 2\n\n### Response:\n",
        "### Instruction:\nreverse\n\n### Input:\nabc\n\n### Response:\n",
    ]


def test_split_is_deterministic_and_disjoint(tok):
    train, evals = split_indices(100, 0.1, seed=3)
    assert (train, evals) == split_indices(100, 0.1, seed=3)
    assert len(evals) == 10 and sorted(train + evals) == list(range(100))
    assert split_indices(100, 0.1, seed=4)[1] != evals
    assert len(split_indices(10, 0.001, seed=0)[1]) == 1  # at least one eval record
    cfg = DataConfig(seq_len=32, embedded_records=200, seed=3)
    a, b = build_datasets(cfg, tok), build_datasets(cfg, tok)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert len(a[1]) >= 1


def _rows(n: int) -> BlockDataset:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 3)
    return BlockDataset(ids, ids.clone(), torch.ones_like(ids))


def test_batch_stream_is_seeded_epoch_permutations():
    batches = list(islice(batch_iterator(_rows(10), 4, seed=7), 5))  # 20 items = exactly 2 epochs
    stream = torch.cat([b["input_ids"][:, 0] for b in batches]).tolist()
    perm = [torch.randperm(10, generator=torch.Generator().manual_seed(7 + e)).tolist() for e in (0, 1)]
    assert stream == perm[0] + perm[1]


def test_one_process_equals_two_ranks():
    ds = _rows(10)
    single = islice(batch_iterator(ds, 4, seed=1), 7)
    rank0 = batch_iterator(ds, 2, seed=1, rank=0, world_size=2)
    rank1 = batch_iterator(ds, 2, seed=1, rank=1, world_size=2)
    for whole, r0, r1 in zip(single, rank0, rank1, strict=False):  # the rank iterators are endless
        for key in whole:
            assert torch.equal(whole[key], torch.cat([r0[key], r1[key]]))


def test_resume_at_start_step_equals_skipping():
    ds = _rows(7)
    full = list(islice(batch_iterator(ds, 3, seed=2, rank=1, world_size=2), 9))
    resumed = list(islice(batch_iterator(ds, 3, seed=2, rank=1, world_size=2, start_step=4), 5))
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_sentencepiece_model_loads_and_round_trips(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(embedded_corpus(300, seed=0)),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,  # as in LLaMA's tokenizer.model
        minloglevel=2,
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = "after b come c d e f. 12 plus 30 is 42. héllo wörld ✓"
    for source in (folder, tmp_path / "sp.model"):
        tok = load_tokenizer(str(source))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            sp.bos_id(),
            sp.eos_id(),
            sp.eos_id(),
        )
    train, evals = build_datasets(DataConfig(seq_len=16, embedded_records=50), tok)
    assert len(train) > 0 and len(evals) > 0 and train.input_ids.max() < len(tok)


def test_unigram_sentencepiece_is_refused(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(embedded_corpus(100, seed=0)),
        model_prefix=str(tmp_path / "uni"),
        vocab_size=60,
        model_type="unigram",
        minloglevel=2,
    )
    with pytest.raises(DataError, match="UNIGRAM"):
        load_tokenizer(str(tmp_path / "uni.model"))


def test_jsonl_instruction_file_loads(tmp_path):
    path = _write_jsonl(tmp_path / "inst.jsonl", embedded_instructions(5, seed=0))
    ds = load_records(str(path))
    assert sorted(ds.column_names) == ["prompt", "response"] and len(ds) == 5


def test_missing_fields_raise_data_error_naming_them(tmp_path, tok):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"has fields \['answer', 'question'\]"):
        build_datasets(DataConfig(dataset=str(path)), tok)


def test_other_data_errors(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(dataset=str(tmp_path / "nope.jsonl")), tok)
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}] * 3)
    with pytest.raises(DataError, match="no record with non-empty 'text'"):
        build_datasets(DataConfig(dataset=str(blank)), tok)
    long_prompt = _write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "1 2 3 4 5 6 7 8 9", "response": "x"}] * 4
    )
    with pytest.raises(DataError, match="empty after tokenising"):
        build_datasets(DataConfig(dataset=str(long_prompt), seq_len=4, packing="none"), tok)
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_embedded_tokenizer_is_deterministic_and_saveable(tmp_path, tok):
    again = embedded_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    text = embedded_corpus(1, seed=9)[0] + " héllo ✓"
    assert tok.decode(_ids(tok, text)) == text
    tok.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"] == [BOS_ID, *_ids(tok, text)]


def test_tiny_model_learns_embedded_corpus(tok):
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok))
    assert cfg.num_key_value_heads * cfg.head_dim == 32 and cfg.hidden_size == 64  # k/v are 64 -> 32
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, _ = build_datasets(DataConfig(seq_len=64, embedded_records=400), tok)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs 10x slower when its threads compete for shared cores
    try:
        for batch in islice(batch_iterator(train, 8, seed=0), 20):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.7 * losses[0]


def test_auto_tokenizer_folder_without_pad_falls_back_to_eos(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None
    assert load_tokenizer(str(tmp_path)).pad_token_id == EOS_ID


def test_eval_dataset_holds_the_eval_records_and_every_dataset_record_trains(tmp_path, tok):
    records = embedded_instructions(12, seed=1)
    train_path = _write_jsonl(tmp_path / "train.jsonl", records[:8])
    held_path = _write_jsonl(tmp_path / "held.jsonl", records[8:])
    cfg = DataConfig(dataset=str(train_path), eval_dataset=str(held_path), seq_len=32, packing="none", seed=3)
    train, evals = build_datasets(cfg, tok)
    assert len(train) == 8  # eval_fraction (0.05 by default) holds nothing out of --dataset
    assert len(evals) == 4
    held = [[BOS_ID, *_ids(tok, r["prompt"]), *_ids(tok, r["response"]), EOS_ID] for r in records[8:]]
    rows = [row[row != PAD_ID].tolist() for row in evals.input_ids]
    assert rows == held  # the eval file's records in file order
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist()  # all 8, in the seed's order
    expected = [[BOS_ID, *_ids(tok, records[i]["prompt"]), *_ids(tok, records[i]["response"]), EOS_ID] for i in order]
    assert [row[row != PAD_ID].tolist() for row in train.input_ids] == expected


def test_eval_dataset_in_another_format_is_one_line(tmp_path, tok):
    train_path = _write_jsonl(tmp_path / "train.jsonl", embedded_instructions(4, seed=1))
    held_path = _write_jsonl(tmp_path / "held.jsonl", [{"text": "plain words"}])
    with pytest.raises(DataError, match=r"eval dataset '.*held.jsonl' holds text records but dataset '.*train.jsonl' "
                                        r"holds instruction records"):
        build_datasets(DataConfig(dataset=str(train_path), eval_dataset=str(held_path), seq_len=32), tok)


def test_split_seed_fixes_the_eval_records_across_seeds(tmp_path, tok):
    path = _write_jsonl(tmp_path / "inst.jsonl", embedded_instructions(40, seed=1))

    def eval_rows(seed: int, split_seed: int | None) -> list[list[int]]:
        cfg = DataConfig(dataset=str(path), seq_len=32, packing="none", eval_fraction=0.25, seed=seed, split_seed=split_seed)
        _, evals = build_datasets(cfg, tok)
        return sorted(evals.input_ids.tolist())

    assert eval_rows(1, None) != eval_rows(2, None)  # by default --seed draws the split (as before)
    assert eval_rows(1, 7) == eval_rows(2, 7)
    assert eval_rows(1, 1) == eval_rows(1, None)  # split_seed None is --seed
