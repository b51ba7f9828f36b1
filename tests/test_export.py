"""Export: merged HF checkpoints (1 and 2 ranks, sharded, quantized base), peft adapters, native, generation, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megaspec.adapters import ADAPTERS, adapter_class
from megaspec.config import AdapterConfig
from megaspec.export import ExportError, export, open_run
from megaspec.export.factors import compress, residual, svd_by_rows
from megaspec.export.run import detached_adapters, load_base
from megaspec.export.sources import CheckpointSource, ModelSource
from megaspec.model import adapters_of, apply_adapters, load_adapter, save_adapter
from megaspec.spectral import dense_update
from megaspec.spectral.sparse import spectrum_factors
from megaspec.train.embedded import embedded_base
from tests.distributed import REPO, run_script
from tests.launcher import check, cpu_env, run_train

ATOL = RTOL = 1e-5
METHODS = sorted(ADAPTERS)  # every registered method exports exactly


# --- runs ----------------------------------------------------------------------------------------
def base_model():
    """The embedded base in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(embedded_base()), dtype=torch.float32).eval()


def make_run(root: Path, method: str, quantize: str = "none", **overrides) -> Path:
    """A run folder made in-process: the embedded base, the method's adapters, random non-zero parameters."""
    model = base_model()
    fields = dict(method=method, n_coeffs=100, seed=7, lora_rank=4, n_blocks=2)
    fields.update(overrides)
    if adapter_class(method).needs_calibration:  # S2FT plans from a gradient estimate
        apply_adapters(model, AdapterConfig(**fields), calibration=[{"input_ids": INPUT, "labels": INPUT}])
    else:
        apply_adapters(model, AdapterConfig(**fields))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in adapters_of(model).values():
            for p in adapter.parameters(recurse=False):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    run = root / f"{method}-{quantize}"
    save_adapter(model, run / "adapter")
    config = {"model": None, "tokenizer": None, "method": method, "quantize": quantize}
    (run / "train_config.json").write_text(json.dumps(config))
    return run


def adapted_model(run: Path, quantize: bool = False):
    """The run's base (as the run loaded it) with its adapter: the reference for every export."""
    model = load_base(open_run(run)) if quantize else base_model()
    load_adapter(model, run / "adapter")
    return model.eval()


INPUT = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=INPUT).logits.float()


