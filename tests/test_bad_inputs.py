"""Bad input to every tool ends in one line naming the problem and the fix, exit 2, nothing written.

Each row calls a launch script's main(argv) in this process, as its command line would: refused
input returns (or argparse exits) before any model, process group or output folder exists, so a
row costs a fraction of a second. tests/test_reliability.py holds the train rows that need a saved
run or a separate process.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.distributed import REPO

PREFIX = {"train": "train: error: ", "export": "export: error: ", "generate": "generate: error: ", "bench": "bench: error: "}


def script(name: str) -> ModuleType:
    """launch/<name>.py as a module (its main(argv) is the command line)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad command line of one tool and a phrase its single error line must hold."""

    id: str
    tool: str
    args: Callable[[Path], list[str]]  # workspace -> arguments
    expect: str


def run_case(case: Case, ws: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main(argv); argparse's sys.exit counts as the exit code."""
    module = script(case.tool)
    capsys.readouterr()
    try:
        code = module.main(case.args(ws))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(case: Case, code: int, out: str, err: str) -> None:
    report = f"exit {code}\n--- stderr\n{err[-3000:]}\n--- stdout\n{out[-1500:]}"
    assert code == 2, report
    assert len(err.splitlines()) == 1 and err.startswith(PREFIX[case.tool]), report
    assert case.expect in err, report


# --- train -------------------------------------------------------------------------------------
def train(*args: str) -> Callable[[Path], list[str]]:
    """A short train command line writing to the workspace's runs/ folder ('WS' in args is the workspace)."""
    return lambda ws: ["--max_steps", "2", "--eval_every", "0", "--n_coeffs", "200", "--output_dir", str(ws / "runs" / "out"),
                       *(a.replace("WS", str(ws)) for a in args)]


