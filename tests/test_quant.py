"""Quantized frozen base: bnb nf4/fp4/int8 dequantization, planning, merging, measured bytes, ZeRO-3, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from megaspec import AdapterConfig, apply_adapters
from megaspec.adapters import dense_weight, is_quantized
from megaspec.model import adapters_of, merge_adapters
from megaspec.quant import (
    TorchGroupQuantizer,
    bnb_config,
    check_quantization,
    frozen_bytes,
    prepare_quantized,
    provide_zero_quantizer,
)

from .conftest import save_llama, tiny_config
from .distributed import REPO, run_ranks
from .launcher import check, losses, run_train

bnb = pytest.importorskip("bitsandbytes")

# one decoder layer with 512-wide projections: big enough that bnb's per-tensor constants
# (two code tables, ~1 KB per linear) are small next to the weights, small enough for 2 CPU ranks
WIDE = dict(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
SSH = AdapterConfig(method="ssh", n_coeffs=100, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
STEPS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tiny") / "model", tiny_config())


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("wide") / "model", LlamaConfig(**WIDE))


def load(path: Path, quantize: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base as build_model loads it without ZeRO-3, on CPU (bnb would pick a visible GPU)."""
    quantization = bnb_config(quantize, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=quantization,
                                                 device_map={"": "cpu"} if quantization else None)
    if quantize != "none":
        prepare_quantized(model)
    return model


def decoder_linears(model: nn.Module) -> list[str]:
    """The decoder's linear layers (what bnb quantizes; lm_head is left alone)."""
    return [n for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]


def quantized_layer(kind: str, linear: nn.Linear) -> nn.Linear:
    """`linear` as a bnb layer, quantized (bnb quantizes on the move to a device)."""
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type=kind, quant_storage=torch.float32)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


# --- configs ---------------------------------------------------------------------------------------


def test_bnb_config():
    for kind in ("nf4", "fp4"):
        config = bnb_config(kind, torch.bfloat16)
        assert config.load_in_4bit and config.bnb_4bit_quant_type == kind and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == config.bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config("int8", torch.float32).load_in_8bit
    assert bnb_config("none", torch.float32) is None
    with pytest.raises(ValueError, match="int4"):
        bnb_config("int4", torch.float32)


def test_qwz_with_bitsandbytes_refused():
    config = json.loads((REPO / "ds_configs" / "zero3_qwz.json").read_text())
    assert config["zero_optimization"]["zero_quantized_nontrainable_weights"] is True
    with pytest.raises(ValueError, match="re-quantize bitsandbytes"):
        check_quantization(config, "nf4")
    check_quantization(config, "none")
    check_quantization(json.loads((REPO / "ds_configs" / "zero3.json").read_text()), "nf4")


# --- DeepSpeed's qwZ int8 quantizer ------------------------------------------------------------------


