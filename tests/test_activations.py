"""Gradient checkpointing and the attention kernel: the auto rule, the same losses and adapter gradients with
and without checkpointing (plain model and real ZeRO-3 on 2 ranks), the trainer's flags and their refusals."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from megaspec import AdapterConfig, apply_adapters
from megaspec.benchmarks.common import llama_config
from megaspec.train.activations import (
    AUTO_CHECKPOINTING_PARAMS,
    check_attn_implementation,
    configure_activations,
    count_parameters,
    use_checkpointing,
)
from megaspec.train.dsconfig import ConfigError

from .conftest import tiny_config, zero3_config, zero3_tiny_llama
from .distributed import REPO, run_ranks
from .launcher import check, cpu_env, losses, run_train

# adapters inside attention and MLP, a low-rank one and a sparse-spectrum one
SETTINGS = [AdapterConfig(method="ssh", n_coeffs=50, target_modules=["q_proj", "v_proj", "down_proj"]),
            AdapterConfig(method="lora", lora_rank=4, target_modules=["q_proj", "v_proj", "down_proj"])]


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))


def adapted(config: AdapterConfig) -> LlamaForCausalLM:
    """A seeded tiny fp32 LLaMA with a frozen base, adapters with non-zero parameters, in training mode."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    model.config.use_cache = False
    apply_adapters(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    return model.train()


def layer_calls(model: LlamaForCausalLM) -> list[int]:
    """A counter of decoder-layer MLP calls (a recompute runs them again; it stops early, before their post-hooks)."""
    calls = [0]
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- the auto rule -------------------------------------------------------------------------------


def test_auto_counts_the_config_on_the_meta_device():
    assert count_parameters(llama_config("llama-3.1-8b")) == 8_030_261_248  # the published count
    torch.manual_seed(0)
    assert count_parameters(tiny_config()) == sum(p.numel() for p in LlamaForCausalLM(tiny_config()).parameters())
    assert use_checkpointing("auto", 8_030_261_248) == (True, "auto: 8,030,261,248 parameters > 1,000,000,000")
    assert use_checkpointing("auto", AUTO_CHECKPOINTING_PARAMS)[0] is False
    assert use_checkpointing("auto", AUTO_CHECKPOINTING_PARAMS + 1)[0] is True
    assert use_checkpointing("on", 10) == (True, "--gradient_checkpointing on")
    assert use_checkpointing("off", 10**12) == (False, "--gradient_checkpointing off")
    with pytest.raises(ConfigError, match="not one of auto, on, off"):
        use_checkpointing("yes", 10)


# --- same numbers with and without checkpointing ------------------------------------------------------


@pytest.mark.parametrize("config", SETTINGS, ids=[c.method for c in SETTINGS])
def test_checkpointing_keeps_losses_and_adapter_gradients(config):
    """Frozen base (the inputs do not require grad): non-reentrant checkpointing still reaches every adapter."""
    results = {}
    for setting in ("off", "on"):
        model = adapted(config)
        line = configure_activations(model, setting, None)
        assert line.startswith(f"gradient checkpointing {setting} (--gradient_checkpointing {setting}); attention sdpa")
        calls = layer_calls(model)
        loss = model(input_ids=ids(), labels=ids()).loss
        forwards = calls[0]
        loss.backward()
        recomputed = calls[0] - forwards
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        results[setting] = (loss.detach(), grads, recomputed)
    assert results["off"][2] == 0 and results["on"][2] == 2  # each of the 2 layers ran again in the backward
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=0, atol=1e-6)
    assert results["on"][1].keys() == results["off"][1].keys()
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][name], grad, rtol=1e-5, atol=1e-7)