def lines(records: list[object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


GOOD = [{"prompt": f"Q{i}: ", "response": f"A{i}"} for i in range(60)]


def write_train_files(ws: Path) -> None:
    """Datasets, DeepSpeed configs and a GPT-2 folder that the train rows point at."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws.mkdir(parents=True, exist_ok=True)
    (ws / "broken_line.jsonl").write_text(lines(GOOD[:5]) + '{"prompt": "Q", "response": "A"\n' + lines(GOOD[5:]))
    (ws / "binary.jsonl").write_bytes(lines(GOOD[:3]).encode() + b"\x00\x01\x02\xff PK\x03\x04\n")
    (ws / "latin1.jsonl").write_bytes(lines(GOOD[:7]).encode() + '{"prompt": "café? ", "response": "oui"}\n'.encode("latin1"))
    (ws / "late_list.jsonl").write_text(lines(GOOD) + lines([{"prompt": "Q", "response": ["A", "B"]}]))
    (ws / "late_scalar.jsonl").write_text(lines(GOOD[:40]) + "[1, 2]\n")
    chat = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in range(5)]
    (ws / "empty.jsonl").write_text("")
    (ws / "blank.jsonl").write_text("\n  \n")
    (ws / "blank.txt").write_text("\n\n")
    (ws / "no_fields.jsonl").write_text(lines([{"question": "Q", "answer": "A"}]))
    (ws / "late_no_fields.jsonl").write_text(lines(GOOD[:4] + [{"question": "Q", "answer": "A"}]))
    (ws / "no_assistant.jsonl").write_text(lines(chat[:2] + [{"messages": [{"role": "user", "content": "Q"}]}]))
    (ws / "chat.jsonl").write_text(lines(chat))
    (ws / "latin1_chat.jsonl").write_bytes(lines(chat[:2]).encode() + '{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin1"))
    (ws / "raises.jinja").write_text("{% if messages | length > 1 %}{{ raise_exception('roles must alternate') }}{% endif %}")
    (ws / "array.json").write_text('[\n  {"text": "a"},\n  {"text": "b",\n]\n')
    (ws / "extra_field.csv").write_text("prompt,response\nQ1,A1\nQ2,A2,surplus\n")
    pq.write_table(pa.table({"text": [["a"], ["b"]]}), ws / "list_text.parquet")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(100)]}), ws / "cut.parquet")
    (ws / "cut.parquet").write_bytes((ws / "cut.parquet").read_bytes()[:-40])
    datasets.Dataset.from_dict({"prompt": ["Q"] * 4, "response": [[1, 2]] * 4}).save_to_disk(str(ws / "saved"))
    good = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    for name, change in {
        "micro_four.json": lambda c: c.update(train_micro_batch_size_per_gpu="four"),
        "accum_zero.json": lambda c: c.update(gradient_accumulation_steps=0),
        "clip_text.json": lambda c: c.update(gradient_clipping="1.0"),
        "lr_text.json": lambda c: c["optimizer"]["params"].update(lr="fast"),
        "betas.json": lambda c: c["optimizer"]["params"].update(betas=[0.9, 1.5]),
        "warmup_text.json": lambda c: c["scheduler"]["params"].update(warmup_num_steps="ten"),
        "bf16_yes.json": lambda c: c.update(bf16={"enabled": "yes"}),
    }.items():
        config = json.loads(json.dumps(good))
        change(config)
        (ws / name).write_text(json.dumps(config))
    (ws / "gpt2").mkdir()  # config.json only: the architecture is refused before any weight or tokenizer is read
    (ws / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    (ws / "bad_config").mkdir()
    (ws / "bad_config" / "config.json").write_text('{"model_type": "llama",')
    (ws / "text.gguf").write_text("not a model\n")
    (ws / "gpt2.gguf").write_bytes(gguf_header("gpt2"))
    (ws / "cut.gguf").write_bytes(gguf_header("llama")[:30])
    (ws / "folder.gguf").mkdir()
    for name, text in {"typo.yaml": "max_steps: 2\nn_coef: 300\n", "nested_typo.yaml": "adapter:\n  methd: ssh\n",
                       "steps_text.yaml": "max_steps: ten\n", "list_text.yaml": "target_modules: [1, 2]\n",
                       "choice.yaml": "quantize: nf5\n", "broken.yaml": "max_steps: [2\n", "list.yaml": "- max_steps\n",
                       "seed_under_adapter.yaml": "adapter: {seed: 3}\n", "twice.yaml": "n_coeffs: 5\nadapter: {n_coeffs: 6}\n",
                       "broken.json": '{"max_steps": 2,}'}.items():
        (ws / name).write_text(text)


def gguf_header(architecture: str) -> bytes:
    """The first bytes of a GGUF v3 file: magic, version, no tensors, one key (general.architecture)."""
    import struct

    key, value = b"general.architecture", architecture.encode()
    return (struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 8)
            + struct.pack("<Q", len(value)) + value)


TRAIN = [
    Case("scale_nan", "train", train("--scale", "nan"), "--scale nan must be a finite number above 0"),
    Case("scale_inf", "train", train("--scale", "inf"), "--scale inf must be a finite number above 0"),
    Case("scale_zero", "train", train("--scale", "0"), "--scale 0.0 must be a finite number above 0"),
    Case("scale_negative", "train", train("--scale", "-49"), "--scale -49.0 must be"),
    Case("lr_inf", "train", train("--lr", "inf"), "--lr inf must be a finite number above 0"),
    Case("lr_nan", "train", train("--lr", "nan"), "--lr nan must be"),
    Case("lr_zero", "train", train("--lr", "0"), "--lr 0.0 must be"),
    Case("lr_negative", "train", train("--lr=-1e-3"), "--lr -0.001 must be"),
    Case("halt_at_step_zero", "train", train("--halt_at_step", "0"), "--halt_at_step 0 must be at least 1"),
    Case("halt_at_step_negative", "train", train("--halt_at_step", "-3"), "--halt_at_step -3 must be at least 1"),
    Case("alpha_zero", "train", train("--method", "lora", "--alpha", "0"), "--alpha 0.0 must be a finite number above 0"),
    Case("alpha_nan", "train", train("--alpha", "nan"), "--alpha nan must be"),
    Case("rank_zero", "train", train("--method", "lora", "--lora_rank", "0"), "--lora_rank 0 must be at least 1"),
    Case("s2ft_steps_zero", "train", train("--method", "s2ft", "--s2ft_estimate_steps", "0"), "--s2ft_estimate_steps 0 must be at least 1"),
    Case("energy_ratio_nan", "train", train("--energy_ratio", "nan"), "--energy_ratio nan must be within [0, 1]"),
    Case("energy_ratio_above_one", "train", train("--energy_ratio", "1.5"), "--energy_ratio 1.5 must be within [0, 1]"),
    Case("seq_len_one", "train", train("--seq_len", "1"), "--seq_len 1"),
    Case("save_every_zero", "train", train("--save_every", "0"), "--save_every 0 must be at least 1"),
    Case("quantize_typo", "train", train("--quantize", "nf5"), "argument --quantize: invalid choice: 'nf5'"),
    Case("selection_typo", "train", train("--selection", "globl"), "argument --selection: invalid choice: 'globl'"),
    Case("max_steps_not_a_number", "train", train("--max_steps", "ten"), "argument --max_steps: invalid int value: 'ten'"),
    Case("unknown_flag", "train", train("--ncoeffs", "5"), "unrecognized arguments: --ncoeffs 5; did you mean --n_coeffs?"),
    Case("abbreviated_flag", "train", train("--max_step", "3"), "unrecognized arguments: --max_step 3; did you mean --max_steps?"),
    Case("config_unknown_key", "train", train("--config", "WS/typo.yaml"), "/typo.yaml; did you mean 'n_coeffs'?"),
    Case("config_unknown_nested_key", "train", train("--config", "WS/nested_typo.yaml"), "/nested_typo.yaml; did you mean 'method'?"),
    Case("config_string_for_int", "train", train("--config", "WS/steps_text.yaml"), "steps_text.yaml: 'max_steps' must be a whole number, not 'ten' (str)"),
    Case("config_numbers_for_names", "train", train("--config", "WS/list_text.yaml"), "'target_modules' must be a list of strings, not [1, 2]"),
    Case("config_bad_choice", "train", train("--config", "WS/choice.yaml"), "choice.yaml: 'quantize' is 'nf5'; choose one of none, nf4"),
    Case("config_broken_yaml", "train", train("--config", "WS/broken.yaml"), "broken.yaml is not valid YAML (line 2:"),
    Case("config_broken_json", "train", train("--config", "WS/broken.json"), "broken.json is not valid JSON (line 1:"),
    Case("config_not_a_mapping", "train", train("--config", "WS/list.yaml"), "list.yaml holds a list, not a mapping of option: value"),
    Case("config_missing", "train", train("--config", "WS/none.yaml"), "/none.yaml does not exist; pass a YAML or JSON file"),
    Case("config_adapter_seed", "train", train("--config", "WS/seed_under_adapter.yaml"), "'seed' under 'adapter' is the top-level 'seed'"),
    Case("config_set_twice", "train", train("--config", "WS/twice.yaml"), "'n_coeffs' is set twice"),
    Case("data_cache_not_writable", "train", train("--data_cache", "WS/text.gguf/tokenized"), "/text.gguf/tokenized cannot be written"),
    Case("dataset_broken_line", "train", train("--dataset", "WS/broken_line.jsonl"), "broken_line.jsonl line 6 is not valid JSON"),
    Case("dataset_binary", "train", train("--dataset", "WS/binary.jsonl"), "binary.jsonl line 4 holds binary data"),
    Case("dataset_latin1", "train", train("--dataset", "WS/latin1.jsonl"), "latin1.jsonl is not UTF-8 (line 8, byte 0xe9); convert it, e.g. iconv -f latin1 -t utf-8"),
    Case("dataset_late_list_field", "train", train("--dataset", "WS/late_list.jsonl"), "late_list.jsonl line 61: field 'response' holds a list, not a string"),
    Case("dataset_late_non_object", "train", train("--dataset", "WS/late_scalar.jsonl"), "late_scalar.jsonl line 41 is a JSON list, not an object"),
    Case("dataset_json_array_broken", "train", train("--dataset", "WS/array.json"), "array.json line 4 is not valid JSON"),
    Case("dataset_csv_extra_field", "train", train("--dataset", "WS/extra_field.csv"), "extra_field.csv line 3 has 3 fields but the header has 2"),
    Case("dataset_parquet_list_text", "train", train("--dataset", "WS/list_text.parquet"), "list_text.parquet: field 'text' holds list<"),
    Case("dataset_parquet_cut", "train", train("--dataset", "WS/cut.parquet"), "cut.parquet is not a readable parquet file"),
    Case("dataset_saved_list_field", "train", train("--dataset", "WS/saved"), "field 'response' holds List(Value('int64')) values, not strings"),
    Case("dataset_empty", "train", train("--dataset", "WS/empty.jsonl"), "empty.jsonl is empty"),
    Case("dataset_blank", "train", train("--dataset", "WS/blank.jsonl"), "blank.jsonl is empty (no records); add records"),
    Case("dataset_blank_txt", "train", train("--dataset", "WS/blank.txt"), "blank.txt is empty (no text lines); add records"),
    Case("dataset_no_known_fields", "train", train("--dataset", "WS/no_fields.jsonl"),
         "no_fields.jsonl line 1: dataset has fields ['answer', 'question'] but format='auto' needs 'messages' or 'conversations'"),
    Case("dataset_late_record_no_known_fields", "train", train("--dataset", "WS/late_no_fields.jsonl"),
         "late_no_fields.jsonl line 5 has fields ['answer', 'question'] but none of ['prompt', 'response']"),
    Case("chat_no_assistant_turn", "train", train("--dataset", "WS/no_assistant.jsonl"),
         "no_assistant.jsonl line 3: the conversation has no assistant turn, so nothing would be trained; add one or drop the record"),
    Case("chat_latin1", "train", train("--dataset", "WS/latin1_chat.jsonl"), "latin1_chat.jsonl is not UTF-8 (line 3, byte 0xe9)"),
    Case("chat_no_template", "train", train("--dataset", "WS/chat.jsonl"),
         "holds chat records but the tokenizer has no chat template; pass --chat_template FILE.jinja"),
    Case("chat_template_missing", "train", train("--dataset", "WS/chat.jsonl", "--chat_template", "WS/none.jinja"),
         "none.jinja is not a file; pass auto (the tokenizer's, if it has one), none, or a .jinja file"),
    Case("chat_template_fails", "train", train("--dataset", "WS/chat.jsonl", "--chat_template", "WS/raises.jinja"),
         "chat.jsonl record 1: the chat template failed to render it (TemplateError: roles must alternate); fix the record"),
    Case("packing_typo", "train", train("--packing", "isolate"), "argument --packing: invalid choice: 'isolate'"),
    Case("eval_dataset_missing", "train", train("--eval_dataset", "WS/none.jsonl"), "--eval_dataset: dataset path "),
    Case("eval_dataset_broken_line", "train", train("--eval_dataset", "WS/broken_line.jsonl"),
         "broken_line.jsonl line 6 is not valid JSON"),
    Case("eval_dataset_chat_no_template", "train", train("--eval_dataset", "WS/chat.jsonl"),
         "chat.jsonl holds chat records but the tokenizer has no chat template; pass --chat_template FILE.jinja"),
    Case("eval_fraction_one", "train", train("--eval_fraction", "1"), "--eval_fraction 1.0 must be within [0, 1) (0: no eval split)"),
    Case("eval_fraction_nan", "train", train("--eval_fraction", "nan"), "--eval_fraction nan must be within [0, 1)"),
    Case("split_seed_text", "train", train("--split_seed", "abc"), "argument --split_seed: invalid int value: 'abc'"),
    Case("show_data_negative", "train", train("--show_data", "-1"), "--show_data -1 must be 0 or more"),
    Case("ds_micro_batch_text", "train", train("--ds_config", "WS/micro_four.json"), 'train_micro_batch_size_per_gpu is "four" but must be a whole number of 1 or more'),
    Case("ds_accumulation_zero", "train", train("--ds_config", "WS/accum_zero.json"), "gradient_accumulation_steps is 0"),
    Case("ds_clipping_text", "train", train("--ds_config", "WS/clip_text.json"), 'gradient_clipping is "1.0" but must be a number of 0 or more'),
    Case("ds_optimizer_lr_text", "train", train("--ds_config", "WS/lr_text.json"), 'optimizer.params.lr is "fast"'),
    Case("ds_betas_out_of_range", "train", train("--ds_config", "WS/betas.json"), "optimizer.params.betas is [0.9, 1.5] but must be two numbers in [0, 1)"),
    Case("ds_warmup_text", "train", train("--ds_config", "WS/warmup_text.json"), 'scheduler.params.warmup_num_steps is "ten"'),
    Case("ds_bf16_not_bool", "train", train("--ds_config", "WS/bf16_yes.json"), 'bf16.enabled is "yes" but must be true, false or "auto"'),
    Case("model_gpt2", "train", train("--model", "WS/gpt2"), "is a gpt2; megaspec supports LLaMA-style decoders (llama, mistral, qwen2, qwen3)"),
    Case("model_config_broken", "train", train("--model", "WS/bad_config"), "config.json is not valid JSON"),
    Case("gguf_missing", "train", train("--model", "WS/none.gguf"), "none.gguf does not exist; pass an existing .gguf file"),
    Case("gguf_not_gguf", "train", train("--model", "WS/text.gguf"), "text.gguf is not a GGUF file (no GGUF magic bytes)"),
    Case("gguf_gpt2", "train", train("--model", "WS/gpt2.gguf"), "gpt2.gguf is a gpt2 model; megaspec supports LLaMA-style decoders"),
    Case("gguf_cut", "train", train("--model", "WS/cut.gguf"), "cut.gguf: the GGUF header is cut short"),
    Case("gguf_folder", "train", train("--model", "WS/folder.gguf"), "folder.gguf is a folder named .gguf; pass the .gguf file itself"),
]


@pytest.fixture(scope="module")
def train_ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("train_inputs")
    write_train_files(ws)
    return ws


@pytest.mark.parametrize("case", TRAIN, ids=[c.id for c in TRAIN])
def test_train_refuses_bad_input_in_one_line(case: Case, train_ws: Path, capsys) -> None:
    import torch.distributed as torch_dist

    joined = torch_dist.is_initialized()
    code, out, err = run_case(case, train_ws, capsys)
    assert_one_line(case, code, out, err)
    assert torch_dist.is_initialized() == joined, "validation must fail before torch.distributed starts"
    assert not (train_ws / "runs").exists(), "nothing may be written"


def test_supported_model_types_have_the_seven_llama_projections_as_linears() -> None:
    """What check_model_type lets through is what the adapters find by name (meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megaspec.model import SUPPORTED_MODEL_TYPES

    wanted = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for model_type in SUPPORTED_MODEL_TYPES:
        config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        assert wanted <= names, (model_type, sorted(names))


@pytest.mark.parametrize("name", ["good.jsonl", "good.json", "good.csv", "good.txt", "good.parquet"])
def test_whole_file_check_passes_every_format_datasets_reads(tmp_path: Path, name: str) -> None:
    """A valid file of each type passes, and datasets reads it to the same records (no false refusals)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megaspec.train.data import check_dataset_file, load_records

    path = tmp_path / name
    texts = ["café", "naïve", "", "x, y"]
    if name.endswith(".jsonl"):
        path.write_text("\ufeff" + lines([{"text": t, "n": i} for i, t in enumerate(texts)]) + "\n\n" + lines([{"text": None}]))
    elif name.endswith(".json"):
        path.write_text(json.dumps([{"text": t} for t in texts], indent=2))
    elif name.endswith(".csv"):
        path.write_text('text\n"x, y"\ncafé\n\n')
    elif name.endswith(".txt"):
        path.write_text("\n".join(texts))
    else:
        pq.write_table(pa.table({"text": texts}), path)
    check_dataset_file(path)
    assert len(load_records(str(path))) >= 2


# --- export and generate -----------------------------------------------------------------------
def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture(scope="module")
def export_ws(tmp_path_factory) -> Path:
    """A good ssh run and broken copies of it: truncated adapter, broken train/adapter JSON."""
    import shutil

    from tests.test_export import make_run

    ws = tmp_path_factory.mktemp("export_inputs")
    good = make_run(ws, "ssh")
    shutil.move(good, ws / "good")
    broken = {
        "truncated": lambda run: truncate(run / "adapter" / "adapter_model.safetensors"),
        "train_config": lambda run: (run / "train_config.json").write_text('{"model": nul'),
        "adapter_config": lambda run: (run / "adapter" / "adapter_config.json").write_text('{"method": "ssh",'),
        "adapter_keys": lambda run: (run / "adapter" / "adapter_config.json").write_text('{"methd": "ssh"}'),
        "adapter_layers": lambda run: (run / "adapter" / "adapter_layers.json").write_text("[1,"),
    }
    for name, damage in broken.items():
        shutil.copytree(ws / "good", ws / name)
        damage(ws / name)
    (ws / "out").mkdir()
    return ws


def export(run: str, fmt: str = "megaspec", *extra: str) -> Callable[[Path], list[str]]:
    return lambda ws: ["--run", str(ws / run), "--out", str(ws / "out" / "model"), "--format", fmt, *extra]


def generate(run: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda ws: ["--run", str(ws / run), "--prompt", "Q: add 3 and 4\\nA:", *extra]


EXPORT = [
    *(Case(f"truncated_adapter_{fmt}", "export", export("truncated", fmt), "adapter_model.safetensors is truncated or corrupt")
      for fmt in ("merged", "peft", "megaspec")),
    Case("broken_train_config", "export", export("train_config"), "train_config.json is not valid JSON"),
    Case("broken_adapter_config", "export", export("adapter_config"), "adapter_config.json is not a usable adapter config"),
    Case("unknown_adapter_config_key", "export", export("adapter_keys"), "unknown adapter config keys ['methd']"),
    Case("broken_adapter_layers", "export", export("adapter_layers"), "adapter_layers.json is not valid JSON"),
    Case("max_shard_size_zero", "export", export("good", "merged", "--max_shard_size", "0"), "argument --max_shard_size: 0 must be a finite number above 0"),
    Case("max_shard_size_nan", "export", export("good", "merged", "--max_shard_size", "nan"), "--max_shard_size: nan must be"),
    Case("rank_zero", "export", export("good", "peft", "--lora_rank", "0"), "--lora_rank takes a positive rank"),
    Case("format_typo", "export", export("good", "merge"), "argument --format: invalid choice: 'merge'"),
    Case("max_new_tokens_zero", "generate", generate("good", "--max_new_tokens", "0"), "--max_new_tokens 0 must be at least 1"),
    Case("max_new_tokens_negative", "generate", generate("good", "--max_new_tokens", "-5"), "--max_new_tokens -5 must be at least 1"),
    Case("temperature_zero", "generate", generate("good", "--temperature", "0"), "--temperature 0.0 must be a finite number above 0; pass --greedy"),
    Case("temperature_nan", "generate", generate("good", "--temperature", "nan"), "--temperature nan must be"),
    Case("top_p_two", "generate", generate("good", "--top_p", "2"), "--top_p 2.0 must be in (0, 1]"),
    Case("top_p_zero", "generate", generate("good", "--top_p", "0", "--greedy"), "--top_p 0.0 must be in (0, 1]"),
    Case("generate_truncated_adapter", "generate", generate("truncated", "--greedy"), "adapter_model.safetensors is truncated or corrupt"),
    Case("generate_broken_train_config", "generate", generate("train_config", "--greedy"), "train_config.json is not valid JSON"),
]


@pytest.mark.parametrize("case", EXPORT, ids=[c.id for c in EXPORT])
def test_export_and_generate_refuse_bad_input_in_one_line(case: Case, export_ws: Path, capsys) -> None:
    code, out, err = run_case(case, export_ws, capsys)
    assert_one_line(case, code, out, err)
    assert list((export_ws / "out").iterdir()) == [], "no output, not even a staged temp folder"


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch) -> Path:
    """A folder nothing can be created in: by mode, or (as root, whom modes do not stop) as on a read-only mount."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).absolute().is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    yield folder


@pytest.mark.parametrize("fmt", ["merged", "peft", "megaspec"])
def test_export_to_a_read_only_out_is_one_line_and_writes_nothing(export_ws: Path, read_only: Path, fmt: str, capsys) -> None:
    case = Case("read_only_out", "export", lambda ws: ["--run", str(ws / "good"), "--out", str(read_only / "model"), "--format", fmt],
                f"--out {read_only / 'model'}: cannot write in {read_only}")
    code, out, err = run_case(case, export_ws, capsys)
    assert_one_line(case, code, out, err)
    assert list(read_only.iterdir()) == []


# --- bench -------------------------------------------------------------------------------------
def bench(*args: str) -> Callable[[Path], list[str]]:
    return lambda ws: list(args)


def results_file(content: str) -> Callable[[Path], list[str]]:
    """quality --real --results FILE, FILE written with `content` in the workspace."""
    def args(ws: Path) -> list[str]:
        (ws / "q.jsonl").write_text(content)
        return ["quality", "--real", "--results", str(ws / "q.jsonl")]
    return args


BENCH = [
    Case("crossover_n_zero", "bench", bench("crossover", "--n", "0"), "argument --n: 0 must be at least 1"),
    Case("overhead_tokens_zero", "bench", bench("overhead", "--tokens", "0"), "argument --tokens: 0 must be at least 1"),
    Case("crossover_tokens_zero", "bench", bench("crossover", "--tokens", "64,0"), "argument --tokens: 0 must be at least 1"),
    Case("overhead_shape_zero", "bench", bench("overhead", "--shapes", "0x64"), "'0x64' is not a layer shape; write OUTxIN"),
    Case("overhead_shape_text", "bench", bench("overhead", "--shapes", "abc"), "'abc' is not a layer shape"),
    Case("overhead_reps_zero", "bench", bench("overhead", "--reps", "0"), "argument --reps: 0 must be at least 1"),
    Case("overhead_warmup_negative", "bench", bench("overhead", "--warmup", "-1"), "argument --warmup: -1 must be at least 0"),
    Case("overhead_device_gpu", "bench", bench("overhead", "--device", "gpu"), "argument --device: 'gpu' is not a device; use cpu or cuda"),
    Case("overhead_methods_typo", "bench", bench("overhead", "--methods", "ssh,peft_lor"), "unknown method 'peft_lor'; choose from ssh"),
    Case("params_methods_typo", "bench", bench("params", "--methods", "shh"), "unknown method 'shh'; choose from ssh, fourierft"),
    Case("params_models_typo", "bench", bench("params", "--models", "llama-9b"), "unknown model 'llama-9b'; choose from llama-3.1-8b, llama-3-70b"),
    Case("memory_models_typo", "bench", bench("memory", "--models", "llama-9b"), "unknown model 'llama-9b'"),
    Case("memory_world_size_zero", "bench", bench("memory", "--world_sizes", "0"), "argument --world_sizes: 0 must be at least 1"),
    Case("memory_precision_typo", "bench", bench("memory", "--precisions", "fp8"), "unknown precision 'fp8'; choose from bf16"),
    Case("memory_seq_len_zero", "bench", bench("memory", "--seq_len", "0"), "argument --seq_len: 0 must be at least 1"),
    Case("memory_seq_len_kebab_alias", "bench", bench("memory", "--seq-len", "0"), "argument --seq_len: 0 must be at least 1"),
    Case("selection_energy_ratio", "bench", bench("selection", "--energy_ratio", "nan"), "argument --energy_ratio: nan must be in [0, 1]"),
    Case("selection_ranks_zero", "bench", bench("selection", "--ranks", "0"), "argument --ranks: 0 must be at least 1"),
    Case("quality_lrs_negative", "bench", bench("quality", "--lrs", "1e-2,-1"), "argument --lrs: -1 must be a finite number above 0"),
    Case("quality_jobs_zero", "bench", bench("quality", "--jobs", "0"), "argument --jobs: 0 must be at least 1"),
    Case("quality_real_no_data", "bench", lambda ws: ["quality", "--real", "--dataset", str(ws / "none.jsonl")],
         "none.jsonl does not exist; write it with python -m megaspec.assets boolq"),
    Case("quality_real_not_a_model", "bench", lambda ws: ["quality", "--real", "--dataset", __file__, "--test", __file__,
                                                           "--model", str(ws)], "is neither a .gguf file nor an HF model folder"),
    Case("quality_real_no_ds_config", "bench", lambda ws: ["quality", "--real", "--dataset", __file__, "--test", __file__,
                                                            "--ds_config", str(ws / "nope.json")], "nope.json does not exist; pass a DeepSpeed JSON"),
    Case("quality_real_targets_typo", "bench", bench("quality", "--real", "--targets", "qv,mlp"), "unknown target set 'mlp'; choose from qv, all"),
    Case("quality_results_without_real", "bench", bench("quality", "--results", "q.jsonl"), "--results needs --real"),
    Case("quality_real_results_garbage", "bench", results_file("row 1\nrow 2\n"),
         "q.jsonl line 1 is not a row of bench quality --real; pass the file it wrote, or a new file"),
    Case("quality_real_results_garbage_middle", "bench", results_file('{"label": "x", "setup": {}, "row": {}, "result": {}}\n{"label": "y"\n\n'),
         "q.jsonl line 2 is not a row of bench quality --real"),
    Case("quality_real_results_a_folder", "bench", lambda ws: ["quality", "--real", "--results", str(ws)], "is not a file; pass a JSON-lines file"),
    Case("quality_real_results_no_folder", "bench", lambda ws: ["quality", "--real", "--results", str(ws / "no" / "q.jsonl")],
         "/no does not exist; create it or pick another file"),
    Case("throughput_layers_one", "bench", bench("throughput", "--layers", "1"), "argument --layers: 1 must be at least 2"),
    Case("throughput_peak_zero", "bench", bench("throughput", "--peak_tflops", "0"), "argument --peak_tflops: 0 must be a finite number above 0"),
    Case("unknown_subcommand", "bench", bench("speed"), "argument command: invalid choice: 'speed'"),
]
if not torch.cuda.is_available():
    BENCH += [
        Case("overhead_device_cuda_without_gpu", "bench", bench("overhead", "--device", "cuda"), "this machine has no CUDA GPU; use --device cpu"),
        Case("throughput_without_gpu", "bench", bench("throughput", "--engine", "plain"), "throughput needs a CUDA GPU"),
    ]


@pytest.mark.parametrize("case", BENCH, ids=[c.id for c in BENCH])
def test_bench_refuses_bad_input_in_one_line(case: Case, tmp_path: Path, capsys) -> None:
    code, out, err = run_case(case, tmp_path, capsys)
    assert_one_line(case, code, out, err)
    assert out == ""


# --- SLURM -------------------------------------------------------------------------------------
def slurm_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_check", REPO / "slurm" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# sinfo --noheader --Node --format=%N|%c|%G|%P of two partitions: tests/slurm_cluster.py's 2-CPU nodes, and GPU nodes
SINFO = "node1|2|(null)|debug*\nnode2|2|(null)|debug*\ngpu1|64|gpu:h100:8(S:0-1)|gpu\ngpu2|64|gpu:h100:8(S:0-1)|gpu\n"


def readme_cpu_line() -> list[str]:
    """The sbatch options of the README's CPU-only SLURM line."""
    line = next(ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("sbatch") and "# CPU only" in ln)
    return line.split("#")[0].split()[1:]


def test_readme_cpu_line_fits_two_cpu_nodes_and_the_script_default_does_not() -> None:
    check = slurm_check()
    nodes = check.parse_sinfo(SINFO)
    argv = [REPO / "slurm" / "train.sbatch" if a == "slurm/train.sbatch" else a for a in readme_cpu_line()]
    argv = [str(a) for a in argv]
    assert check.problem(check.request(argv), nodes) is None
    without = [a for i, a in enumerate(argv) if a != "--cpus-per-task" and (i == 0 or argv[i - 1] != "--cpus-per-task")]
    why = check.problem(check.request(without), nodes)
    assert why is not None and "2 node(s) with 8 CPUs (1 tasks x --cpus-per-task 8)" in why and "\n" not in why


@pytest.mark.parametrize("argv, expect", [
    (["--nodes", "2", "--partition", "gpu", "SCRIPT"], None),  # the script's 8 ranks x 8 CPUs and 8 GPUs per node fit
    (["--nodes", "3", "--partition", "gpu", "SCRIPT"], "has 2 such node(s) of 2"),
    (["--partition=gpu", "--gpus-per-node=gpu:h100:16", "-N1", "SCRIPT"], "and 16 GPUs each"),
    (["-p", "gpu", "-c", "9", "SCRIPT"], "72 CPUs (8 tasks x --cpus-per-task 9)"),
    (["--ntasks-per-node", "1", "--gpus-per-node", "0", "-c", "1", "SCRIPT"], None),
    (["--partition", "cpu", "SCRIPT"], "partition cpu has no nodes (partitions: debug, gpu)"),
    (["--requeue", "--nodes", "1", "--ntasks-per-node", "1", "--gpus-per-node", "0", "-c2", "SCRIPT", "--nodes", "9"], None),
])
def test_slurm_check_against_canned_sinfo(argv: list[str], expect: str | None) -> None:
    check = slurm_check()
    argv = [str(REPO / "slurm" / "train.sbatch") if a == "SCRIPT" else a for a in argv]
    why = check.problem(check.request(argv), check.parse_sinfo(SINFO))
    assert why == expect if expect is None else expect in why


def test_slurm_check_main_is_one_line_exit_2(monkeypatch, capsys) -> None:
    import subprocess

    check = slurm_check()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, SINFO, ""))
    assert check.main(["--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0", str(REPO / "slurm" / "train.sbatch")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("slurm/check.py: error: the job asks for 2 node(s) with 8 CPUs")
    assert check.main(readme_cpu_line()[:-1] + [str(REPO / "slurm" / "train.sbatch")]) == 0


@pytest.mark.parametrize("argv, expect", [
    (["slurm/nope.sbatch"], "slurm/check.py: error: slurm/nope.sbatch does not exist; pass the sbatch script to check"),
    (["--nodes", "two", "slurm/train.sbatch"], "slurm/check.py: error: cannot read the request"),
])
def test_slurm_check_bad_input_is_one_line_exit_2(argv: list[str], expect: str) -> None:
    result = subprocess.run([sys.executable, "slurm/check.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expect)