def deepspeed_kernel_oracle(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """csrc/quantization's symmetric 8-bit arithmetic, element by element in numpy fp32/fp16.

    Params<Symmetric, 8>(max): scale = (1 << 8) / (2 max), 1 if max == 0; quantize: __float2int_rn
    (round half to even) of float(x) * scale, clamped to [-128, 127]; store: 1 / scale; dequantize:
    float(q) * stored, converted to half.
    """
    codes, params, values = [], [], []
    for group in x.reshape(groups, -1):
        top = np.float32(np.abs(group).max())
        scale = np.float32(1.0) if top == 0 else np.float32(256) / (np.float32(2) * top)
        q = [int(min(max(np.rint(np.float32(v) * scale), -128), 127)) for v in group]
        stored = np.float32(1) / scale
        codes.append(q)
        params.append([stored])
        values.append([np.float16(np.float32(c) * stored) for c in q])
    return np.array(codes, np.int8), np.array(params, np.float32), np.array(values, np.float16)


def test_torch_group_quantizer_is_deepspeeds_arithmetic():
    q = TorchGroupQuantizer()
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0)).half()
    x[1] = 0  # an all-zero group: scale 1
    x[2, 5] = 1.5 * x[2].abs().max()  # the group maximum maps to 128 and is clamped to 127
    x[3, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 127.5]).half() / 128 * 127.5  # ties: half to even
    codes, params = q.quantize(x, 4, 8, q.Symmetric)
    want_codes, want_params, want_values = deepspeed_kernel_oracle(x.numpy(), 4)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and params.shape == (4,)
    assert np.array_equal(codes.reshape(4, -1).numpy(), want_codes) and np.array_equal(params.numpy(), want_params.reshape(4))
    assert codes[2, 5] == 127 and not codes[1].any()
    values = q.dequantize(codes, params, 4, 8, q.Symmetric)
    assert values.dtype == torch.float16 and np.array_equal(values.reshape(4, -1).numpy(), want_values)
    with pytest.raises(NotImplementedError, match="only symmetric 8-bit"):
        q.quantize(x, 4, 4, q.Symmetric)
    if torch.cuda.is_available():  # the CUDA op itself, where it exists: bit for bit
        from deepspeed.ops.op_builder import QuantizerBuilder

        op = QuantizerBuilder().load()
        cuda_codes, cuda_params = op.quantize(x.cuda(), 4, 8, op.Symmetric)
        assert torch.equal(cuda_codes.cpu(), codes) and torch.equal(cuda_params.cpu().view(4), params)
        assert torch.equal(op.dequantize(cuda_codes, cuda_params, 4, 8, op.Symmetric).cpu(), values)


def test_deepspeed_quantizer_runs_on_the_torch_op_without_cuda():
    """DeepSpeed's CUDAQuantizer (group sizing, fp16 round trip) on top of the op provide_zero_quantizer gives it."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    assert provide_zero_quantizer() == ("cuda" if torch.cuda.is_available() else "torch")
    quantizer = CUDAQuantizer()
    weight = torch.randn(512 * 1024, generator=torch.Generator().manual_seed(0))
    codes, scales = quantizer.quantize(weight)
    assert codes.dtype == torch.int8 and codes.numel() == weight.numel() and 0 < scales.numel() <= weight.numel() // 4000
    back = quantizer.dequantize(codes, scales, dtype=torch.float32).cpu()
    group_max = weight.view(scales.numel(), -1).abs().amax(1, keepdim=True)
    error = (back.view(scales.numel(), -1) - weight.view(scales.numel(), -1)).abs()
    # rounding to the nearest of 255 steps (absmax / 256 at most) except the clamped maximum (absmax / 128),
    # plus the fp16 rounding on the way in (2^-11 relative)
    assert bool((error <= group_max / 128 + group_max * 2.0**-10).all())
    assert float(error.mean()) < float(group_max.mean()) / 400  # uniform rounding error: absmax / 512 on average


# --- dense_weight: the weight bitsandbytes multiplies by --------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_dense_weight_is_what_the_bnb_forward_uses(kind):
    """Training-mode forward == F.linear(x, dense_weight) bit for bit, before and after a forward."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = quantized_layer(kind, linear)
    prepare_quantized(nn.Sequential(layer))
    assert isinstance(layer, nn.Linear) and is_quantized(layer) and not is_quantized(linear)
    weight = dense_weight(layer)
    assert weight.dtype == torch.float32 and weight.shape == (64, 128)
    assert 0 < (weight - linear.weight).abs().max() < (0.2 if kind != "int8" else 0.01) * linear.weight.abs().max()
    x = torch.randn(5, 128, requires_grad=True)
    layer.train()
    out = layer(x)
    assert torch.equal(out, nn.functional.linear(x, weight, layer.bias.float()))
    out.sum().backward()  # bnb's backward reads the same weight (int8: through state.CB)
    assert torch.equal(x.grad, torch.ones(5, 64) @ weight)
    assert is_quantized(layer) and torch.equal(dense_weight(layer), weight)  # int8 moved SCB into layer.state


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dense_weight_of_cpu_repacked_4bit_layer(kind):
    """Without prepare_quantized an eval no-grad forward on an AVX512-BF16 CPU repacks the weight (bf16 absmax)."""
    from bitsandbytes.functional import dequantize_blockwise, has_avx512bf16

    torch.manual_seed(0)
    layer = quantized_layer(kind, nn.Linear(256, 96))
    state = layer.weight.quant_state
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    codes = layer.weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(96, 256).long()
    bf16_absmax = absmax.float().to(torch.bfloat16).float().repeat_interleave(state.blocksize).reshape(96, 256)
    expected = state.code.float()[codes] * bf16_absmax
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 256))
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    assert layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(dense_weight(layer), expected)

    kept = quantized_layer(kind, nn.Linear(256, 96))
    weight = dense_weight(kept)
    prepare_quantized(nn.Sequential(kept))
    kept.eval()
    with torch.no_grad():
        kept(torch.randn(3, 256))
    assert not getattr(kept.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dense_weight(kept), weight)


