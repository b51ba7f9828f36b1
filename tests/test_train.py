"""The main job end to end: real DeepSpeed ZeRO-3 on 2 CPU ranks, 1 vs 2 ranks, resume, monitoring, HF inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import REPO
from tests.launcher import check, cpu_env, losses, metrics, remove_shm_buffers, run_train

pytestmark = pytest.mark.slow

STEPS = 10


def common(config: Path, out: Path) -> list[str]:
    return ["--ds_config", str(config), "--max_steps", str(STEPS), "--eval_every", "5", "--save_every", "5",
            "--image_every", "5", "--n_coeffs", "200", "--output_dir", str(out), "--report", "html"]


@pytest.fixture(scope="module")
def two_rank_run(batch8_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "two"
    check(run_train(common(batch8_config, out), ranks=2))
    return out


def positions(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if k.endswith((".rows", ".cols"))}


def coeffs(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if k.endswith(".coeffs")}


def test_readme_main_command_on_two_cpu_ranks(tmp_path):
    """`deepspeed launch/train.py --ds_config ds_configs/zero3.json`, unchanged, from a checkout."""
    for item in ("launch", "ds_configs"):
        (tmp_path / item).symlink_to(REPO / item)
    # DeepSpeed's CPU accelerator reports LOCAL_SIZE devices: the launcher then starts 2 ranks
    env = cpu_env(LOCAL_SIZE="2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        proc = subprocess.run(["deepspeed", "launch/train.py", "--ds_config", "ds_configs/zero3.json"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(29500)  # the launcher's default port
    check(proc)
    assert "before it has started" not in proc.stderr  # DeepSpeed's WarmupLR warning on every start, filtered
    (run,) = list((tmp_path / "runs").iterdir())
    records = metrics(run)
    assert {r["world_size"] for r in records} == {2}
    assert records[-1]["step"] == 100
    assert (f"finished: {run.relative_to(tmp_path)} (step 100, loss {records[-1]['loss']:.4f}, eval loss "
            f"{records[-1]['eval_loss']:.4f}); export it with: python launch/export.py --run") in proc.stdout
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.3, (first, last)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "eval_loss" in records[-1] and records[-1]["eval_loss"] < records[0]["loss"]


def test_one_and_two_ranks_agree(two_rank_run, batch8_config, tmp_path):
    one = tmp_path / "one"
    check(run_train(common(batch8_config, one), ranks=1))
    assert positions(one).keys() == positions(two_rank_run).keys()
    for key, value in positions(one).items():
        assert torch.equal(value, positions(two_rank_run)[key]), key
    l1, l2 = losses(one), losses(two_rank_run)
    assert sorted(l1) == list(range(1, STEPS + 1))
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4, (step, l1[step], l2[step])
    for key, value in coeffs(one).items():
        torch.testing.assert_close(value, coeffs(two_rank_run)[key], atol=1e-5, rtol=1e-4)
    assert metrics(one)[-1]["world_size"] == 1 and metrics(two_rank_run)[-1]["world_size"] == 2


def test_halted_and_resumed_run_matches_uninterrupted(two_rank_run, batch8_config, tmp_path):
    out = tmp_path / "resumed"
    halted = run_train([*common(batch8_config, out), "--halt_at_step", "6"], ranks=2)
    assert halted.returncode == 75, halted.stderr[-3000:]  # stopped early: a distinct exit code, no final files
    assert max(losses(out)) == 6
    assert not (out / "adapter").exists() and not (out / "final_metrics.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000006"
    proc = check(run_train([*common(batch8_config, out), "--resume"], ranks=2))
    assert "resumed from" in proc.stdout + proc.stderr
    resumed, straight = losses(out), losses(two_rank_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert abs(resumed[step] - straight[step]) < 1e-5, (step, resumed[step], straight[step])
    for key, value in coeffs(out).items():
        torch.testing.assert_close(value, coeffs(two_rank_run)[key], atol=1e-6, rtol=1e-5)


def test_tensorboard_has_spectral_tags(two_rank_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((two_rank_run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    norm_tags = [t for t in tags["scalars"] if t.startswith("spectral/norm/")]
    assert len(norm_tags) == 4  # q_proj and v_proj of 2 layers
    assert any(t.startswith("spectral/max_abs/") for t in tags["scalars"])
    assert {"spectral/global_norm", "train/loss"} <= set(tags["scalars"])
    assert "spectral/coeffs" in tags["histograms"]
    assert len([t for t in tags["images"] if t.startswith("spectral/positions/")]) == 4
    assert {"spectral/allocation", "spectral/growth"} <= set(tags["images"])
    assert "Budget allocation" in (two_rank_run / "report.html").read_text()  # rank 0 wrote the run report
    growth = [e.value for e in acc.Scalars("spectral/global_norm")]
    assert growth[-1] > growth[0] >= 0  # coefficients grow from their zero init (step 1 has lr 0: warmup)
    final = coeffs(two_rank_run)
    expected = torch.cat([v.flatten() for v in final.values()]).norm().item()
    assert abs(growth[-1] - expected) < 1e-4 * max(expected, 1.0)


def test_hf_model_sentencepiece_and_jsonl_instructions(tmp_path):
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaspec.train.embedded import embedded_corpus, embedded_instructions

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(embedded_corpus(500, seed=1)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=3)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in embedded_instructions(300, seed=2)))
    out = tmp_path / "run"
    check(run_train(["--model", str(model_dir), "--tokenizer", str(tmp_path / "tokenizer.model"), "--dataset", str(data),
                     "--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--max_steps", "12", "--seq_len", "64",
                     "--eval_every", "12", "--n_coeffs", "300", "--output_dir", str(out)], ranks=1))
    records = metrics(out)
    assert records[-1]["step"] == 12 and records[-1]["loss"] < records[0]["loss"]
    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in state.items() if k.endswith(".coeffs")) == 300 * 4


def test_bad_ds_config_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_train(["--ds_config", str(tmp_path / "missing.json"), "--output_dir", str(out)])
    assert proc.returncode == 2
    assert "missing.json does not exist" in proc.stderr
    assert not out.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_eval_dataset_is_the_evaluated_data(tmp_path):
    """--eval_dataset: the run's eval loss is the adapted model's token-mean loss on that file's responses."""
    from transformers import AutoModelForCausalLM

    from megaspec.model import load_adapter
    from megaspec.train.embedded import embedded_base, embedded_instructions, embedded_tokenizer

    held = embedded_instructions(10, seed=99)
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in held))
    out = tmp_path / "run"
    check(run_train(["--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--max_steps", "3", "--eval_every", "3",
                     "--eval_batches", "100", "--n_coeffs", "200", "--packing", "none", "--chat_template", "none",
                     "--eval_dataset", str(tmp_path / "held.jsonl"), "--output_dir", str(out)], ranks=1))
    reported = metrics(out)[-1]["eval_loss"]
    assert json.loads((out / "train_config.json").read_text())["eval_dataset"] == str(tmp_path / "held.jsonl")

    tok = embedded_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(embedded_base()), dtype=torch.float32).eval()
    load_adapter(model, out / "adapter")
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for record in held:  # one record, one block: BOS prompt response EOS, loss on response and EOS only
            prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
            response = tok(record["response"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tok.bos_token_id, *prompt, *response, tok.eos_token_id]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            trained = torch.arange(len(targets)) >= len(prompt)  # target i is token i+1: the prompt's tokens are not trained
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            loss_sum += float(losses[trained].sum())
            tokens += int(trained.sum())
    assert abs(reported - loss_sum / tokens) < 1e-4, (reported, loss_sum / tokens)


def test_missing_relative_ds_config_names_the_repos_absolute_copy(tmp_path, monkeypatch):
    """Run from another folder, `--ds_config ds_configs/zero3.json` does not exist there: the fix names the repo's file."""
    from megaspec.train.dsconfig import ConfigError, read_ds_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        read_ds_config("ds_configs/zero3.json")
    wanted = REPO / "ds_configs" / "zero3.json"
    assert str(error.value) == f"--ds_config ds_configs/zero3.json does not exist; pass a DeepSpeed JSON file such as {wanted}"
    with pytest.raises(ConfigError, match="does not exist; pass a DeepSpeed JSON file such as .*ds_configs/zero3.json$"):
        read_ds_config(tmp_path / "missing.json")