def merged_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {method: make_run(root, method) for method in METHODS}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The embedded default run (SSH on the instruction task), 6 steps, through launch/train.py."""
    out = tmp_path_factory.mktemp("trained") / "run"
    check(run_train(["--max_steps", "6", "--n_coeffs", "200", "--eval_every", "0", "--output_dir", str(out)], ranks=1))
    return out


@pytest.fixture(scope="module")
def trained_merged(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "one"
    export(trained_run, out, "merged", log=None)
    return out


# --- low-rank math against dense oracles --------------------------------------------------------
@pytest.mark.parametrize("kernel", ["dht", "fourier", "dht_separable"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (64, 32), (6, 40)])
def test_spectrum_factors_are_exact_with_the_true_rank(kernel, shape):
    m, n = shape
    generator = torch.Generator().manual_seed(m + n)
    flat = torch.randperm(m * n, generator=generator)[:30]
    flat[:2] = torch.tensor([1, (m // 2) * n + 3])  # u = 0 and u = M/2: cosine only
    rows, cols = flat // n, flat % n
    coeffs = torch.randn(30, generator=generator, dtype=torch.float64)
    dense = dense_update(coeffs, rows, cols, shape, kernel)
    b, a = spectrum_factors(coeffs, rows, cols, shape, kernel)
    assert torch.allclose(b @ a, dense, atol=1e-14)
    if kernel == "dht_separable":  # cas(u) cas(v): one column per distinct u (or v)
        bound = min(torch.unique(rows).numel(), torch.unique(cols).numel())
    else:  # cos/sin pairs, u and -u sharing them
        bound = 2 * min(torch.unique(torch.minimum(rows, m - rows)).numel(), torch.unique(torch.minimum(cols, n - cols)).numel())
    assert b.shape[1] <= bound
    low = compress(b, a)
    assert low.rank == torch.linalg.matrix_rank(dense).item()
    assert torch.allclose(low.left * low.s @ low.right.T, dense, atol=1e-14)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_svd_by_rows_is_exact_and_predicts_the_truncation_residual(shape):
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(shape[0], 6, generator=generator, dtype=torch.float64) @ torch.randn(6, shape[1], generator=generator, dtype=torch.float64)
    low = svd_by_rows(lambda ids: dense[ids], shape, block=7)
    assert low.rank == 6
    b, a = low.factors()
    assert torch.allclose(b @ a, dense, atol=1e-10)
    b2, a2 = low.factors(2)
    measured = residual(lambda ids: dense[ids], b2, a2, block=5)
    assert math.isclose(measured, low.tail(2), rel_tol=1e-9)
    assert math.isclose(measured, float((dense - b2 @ a2).norm() / dense.norm()), rel_tol=1e-9)
    b8, a8 = low.factors(8)  # padded with zero columns past the exact rank
    assert b8.shape == (shape[0], 8) and torch.allclose(b8 @ a8, dense, atol=1e-10)


def test_update_rows_stay_exact_at_llama_row_counts():
    """Rows 4088..4095 of a 4096 x 64 SSH update against the dense oracle (fp32 angles 2 pi a u / M drift there)."""
    from torch import nn

    from megaspec.adapters.ssh import SSHAdapter
    from megaspec.distributed import plan_adapters
    from megaspec.export.run import update_rows

    torch.manual_seed(0)
    adapter = SSHAdapter(nn.Linear(64, 4096, bias=False), AdapterConfig(n_coeffs=50, selection="per_layer"), "layer")
    plan_adapters({"layer": adapter})
    with torch.no_grad():
        adapter.coeffs.normal_()
    ids = torch.arange(4088, 4096)
    oracle = dense_update(adapter.coeffs.detach().double() * adapter.scale, adapter.rows, adapter.cols, adapter.shape, "dht")[ids]
    assert float((update_rows(adapter)(ids) - oracle).norm() / oracle.norm()) < 1e-10


# --- merged ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merged_checkpoint_gives_the_adapted_logits(runs, method, tmp_path):
    out = tmp_path / "merged"
    report = export(runs[method], out, "merged", log=None)
    assert report["shards"] == 1 and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(merged_model(out)), logits(adapted_model(runs[method])), atol=ATOL, rtol=RTOL)


def test_merged_trained_run_loads_and_matches(trained_run, trained_merged):
    expected = logits(adapted_model(trained_run))
    torch.testing.assert_close(logits(merged_model(trained_merged)), expected, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(logits(base_model()), expected, atol=1e-3)  # the run did move the model


def test_merged_shards_and_index(runs, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    export(runs["ssh"], one, "merged", log=None)
    report = export(runs["ssh"], many, "merged", max_shard_bytes=200_000, log=None)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert report["shards"] > 2 and len(set(index["weight_map"].values())) == report["shards"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_file(str(one / "model.safetensors")).values())
    assert torch.equal(logits(merged_model(many)), logits(merged_model(one)))
    umask = os.umask(0)
    os.umask(umask)
    assert all((path.stat().st_mode & 0o777) == 0o666 & ~umask for path in many.iterdir())  # not safetensors' 0600


def test_merged_bfloat16_output(runs, tmp_path):
    out = tmp_path / "bf16"
    export(runs["ssh"], out, "merged", dtype="bfloat16", log=None)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_model_source_matches_checkpoint_source(runs, tmp_path):
    from megaspec.export.merged import write_merged

    adapters = detached_adapters(open_run(runs["ssh"]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_merged(CheckpointSource(embedded_base()), adapters, tmp_path / "a")
    write_merged(ModelSource(base_model()), adapters, tmp_path / "b")
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_from_a_quantized_base_onto_the_dequantized_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    run = make_run(tmp_path, "ssh", quantize="nf4")
    out = tmp_path / "merged"
    report = export(run, out, "merged", log=None, merge_base="dequantized")
    assert report["merge_base"] == "dequantized"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    torch.testing.assert_close(logits(merged_model(out)), logits(adapted_model(run, quantize=True)), atol=ATOL, rtol=RTOL)


def test_merged_from_a_quantized_base_defaults_to_the_original_weights(tmp_path):
    """QLoRA users merge onto the original checkpoint: the adapter on the fp32 base, not on its nf4 version."""
    pytest.importorskip("bitsandbytes")
    run = make_run(tmp_path, "ssh", quantize="nf4")
    out = tmp_path / "merged"
    report = export(run, out, "merged", log=None)
    assert report["merge_base"] == "original"
    torch.testing.assert_close(logits(merged_model(out)), logits(adapted_model(run)), atol=ATOL, rtol=RTOL)
    on_nf4 = logits(adapted_model(run, quantize=True))
    assert (logits(merged_model(out)) - on_nf4).abs().max() > 100 * ATOL  # the two bases really differ


def test_an_update_that_reads_w0_is_computed_on_the_weights_the_run_trained_against(tmp_path):
    """SMoA's dW = (B A) * W0[R, C]: merged onto the original base, W0 inside dW is still the dequantized one."""
    pytest.importorskip("bitsandbytes")
    run = make_run(tmp_path, "smoa", quantize="nf4")
    out = tmp_path / "merged"
    export(run, out, "merged", log=None, merge_base="original")
    merged = load_file(str(out / "model.safetensors"))
    original = dict(base_model().named_parameters())
    on_nf4 = adapted_model(run, quantize=True)
    for name, adapter in adapters_of(on_nf4).items():
        with torch.no_grad():
            want = original[f"{name}.weight"].detach().double() + adapter.delta_weight().double()
        torch.testing.assert_close(merged[f"{name}.weight"].double(), want, atol=1e-5, rtol=1e-5)