# --- planning and merging on a quantized base -------------------------------------------------------


def dequantized_copy(path: Path, quantized: nn.Module) -> nn.Module:
    """The unquantized base whose decoder linears hold dense_weight of `quantized`'s layers."""
    copy = load(path, "none")
    with torch.no_grad():
        for name in decoder_linears(quantized):
            copy.get_submodule(name).weight.copy_(dense_weight(quantized.get_submodule(name)))
    return copy


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_positions_on_quantized_base_equal_those_on_its_dequantized_copy(kind, tiny_dir):
    quantized = load(tiny_dir, kind)
    assert all(is_quantized(quantized.get_submodule(n)) for n in decoder_linears(quantized))
    copy = dequantized_copy(tiny_dir, quantized)
    on_quantized = apply_adapters(quantized, SSH)
    on_copy = apply_adapters(copy, SSH)
    assert on_quantized.plan["digest"] == on_copy.plan["digest"]
    for name, adapter in adapters_of(quantized).items():
        theirs = adapters_of(copy)[name].plan_state()
        assert isinstance(adapter.base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        for key, value in adapter.plan_state().items():
            assert torch.equal(value, theirs[key]), (name, key)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merged_logits_equal_adapted_logits(kind, tiny_dir):
    """Merged (dequantized W0 + dW, fp32) against adapted (bnb base + spectral delta) logits.

    The quantized model is first checked bit for bit against its dequantized copy (plain fp32
    linears holding dense_weight), adapted and merged: the adapted forwards are identical (bnb's
    training forward dequantizes and multiplies by exactly dense_weight) and so are the merged
    weights. What is left is the merge's own rounding, as for an unquantized base: W0 + dW rounded
    once to fp32 against W0 x and the fast-path delta (an FFT) summed, through 2 decoder layers
    and lm_head. Tolerance atol = 1e-5 (as for unquantized merges in test_adapters): each logit is
    built from dot products of length <= 128 over O(1) activations, whose fp32 rounding is bounded
    by about 128 * 6e-8 = 8e-6 and typically sqrt(128) * 6e-8 = 7e-7 (what is measured here, for
    every kind); the adapters move the logits by more than 0.1, 10^4 times the tolerance.
    int8 runs in train mode: in eval mode bnb's 8-bit forward also quantizes the activations
    (LLM.int8()), which no merged weight reproduces; 4-bit runs in eval mode, which
    prepare_quantized keeps off bitsandbytes' bf16 CPU kernel.
    """
    quantized = load(tiny_dir, kind)
    models = {"quantized": quantized, "copy": dequantized_copy(tiny_dir, quantized)}
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = quantized.train(kind == "int8")(ids).logits
    adapted, merged = {}, {}
    for key, model in models.items():
        targets = [layer["name"] for layer in apply_adapters(model, SSH).layers]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for adapter in adapters_of(model).values():
                adapter.coeffs.copy_(0.05 * torch.randn(adapter.coeffs.shape, generator=generator))
            model.train(kind == "int8")
            adapted[key] = model(ids).logits
            merge_adapters(model)
            merged[key] = model(ids).logits
        assert not adapters_of(model)
    assert torch.equal(adapted["quantized"], adapted["copy"])
    assert torch.equal(merged["quantized"], merged["copy"])
    for name in decoder_linears(quantized):
        layer = quantized.get_submodule(name)
        if name in targets:
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        else:
            assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert float((adapted["quantized"] - before).abs().max()) > 0.1
    torch.testing.assert_close(merged["quantized"], adapted["quantized"], atol=1e-5, rtol=0)


# --- measured bytes of the frozen weights -----------------------------------------------------------


def test_frozen_bytes_nf4_is_a_quarter_of_bf16_and_int8_a_half(wide_dir):
    """Measured storage bytes of the decoder linears: nf4 (with absmax/double-quant state) ~ bf16 / 4."""
    bf16 = load(wide_dir, "none", torch.bfloat16).requires_grad_(False)
    names = decoder_linears(bf16)
    reference = frozen_bytes(bf16, names)
    assert reference == {"plain": reference["total"], "packed": 0, "quant_state": 0, "partition": 0,
                         "total": sum(bf16.get_submodule(n).weight.numel() * 2 for n in names)}
    nf4 = frozen_bytes(load(wide_dir, "nf4"), names)
    int8 = frozen_bytes(load(wide_dir, "int8"), names)
    assert nf4["plain"] == int8["plain"] == 0
    assert 0 < nf4["quant_state"] < 0.05 * nf4["packed"] and 0 < int8["quant_state"] < 0.01 * int8["packed"]
    assert abs(nf4["total"] / reference["total"] - 0.25) <= 0.1 * 0.25, (nf4, reference)
    assert abs(int8["total"] / reference["total"] - 0.5) <= 0.1 * 0.5, (int8, reference)
    everything = frozen_bytes(load(wide_dir, "nf4").requires_grad_(False))
    assert everything["plain"] > 0  # embeddings, norms and lm_head stay unquantized


def _zero3_worker(model_dir: str) -> dict:
    """One rank: bf16, nf4 and int8 bases under ZeRO-3; measured bytes, gathered dense weights, a few steps."""
    import deepspeed

    from megaspec.distributed import gather_layer
    from megaspec.train.dsconfig import resolve_ds_config
    from megaspec.train.loop import build_model

    raw = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every weight, however small
    ds_config = resolve_ds_config(raw, lr=1e-2, max_steps=STEPS, warmup_steps=1, hidden_size=WIDE["hidden_size"])
    out: dict = {}

    bf16_config = {**ds_config, "bf16": {"enabled": True}}
    bf16 = build_model(model_dir, bf16_config).requires_grad_(False)  # partitioned by zero.Init
    names = decoder_linears(bf16)
    out["bf16"] = frozen_bytes(bf16, names)
    del bf16

    for kind in ("nf4", "int8"):
        model = build_model(model_dir, ds_config, kind, quant_load="whole")  # quantize on load: test_quant_load.py
        whole = {n: dense_weight(model.get_submodule(n)) for n in names}
        out[f"{kind}_loaded"] = frozen_bytes(model, names)
        apply_adapters(model, SSH)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        bases = {n: getattr(model.get_submodule(n), "base", model.get_submodule(n)) for n in names}
        out[kind] = frozen_bytes(model, names)
        out[f"{kind}_shards"] = sum(b.weight.ds_tensor.untyped_storage().nbytes() for b in bases.values())
        out[f"{kind}_data"] = sum(b.weight.data.untyped_storage().nbytes() for b in bases.values())
        same = []
        for name, base in bases.items():
            with gather_layer(base):
                same.append(torch.equal(dense_weight(base), whole[name]))
        out[f"{kind}_same"] = all(same)
        torch.manual_seed(1)
        ids = torch.randint(0, WIDE["vocab_size"], (2, 16))
        steps = []
        for _ in range(STEPS):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            steps.append(float(loss))
        out[f"{kind}_losses"] = steps
        out[f"{kind}_after_steps"] = frozen_bytes(model, names)
    return out


@pytest.mark.slow
def test_zero3_two_ranks_partition_quantized_weights(wide_dir):
    """Measured per-rank bytes under ZeRO-3 (2 ranks): packed weights sharded, quant state whole on each rank."""
    ranks = [r.value for r in run_ranks(_zero3_worker, 2, args=(str(wide_dir),), timeout=300)]
    for out in ranks:
        bf16 = out["bf16"]["partition"]
        assert out["bf16"]["total"] == bf16 > 0
        for kind, ratio in (("nf4", 0.25), ("int8", 0.5)):
            loaded, sharded = out[f"{kind}_loaded"], out[kind]
            # loaded whole on every rank (no zero.Init for quantized models), sharded by deepspeed.initialize
            assert loaded["partition"] == 0 and loaded["packed"] > 0
            assert sharded["packed"] == 0 == out[f"{kind}_data"]
            assert sharded["partition"] == out[f"{kind}_shards"] == loaded["packed"] // 2
            assert sharded["quant_state"] == loaded["quant_state"]
            assert abs(sharded["total"] / bf16 - ratio) <= 0.1 * ratio, (kind, sharded, bf16)
            assert out[f"{kind}_after_steps"] == sharded  # forwards and backwards leave nothing gathered behind
            assert out[f"{kind}_same"]  # a gathered shard dequantizes to the weight loaded whole
            assert out[f"{kind}_losses"][-1] < out[f"{kind}_losses"][0]


# --- the training job ------------------------------------------------------------------------------


def positions(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if k.endswith((".rows", ".cols"))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_training_on_one_and_two_zero3_ranks(kind, batch8_config, tmp_path):
    """`launch/train.py --quantize KIND`: the loss falls on 1 process and on 2 ZeRO-3 ranks, which agree."""
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"ranks{ranks}"
        check(run_train(["--quantize", kind, "--ds_config", str(batch8_config), "--max_steps", str(STEPS),
                         "--eval_every", str(STEPS), "--save_every", str(STEPS), "--n_coeffs", "200",
                         "--output_dir", str(runs[ranks])], ranks=ranks))
    one, two = losses(runs[1]), losses(runs[2])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for run_losses in (one, two):
        assert run_losses[STEPS] < run_losses[1] - 0.3, run_losses
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    assert positions(runs[1]).keys() == positions(runs[2]).keys()
    for key, value in positions(runs[1]).items():
        assert torch.equal(value, positions(runs[2])[key]), key
    assert json.loads((runs[2] / "train_config.json").read_text())["quantize"] == kind


def _qwz_worker(model_dir: str) -> dict:
    """One rank of ds_configs/zero3_qwz.json: int8 shards, what gathers return, planning, training, merging."""
    import deepspeed

    from megaspec.distributed import gather_params
    from megaspec.train.dsconfig import resolve_ds_config
    from megaspec.train.loop import build_model

    raw = json.loads((REPO / "ds_configs" / "zero3_qwz.json").read_text())
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config = resolve_ds_config(raw, lr=1e-2, max_steps=STEPS, warmup_steps=1, hidden_size=WIDE["hidden_size"])
    model = build_model(model_dir, ds_config)  # fp32 on CPU: bf16 "auto" resolves to off
    names = decoder_linears(model)
    weights = {n: model.get_submodule(n).weight for n in names}
    out: dict = {"int8": sorted(n for n, w in weights.items() if w.ds_tensor.dtype == torch.int8)}
    out["scaled"] = sorted(n for n, w in weights.items() if hasattr(w.ds_tensor, "ds_quant_scale"))
    out["bytes"] = {n: frozen_bytes(model, [n])["partition"] for n in names}
    out["shard_numel"] = {n: w.ds_tensor.ds_numel for n, w in weights.items()}
    with gather_params(list(weights.values())):
        whole = {n: w.detach().clone() for n, w in weights.items()}
    copy = load(Path(model_dir), "none")
    out["error"] = {}
    with torch.no_grad():
        for name in names:
            original = copy.get_submodule(name).weight
            out["error"][name] = float((whole[name] - original).abs().max() / original.abs().max())
            original.copy_(whole[name])  # the copy now holds what qwZ's gathers return

    apply_adapters(model, SSH)
    apply_adapters(copy, SSH)
    ours, theirs = adapters_of(model), adapters_of(copy)
    out["same_plan"] = all(torch.equal(v, theirs[n].plan_state()[k]) for n, a in ours.items() for k, v in a.plan_state().items())
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    torch.manual_seed(1)
    ids = torch.randint(0, WIDE["vocab_size"], (2, 16))
    out["losses"] = []
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out["losses"].append(float(loss))
    out["bytes_after"] = {n: frozen_bytes(model, [n])["partition"] for n in names}

    engine.module.eval()
    copy.eval()
    with torch.no_grad():
        adapted = engine.module(input_ids=ids).logits
        untrained = copy(input_ids=ids).logits  # zero coefficients: the base alone
        with gather_params([a.coeffs for a in ours.values()]):
            for name, adapter in ours.items():
                theirs[name].coeffs.copy_(adapter.coeffs)
        merged = merge_adapters(copy)(input_ids=ids).logits
    out["moved"] = float((adapted - untrained).abs().max())
    out["merge_error"] = float((merged - adapted).abs().max())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_qwz_int8_frozen_shards_train_plan_and_merge(ranks, wide_dir):
    """ds_configs/zero3_qwz.json with SSH (DeepSpeed's quantizer op in torch where there is no CUDA).

    DeepSpeed stores each frozen shard of >= 500k elements in int8 (here gate/up/down, 1024 x 512;
    q and v at 512 x 512 and 256 x 512 stay fp32) and every gather dequantizes it, so planning,
    training and merging all see the int8-rounded weight. Oracles: the shard bytes (1 byte per
    element plus one fp32 scale per group, a quarter of fp32), the rounding bound (absmax / 128 per
    group, fp16 on the way in), the plan of a plain copy holding the gathered weights, and that
    copy merged. The merge tolerance is the fp32 one of test_merged_logits_equal_adapted_logits
    (atol 1e-5: dot products of length <= 1024 over O(1) activations round to ~sqrt(1024) 6e-8).
    """
    out = run_ranks(_qwz_worker, ranks, args=(str(wide_dir),), timeout=400)[0].value
    mlp = sorted(f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    assert out["int8"] == out["scaled"] == mlp
    for name, error in out["error"].items():
        if name in mlp:
            numel = out["shard_numel"][name]
            assert numel * 1 < out["bytes"][name] <= numel * 1.01, (name, out["bytes"][name], numel)
            assert 2.0**-12 < error <= 1 / 128 + 2.0**-10, (name, error)
        else:
            assert out["bytes"][name] == 4 * out["shard_numel"][name] and error == 0, name
    assert out["bytes_after"] == out["bytes"]  # nothing left gathered, still int8, after forwards and backwards
    assert out["same_plan"]
    assert out["losses"][-1] < out["losses"][0] - 0.02, out["losses"]  # measured: 4.999 -> 4.947
    assert out["moved"] > 1e-3
    assert out["merge_error"] <= 1e-5, out["merge_error"]


@pytest.mark.slow
def test_qwz_config_trains_from_the_command_line_on_two_ranks(tmp_path):
    """`deepspeed launch/train.py --ds_config ds_configs/zero3_qwz.json` on 2 CPU ranks, a 512-wide model."""
    from megaspec.train.embedded import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    model_dir = save_llama(tmp_path / "model", LlamaConfig(**{**WIDE, "vocab_size": len(tokenizer), "max_position_embeddings": 128}))
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = check(run_train(["--model", str(model_dir), "--ds_config", str(REPO / "ds_configs" / "zero3_qwz.json"),
                            "--max_steps", "16", "--eval_every", "16", "--seq_len", "64", "--n_coeffs", "200", "--lr", "0.1",
                            "--target_modules", "q_proj,v_proj,gate_proj,down_proj", "--output_dir", str(out)], ranks=2))
    assert "3 frozen weight shards stored in int8" in proc.stdout, proc.stdout[-2000:]
    run_losses = losses(out)
    assert sorted(run_losses) == list(range(1, 17))
    assert run_losses[16] < run_losses[1] - 0.3, run_losses  # measured: 6.31 -> 5.08