def _zero3_grads(setting: str) -> dict:
    """One rank: a ZeRO-3 (stage3 persistence 0) engine of the adapted tiny model; 3 steps' losses and full adapter grads."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    rank = torch.distributed.get_rank()
    ds_config = zero3_config(1e-2, micro_batch=1)
    torch.manual_seed(0)
    model = zero3_tiny_llama(ds_config, LlamaForCausalLM(tiny_config()).state_dict())
    model.config.use_cache = False
    configure_activations(model, setting, None)
    apply_adapters(model, SETTINGS[0])
    calls = layer_calls(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    out: dict = {"losses": [], "grads": [], "recomputed": []}
    for _ in range(3):
        batch = ids()[rank : rank + 1]
        loss = engine(input_ids=batch, labels=batch).loss
        forwards = calls[0]
        engine.backward(loss)
        out["recomputed"].append(calls[0] - forwards)
        out["grads"].append({n: safe_get_full_grad(p).clone() for n, p in model.named_parameters() if p.requires_grad})
        engine.step()
        out["losses"].append(loss.item())
    out["released"] = model.model.layers[0].self_attn.q_proj.base.weight.numel() == 0
    return out


@pytest.mark.slow
def test_checkpointing_under_zero3_keeps_losses_and_adapter_gradients():
    """2 ranks, partitioned frozen base: the recompute re-gathers it; losses and full adapter grads match."""
    runs = {s: [r.value for r in run_ranks(_zero3_grads, 2, args=(s,), timeout=300)] for s in ("off", "on")}
    for rank in range(2):
        off, on = runs["off"][rank], runs["on"][rank]
        assert off["released"] and on["released"]
        assert off["recomputed"] == [0, 0, 0] and on["recomputed"] == [2, 2, 2]
        np.testing.assert_allclose(on["losses"], off["losses"], rtol=0, atol=1e-6)
        assert off["losses"][-1] < off["losses"][0]
        for step in range(3):
            assert on["grads"][step].keys() == off["grads"][step].keys()
            for name, grad in off["grads"][step].items():
                assert grad.abs().sum() > 0, name
                torch.testing.assert_close(on["grads"][step][name], grad, rtol=1e-5, atol=1e-7)


# --- the attention kernel ---------------------------------------------------------------------------------


def test_attention_kernels_give_the_same_logits():
    out = {}
    for name in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config()).eval()
        assert configure_activations(model, "off", name).endswith(f"attention {name}")
        assert model.config._attn_implementation == name
        with torch.no_grad():
            out[name] = model(ids()).logits
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=0, atol=1e-5)


def test_attention_refusals(monkeypatch):
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="needs the flash-attn package"):
            check_attn_implementation("flash_attention_2", tiny_config())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if flash-attn were installed
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            check_attn_implementation("flash_attention_2", tiny_config())
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)
    with pytest.raises(ConfigError, match="LlamaForCausalLM does not support it; use eager"):
        check_attn_implementation("sdpa", tiny_config())
    with pytest.raises(ConfigError, match="is not one of sdpa, eager, flash_attention_2"):
        check_attn_implementation("flash", tiny_config())


REFUSED = [(["--attn_implementation", "flash_attention_2"], "--attn_implementation flash_attention_2 needs"),
           (["--s2ft_estimate_group_mb", "0"], "--s2ft_estimate_group_mb 0 must be at least 1")]


@pytest.mark.parametrize(("args", "expect"), REFUSED, ids=["flash_attention_2", "group_mb_0"])
def test_bad_flags_exit_2_in_one_line_before_loading(args, expect, tmp_path, capsys):
    """Checked by validation, before any model is loaded or process group formed."""
    if "flash_attention_2" in args and importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and CUDA are both here")
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    out = tmp_path / "run"
    code = script.main(["--ds_config", str(REPO / "ds_configs" / "zero3.json"), *args, "--max_steps", "1", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("train: error: ")]
    assert len(errors) == 1 and expect in errors[0], captured.err
    assert not out.exists() and "trainable of" not in captured.out


# --- the training job -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_job_logs_the_decision_and_trains_the_same(tmp_path):
    """The embedded tiny model: auto is off (and says why); on gives the same losses, one ZeRO-3 rank."""
    args = ["--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--max_steps", "3", "--eval_every", "0",
            "--n_coeffs", "100", "--image_every", "3", "--save_every", "3"]
    auto = check(run_train([*args, "--output_dir", str(tmp_path / "auto")], env=cpu_env()))
    assert "gradient checkpointing off (auto: " in auto.stdout and "parameters <= 1,000,000,000)" in auto.stdout
    on = check(run_train([*args, "--output_dir", str(tmp_path / "on"), "--gradient_checkpointing", "on",
                          "--attn_implementation", "eager"], env=cpu_env()))
    assert "gradient checkpointing on (--gradient_checkpointing on); attention eager" in on.stdout
    l_auto, l_on = losses(tmp_path / "auto"), losses(tmp_path / "on")
    assert sorted(l_auto) == sorted(l_on) == [1, 2, 3]
    for step in l_auto:
        assert abs(l_auto[step] - l_on[step]) < 1e-5, (step, l_auto[step], l_on[step])
    saved = json.loads((tmp_path / "on" / "train_config.json").read_text())
    assert saved["gradient_checkpointing"] == "on" and saved["attn_implementation"] == "eager"


# --- the benchmark's measure --------------------------------------------------------------------------------


def test_live_bytes_counts_allocations_not_views():
    from megaspec.benchmarks.checkpointing import LiveBytes

    weight = torch.zeros(1000)
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2**21, dtype=torch.uint8)
        view = weight.view(10, 100).t()  # no new memory
        weight.add_(1.0)  # in place: no new memory
        del a
        c = torch.empty(2**19, dtype=torch.uint8)
    assert tracker.peak == 2**20 + 2**21 and tracker.live == 2**21 + 2**19
    del b, c, view
    assert tracker.live == 0


def test_checkpointing_bench_rows_on_a_tiny_model():
    from megaspec.benchmarks import checkpointing as bench

    rows = bench.run(["tiny"], seq_len=64, steps=1, warmup=1)
    off, on = rows
    assert (off["checkpointing"], on["checkpointing"]) == ("off", "on") and off["auto_full"] == "tiny: off"
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)
    assert 0 < on["peak_bytes"] < off["peak_bytes"] and on["peak_vs_off"] < 1
    estimate = bench.s2ft_estimate("tiny", budgets=(2**20, 1), seq_len=64)
    one, each = estimate
    assert (one["groups"], each["groups"]) == (1, 4)  # q and v of 2 layers
    assert one["buffers_held"] == 2 * 4 * (64 * 64 + 32 * 64) and each["buffers_held"] == 4 * 64 * 64
    for row in estimate:
        assert row["measured_held"] == row["buffers_held"]  # exactly the group's fp32 buffers stay allocated
        assert row["buffers_held"] <= row["measured_peak"] <= row["bound"]
    assert each["measured_peak"] < one["measured_peak"]
    extrapolated = {(r["model"], r["targets"]): r for r in bench.extrapolate_estimate()}
    assert extrapolated[("llama-3.1-8b", "q,v")]["all_at_once"] == 32 * 4 * (4096 * 4096 + 1024 * 4096)  # 2.5 GiB
    assert extrapolated[("llama-3-70b", "q,v")]["held_1024"] <= 2**30