def test_merge_base_applies_to_merged_exports_only(tmp_path):
    run = make_run(tmp_path, "ssh")
    with pytest.raises(ExportError, match="--merge_base applies to --format merged only"):
        export(run, tmp_path / "peft", "peft", log=None, merge_base="original")
    assert not (tmp_path / "peft").exists()


@pytest.mark.slow
def test_two_rank_merged_export_equals_one_rank(trained_run, trained_merged, tmp_path):
    out = tmp_path / "two"
    argv = [str(REPO / "launch" / "export.py"), "--run", str(trained_run), "--out", str(out), "--format", "merged"]
    results = run_script(argv, world_size=2, timeout=300)
    assert "exported ssh run as merged" in results[0].stdout
    one, two = load_file(str(trained_merged / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    torch.testing.assert_close(logits(merged_model(out)), logits(adapted_model(trained_run)), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_two_rank_peft_export_equals_one_rank(runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    export(runs["smoa"], one, "peft", log=None)
    argv = [str(REPO / "launch" / "export.py"), "--run", str(runs["smoa"]), "--out", str(two), "--format", "peft"]
    run_script(argv, world_size=2, timeout=300)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- peft ------------------------------------------------------------------------------------------
def peft_model(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(), str(folder)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_peft_export_gives_the_adapted_logits(runs, method, tmp_path):
    out = tmp_path / "peft"
    report = export(runs[method], out, "peft", log=None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("FOURIERFT" if method == "fourierft" else "LORA")
    if config["peft_type"] == "LORA":
        assert config["lora_alpha"] == config["r"] or method == "lora"
        for name, layer in report["layers"].items():
            assert layer["residual"] < 1e-6, name
            assert layer["rank"] == layer["exact_rank"] == config["rank_pattern"].get(name, config["r"])
    torch.testing.assert_close(logits(peft_model(out)), logits(adapted_model(runs[method])), atol=ATOL, rtol=RTOL)


def test_ssh_exact_rank_is_at_most_twice_the_distinct_frequencies(runs, tmp_path):
    report = export(runs["ssh"], tmp_path / "peft", "peft", log=None)
    for name, adapter in detached_adapters(open_run(runs["ssh"])).items():
        (m, n), u, v = adapter.shape, adapter.rows, adapter.cols
        distinct = min(torch.unique(torch.minimum(u, m - u)).numel(), torch.unique(torch.minimum(v, n - v)).numel())
        assert report["layers"][name]["exact_rank"] <= min(2 * distinct, m, n)


def test_fourierft_exports_as_peft_fourierft_with_folded_scales(runs, tmp_path):
    out = tmp_path / "peft"
    export(runs["fourierft"], out, "peft", log=None)
    config = json.loads((out / "adapter_config.json").read_text())
    # q_proj (64x64) and v_proj (32x64) have different sqrt(M N) scales: folded into the values
    assert config["scaling"] == 1.0 and config["random_loc_seed"] == 7 and config["n_frequency"] == 100
    model = peft_model(out)
    for name, adapter in detached_adapters(open_run(runs["fourierft"])).items():
        layer = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.get_delta_weight("default"), adapter.delta_weight(), atol=1e-6, rtol=1e-5)


def test_fourierft_shared_scale_is_kept_as_peft_scaling(tmp_path):
    run = make_run(tmp_path, "fourierft", scale=150.0)
    out = tmp_path / "peft"
    export(run, out, "peft", log=None)
    assert json.loads((out / "adapter_config.json").read_text())["scaling"] == 150.0
    torch.testing.assert_close(logits(peft_model(out)), logits(adapted_model(run)), atol=ATOL, rtol=RTOL)


def test_fourierft_positions_peft_cannot_redraw_are_refused(tmp_path):
    run = make_run(tmp_path, "fourierft")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["seed"] = 8  # peft would draw randperm(seed=8); the saved positions come from seed 7
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="not peft's randperm"):
        export(run, tmp_path / "peft", "peft", log=None)
    assert not (tmp_path / "peft").exists()
    export(run, tmp_path / "lora", "peft", as_lora=True, log=None)  # as LoRA it still exports exactly
    torch.testing.assert_close(logits(peft_model(tmp_path / "lora")), logits(adapted_model(run)), atol=ATOL, rtol=RTOL)


def test_lora_exports_as_trained(runs, tmp_path):
    out = tmp_path / "peft"
    export(runs["lora"], out, "peft", log=None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16.0)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for name, adapter in detached_adapters(open_run(runs["lora"])).items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], adapter.lora_A.detach())


def test_truncated_rank_reports_the_true_residual(runs, tmp_path, capsys):
    out = tmp_path / "peft"
    export(runs["ssh"], out, "peft", lora_rank=4)
    printed_lines = capsys.readouterr().out.splitlines()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4, {})
    model = peft_model(out)
    for name, adapter in detached_adapters(open_run(runs["ssh"])).items():
        dense = adapter.delta_weight().double()
        exported = model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        measured = float((exported - dense).norm() / dense.norm())
        printed = float(next(line for line in printed_lines if name in line).rsplit("=", 1)[1])
        assert 0.01 < measured and math.isclose(measured, printed, rel_tol=1e-2), (name, measured, printed)


# --- native and generation ----------------------------------------------------------------------
def test_native_export_is_the_adapter_with_a_model_card(runs, tmp_path):
    out = tmp_path / "native"
    export(runs["ssh"], out, "megaspec", log=None)
    card = json.loads((out / "model_card.json").read_text())
    assert card["method"] == "ssh" and card["adapted_layers"] == 4
    assert (out / "adapter_model.safetensors").read_bytes() == (runs["ssh"] / "adapter" / "adapter_model.safetensors").read_bytes()
    model = base_model()
    load_adapter(model, out)
    assert torch.equal(logits(model), logits(adapted_model(runs["ssh"])))


def test_a_checkpoint_folder_exports_and_generates_like_its_adapter(runs, tmp_path):
    """An unfinished run (no adapter/ yet): --adapter names a checkpoint folder, which stands for its adapter/."""
    import shutil

    from megaspec.export.generate import load_for_inference

    run = tmp_path / "run"
    shutil.copytree(runs["ssh"], run)
    step = run / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    os.rename(run / "adapter", step / "adapter")
    with pytest.raises(ExportError, match=f"pass --adapter {step}, its latest checkpoint"):
        export(run, tmp_path / "none", "megaspec", log=None)
    export(run, tmp_path / "native", "megaspec", adapter=step, log=None)
    saved = (step / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "native" / "adapter_model.safetensors").read_bytes() == saved
    model, _ = load_for_inference(run, adapter=step)
    assert torch.equal(logits(model), logits(adapted_model(runs["ssh"])))


def test_generate_from_the_embedded_default_run(trained_run, trained_merged):
    from megaspec.export.generate import complete, load_for_inference

    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "generate.py"), "--run", str(trained_run), "--prompt", "Q: add 3 and 4\\nA:",
         "--max_new_tokens", "8", "--greedy"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300,
    )
    check(proc)
    assert proc.stdout.strip()
    merged = complete(*load_for_inference(trained_run, merged=trained_merged), "Q: add 3 and 4\nA:", 8, greedy=True)
    assert merged == proc.stdout.rstrip("\n")


