"""Quantize on load under ZeRO-3 (megaspec.quant_load): bit for bit the old whole load, per-rank bytes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaspec import apply_adapters
from megaspec.quant_load import CheckpointError, checkpoint_files, load_mode, streams

from .conftest import save_llama
from .distributed import REPO, run_ranks
from .launcher import run_train
from .test_quant import SSH, WIDE, decoder_linears

pytest.importorskip("bitsandbytes")

# odd widths: gate/up hold 937.5 nf4 blocks (a partial last block), int8 shards need padding
ODD = dict(vocab_size=131, hidden_size=200, intermediate_size=300, num_hidden_layers=1, num_attention_heads=5,
           num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
CHUNK = 1 << 15  # weights per read in the workers: every linear is read in 2 to 16 chunks
STEPS = 5


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    path = save_llama(tmp_path_factory.mktemp("wide") / "model", LlamaConfig(**WIDE), max_shard_size="600KB")
    assert len(list(path.glob("*.safetensors"))) > 3 and (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("odd") / "model", LlamaConfig(**ODD), torch.bfloat16, max_shard_size="600KB")


def ds_config(bf16: bool = False, name: str = "zero3.json") -> dict:
    from megaspec.train.dsconfig import resolve_ds_config

    raw = json.loads((REPO / "ds_configs" / name).read_text())
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every weight, however small
    config = resolve_ds_config(raw, lr=1e-2, max_steps=STEPS, warmup_steps=1, hidden_size=WIDE["hidden_size"])
    return {**config, "bf16": {"enabled": bf16}}


# --- which path, and its errors (no ranks needed) ----------------------------------------------------


def test_streams_only_for_zero3_quantized_local_folders(wide_dir, monkeypatch):
    monkeypatch.delenv("MEGASPEC_QUANT_LOAD", raising=False)
    zero3, zero2 = ds_config(), {"zero_optimization": {"stage": 2}}
    assert streams(str(wide_dir), zero3, "nf4") and streams(str(wide_dir), zero3, "int8")
    assert not streams(str(wide_dir), zero3, "none") and not streams(str(wide_dir), zero2, "nf4")
    assert not streams("meta-llama/Llama-3.1-8B", zero3, "nf4")  # a hub id: transformers downloads and loads it
    assert not streams(str(wide_dir), zero3, "nf4", "whole")
    monkeypatch.setenv("MEGASPEC_QUANT_LOAD", "whole")
    assert load_mode() == "whole" and not streams(str(wide_dir), zero3, "nf4")
    monkeypatch.setenv("MEGASPEC_QUANT_LOAD", "wholly")
    with pytest.raises(ValueError, match="MEGASPEC_QUANT_LOAD='wholly' is not one of auto, stream, whole"):
        load_mode()


def save_bin(path: Path, config: dict) -> Path:
    """A seeded random LLaMA as config.json + pytorch_model.bin (transformers 5 saves only safetensors)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_not_safetensors_is_one_clear_error(tmp_path):
    save_bin(tmp_path, ODD)
    with pytest.raises(CheckpointError, match=r"holds pytorch_model.bin, not safetensors: .*safe_serialization=True.*"
                                              r"MEGASPEC_QUANT_LOAD=whole") as err:
        checkpoint_files(tmp_path)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_missing_tensor_or_shard_is_one_clear_error(odd_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from megaspec.quant_load import load_quantized_zero3

    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((odd_dir / "config.json").read_text())
    tensors = {}
    for file in sorted(odd_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor model.layers.0.mlp.up_proj.weight is missing"):
        load_quantized_zero3(single, ds_config(), "nf4", torch.float32)  # before any rank is needed

    index = json.loads((odd_dir / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in odd_dir.iterdir():
        if file.name != lost:
            (partial / file.name).symlink_to(file)
    with pytest.raises(CheckpointError, match=f"names {lost}, which is not there"):
        checkpoint_files(partial)


@pytest.mark.slow
def test_cli_refuses_a_bin_checkpoint_with_exit_2(tmp_path):
    """`launch/train.py --quantize nf4` on a pytorch_model.bin folder: one line, exit 2, before any training."""
    from megaspec.train.embedded import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    model_dir = save_bin(tmp_path / "model", {**ODD, "vocab_size": len(tokenizer)})
    tokenizer.save_pretrained(model_dir)
    proc = run_train(["--model", str(model_dir), "--quantize", "nf4", "--max_steps", "2", "--seq_len", "32",
                      "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(errors) == 1 and "holds pytorch_model.bin, not safetensors" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# --- 2 ZeRO-3 ranks: the same weights and losses as the whole load, a 1/N share of the bytes ---------


def _record_reads(monkeypatch_target: object) -> list[int]:
    """Wrap quant_load._rows to record the number of weights each read brings into memory."""
    import contextlib

    sizes: list[int] = []
    original = monkeypatch_target._rows

    @contextlib.contextmanager
    def recorded(file, name, begin, end):
        with original(file, name, begin, end) as view:
            sizes.append(view.numel())
            yield view

    monkeypatch_target._rows = recorded
    return sizes


def _gathered_dense(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    from megaspec.adapters import dense_weight
    from megaspec.distributed import gather_layer

    out = {}
    for name in names:
        with gather_layer(model.get_submodule(name)) as layer:
            out[name] = dense_weight(layer).clone()
    return out


def _plain_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unquantized parameters (embeddings, norms, lm_head), gathered."""
    from megaspec.distributed import gather_params

    params = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point and not hasattr(p, "quant_state")}
    with gather_params(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _train(model: torch.nn.Module, config: dict) -> tuple[list[float], str]:
    """5 steps of SSH (planned by global selection on the loaded base): the losses, and the plan's digest."""
    import deepspeed

    digest = apply_adapters(model, SSH).plan["digest"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    torch.manual_seed(1)
    ids = torch.randint(0, WIDE["vocab_size"], (2, 16))
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses, digest


def _stream_worker(wide: str, odd: str) -> dict:
    """One rank: every kind loaded both ways; dense weights, other weights, bytes, reads, and training losses."""
    import megaspec.quant_load as quant_load
    from megaspec.export.sources import ModelSource
    from megaspec.quant import frozen_bytes
    from megaspec.train.loop import build_model

    torch.set_num_threads(1)  # thousands of small ops: 2 ranks x 2 threads on 2 cores would spin in OpenMP barriers
    quant_load.CHUNK_ELEMENTS = CHUNK
    reads = _record_reads(quant_load)
    out: dict = {"cases": {}}
    cases = [(wide, kind, False, "zero3.json") for kind in ("nf4", "fp4", "int8")]
    cases += [(wide, "nf4", True, "zero3.json"), (odd, "nf4", True, "zero3.json"), (odd, "int8", False, "zero3.json"),
              (wide, "int8", False, "zero3_offload.json")]
    for folder, kind, bf16, name in cases:
        config = ds_config(bf16, name)
        whole = build_model(folder, config, kind, quant_load="whole")
        names = decoder_linears(whole)
        want, want_plain, want_bytes = {n: _gathered_dense(whole, [n])[n] for n in names}, _plain_params(whole), frozen_bytes(whole, names)
        del whole
        reads.clear()
        model = build_model(folder, config, kind, quant_load="stream")
        case = {"reads": max(reads), "loaded": frozen_bytes(model, names), "whole": want_bytes}
        case["no_whole_data"] = all(p.data.numel() == 0 for p in model.parameters())
        case["shards"] = sum(model.get_submodule(n).weight.ds_tensor.untyped_storage().nbytes() for n in names)
        case["dense_equal"] = all(torch.equal(got, want[n]) for n, got in _gathered_dense(model, names).items())
        plain = _plain_params(model)
        case["plain_equal"] = plain.keys() == want_plain.keys() and all(torch.equal(plain[n], want_plain[n]) for n in plain)
        source = ModelSource(model)  # what export's merge reads: gathered and dequantized one tensor at a time
        case["merge_source_equal"] = all(torch.equal(source.read(f"{n}.weight", True), want[n]) for n in names)
        out["cases"][f"{Path(folder).parent.name} {kind} {'bf16' if bf16 else 'fp32'} {name}"] = case
    for kind in ("nf4", "int8"):
        for mode in ("whole", "stream"):
            out[f"{kind} {mode} losses"] = _train(build_model(wide, ds_config(), kind, quant_load=mode), ds_config())
    return out


@pytest.mark.slow
def test_two_ranks_quantize_on_load_bit_for_bit(wide_dir, odd_dir):
    """nf4, fp4, int8 (fp32 and bf16 runs, odd widths): streamed shards gather to the weights loaded whole.

    Bytes per rank, measured from tensor storages: the quantized linears' ZeRO-3 shards are half
    the packed bytes the whole load holds on every rank, the quantization state is the same, and
    no parameter keeps whole data. Reads bring at most CHUNK weights into memory at once (never a
    whole tensor). Planning and 5 training steps give the same losses as the whole load.
    """
    ranks = [r.value for r in run_ranks(_stream_worker, 2, args=(str(wide_dir), str(odd_dir)), timeout=400)]
    for out in ranks:
        for label, case in out["cases"].items():
            loaded, whole = case["loaded"], case["whole"]
            assert case["dense_equal"] and case["plain_equal"] and case["merge_source_equal"], label
            assert case["no_whole_data"] and loaded["packed"] == loaded["plain"] == 0, (label, loaded)
            assert loaded["quant_state"] == whole["quant_state"] > 0, (label, loaded, whole)
            # each of the 7 shards is ceil(numel / 2) elements: half the whole packed bytes, up to one element of padding
            assert 0 <= case["shards"] - whole["packed"] / 2 <= 7 * 4, (label, case["shards"], whole)
            assert loaded["partition"] == case["shards"], label
            assert case["reads"] <= CHUNK, (label, case["reads"])
        for kind in ("nf4", "int8"):
            (stream, stream_plan), (whole_losses, whole_plan) = out[f"{kind} stream losses"], out[f"{kind} whole losses"]
            assert stream_plan == whole_plan, kind  # the same positions chosen
            assert stream == whole_losses, (kind, stream, whole_losses)
            assert stream[-1] < stream[0]
    assert ranks[0]["nf4 stream losses"] == ranks[1]["nf4 stream losses"]