# --- command line --------------------------------------------------------------------------------
def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_line_exit_2_and_no_output(runs, tmp_path):
    out = tmp_path / "out"
    cases = [
        ("--run", str(tmp_path / "missing"), "--out", str(out), "--format", "merged"),
        ("--run", str(runs["ssh"]), "--out", str(out), "--format", "onnx"),
        ("--run", str(runs["ssh"]), "--out", str(out), "--format", "merged", "--lora_rank", "4"),
    ]
    for args in cases:
        proc = export_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("export: error:"), proc.stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    out.mkdir()
    proc = export_cli("--run", str(runs["ssh"]), "--out", str(out), "--format", "megaspec")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_failed_export_leaves_no_output(runs, tmp_path, monkeypatch):
    import megaspec.export.merged as merged

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merged, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(runs["ssh"], tmp_path / "out", "merged", log=None)
    assert list(tmp_path.iterdir()) == []


def test_describe_lists_layers_in_model_order_not_as_strings():
    from megaspec.export import describe

    names = [f"model.layers.{i}.self_attn.{p}" for i in (10, 2, 0, 1, 11, 3) for p in ("v_proj", "q_proj")]
    layer = {"exact_rank": 4, "rank": 4, "how": "exact", "residual": 0.0}
    report = {"layers": {n: layer for n in names}, "relative_update": {n: 0.1 for n in names}, "method": "ssh",
              "format": "peft", "out": "out/x", "seconds": 0.0}
    lines = describe(report).splitlines()
    want = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 2, 3, 10, 11) for p in ("q_proj", "v_proj")]
    assert [ln.split()[0] for ln in lines[:12]] == want and [ln.split()[0] for ln in lines[12:24]] == want
