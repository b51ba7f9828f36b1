"""Benchmarks: every subcommand runs on tiny sizes and prints its rows; the memory formula against measured bytes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megaspec.adapters import ADAPTERS
from megaspec.benchmarks import load, memory, overhead, params, quality, selection, throughput
from megaspec.benchmarks.common import meta_llama, paper_settings, table

from .distributed import REPO

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_registered_method_has_a_setting():
    assert {s.method for s in paper_settings()} == set(ADAPTERS)


def test_params_reproduce_the_ssh_paper_count():
    rows = params.run(["llama-3.1-8b"], ["ssh", "lora"])
    by_label = {r["setting"]: r for r in rows}
    assert by_label["ssh n=750"]["trainable"] == 48_000  # SSH abstract: 0.048 M for LLaMA-3.1-8B
    assert by_label["lora r=8"]["trainable"] == 3_407_872  # docs/methods.md §8
    assert by_label["lora r=64"]["trainable"] == 27_262_976
    assert by_label["ssh n=750"]["vs_lora8_qv"] == pytest.approx(48_000 / 3_407_872)
    text = table(rows, params.COLUMNS)
    assert "ssh n=750" in text and "48,000" in text


def test_params_cli_json():
    result = bench_cli("params", "--models", "llama-3.1-8b", "--methods", "ssh", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["command"][2] == "params" and out["machine"]["cores"] >= 1
    assert [r["trainable"] for r in out["result"]] == [48_000]


def test_overhead_rows_on_a_small_layer():
    rows = overhead.run((64, 128), tokens=16, reps=1, warmup=0, device="cpu", dtype=torch.float32)
    names = [r["variant"] for r in rows]
    assert names[0] == overhead.BASE
    for expected in ("megaspec ssh n=750 (fast)", "megaspec ssh n=750 (dense path)", "peft lora r=8", "peft lora r=16",
                     "peft lora r=64", "peft fourierft n=1000"):
        assert expected in names
    assert {r["method"] for r in rows} >= set(ADAPTERS)  # every registered method got a row
    assert rows[0]["ratio_to_base"] == 1.0 and all(r["median_ms"] > 0 for r in rows)
    assert rows[0]["branch_overhead_ms"] == 0.0 and all(r["branch_median_ms"] > 0 for r in rows)
    assert "ovh / peft LoRA16 ovh" in overhead.format_table(rows) and "branch ovh ms" in overhead.format_table(rows)


def test_op_counts_of_the_frozen_linear_and_the_fast_path(monkeypatch):
    """+ops: the frozen linear alone dispatches exactly 2 ops (forward mm, input-gradient mm); SSH's fast path
    stays within 27 (10 forward and 13 backward ops, the adapter's scale, add and scale gradient), where
    building its index every step dispatched 95; LoRA r=16 dispatches the same in megaspec and in peft."""
    monkeypatch.setattr("megaspec.spectral.sparse.DENSE_CROSSOVER", 0)  # the fast path, as at real sizes
    rows = overhead.run((64, 128), tokens=16, reps=1, warmup=0, device="cpu", dtype=torch.float32,
                        methods=["ssh", "lora", "peft_lora"], modes=("branch",))
    by_name = {r["variant"]: r for r in rows}
    assert by_name[overhead.BASE]["ops"] == 2 and by_name[overhead.BASE]["extra_ops"] == 0
    assert 0 < by_name["megaspec ssh n=750 (fast)"]["extra_ops"] <= 27
    assert by_name["megaspec lora r=16"]["extra_ops"] == by_name["peft lora r=16"]["extra_ops"] > 0
    assert "+ops" in overhead.format_table(rows)


def test_branch_only_takes_out_the_frozen_matmul_and_puts_it_back():
    """In branch mode a variant computes exactly its adapter's share of the output and of the input gradient."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=False).requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    for v in overhead.variants(base, ["ssh", "lora", "smoa", "peft_lora", "peft_fourierft"]):
        full = v.module(x)
        with overhead.branch_only(v.module, base.weight) as branch:
            branch_out = branch(x)
        torch.testing.assert_close(branch_out, full - base(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.module(x), full)  # the frozen linear is back
        if v.method == "base":
            assert torch.count_nonzero(branch_out) == 0
        else:
            assert torch.count_nonzero(branch_out) > 0  # the adapters are non-zero


def test_overhead_variants_filter_keeps_the_base_and_the_matching_rows():
    """--variants REGEX times only the matching rows (not building the others) next to the frozen base."""
    rows = overhead.run((64, 128), tokens=8, reps=2, warmup=0, device="cpu", dtype=torch.float32,
                        modes=("branch",), only=r"ssh n=750 \(fast|peft lora r=16")
    assert [r["variant"] for r in rows] == [overhead.BASE, "megaspec ssh n=750 (fast)", "peft lora r=16"]
    assert all(0 < r["branch_min_ms"] <= r["branch_median_ms"] for r in rows) and "branch min ms" in overhead.format_table(rows)
    result = bench_cli("overhead", "--variants", "ssh (")
    assert result.returncode == 2 and "'ssh (' is not a regular expression" in result.stderr


def test_overhead_branch_mode_alone():
    rows = overhead.run((64, 128), tokens=8, reps=1, warmup=0, device="cpu", dtype=torch.float32,
                        methods=["ssh"], modes=("branch",))
    assert all("median_ms" not in r and r["branch_median_ms"] > 0 for r in rows)
    assert "branch ovh ms" in overhead.format_table(rows) and "x base" not in overhead.format_table(rows)
    result = bench_cli("overhead", "--modes", "branch,nope")
    assert result.returncode == 2 and "use full, branch or full,branch" in result.stderr


def test_overhead_methods_filter_and_bf16():
    rows = overhead.run((64, 128), tokens=8, reps=1, warmup=0, device="cpu", dtype=torch.bfloat16, methods=["lora", "peft_lora"])
    assert [r["variant"] for r in rows] == [overhead.BASE, "megaspec lora r=16", "peft lora r=8", "peft lora r=16", "peft lora r=64"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}


def test_crossover_cli_times_both_paths():
    result = bench_cli("crossover", "--shapes", "32x32,300x260", "--n", "8,2000", "--tokens", "16", "--reps", "1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["result"]
    assert [(r["shape"], r["n"]) for r in rows] == [("32x32", 8), ("300x260", 8), ("300x260", 2000)]  # n < M N only
    for r in rows:
        m, n_in = (int(v) for v in r["shape"].split("x"))
        assert r["ratio"] == m * n_in / (r["n"] + m + n_in) and r["fast_ms"] > 0 and r["dense_ms"] > 0
        assert r["auto"] == ("fast" if r["ratio"] > 64 else "dense")
        assert r["auto_cost"] == (r["fast_ms"] if r["auto"] == "fast" else r["dense_ms"]) / min(r["fast_ms"], r["dense_ms"])


def test_synthetic_svd_has_the_real_shapes():
    a = torch.randn(6, 4, dtype=torch.float64)
    real = torch.linalg.svd(a, full_matrices=False)
    with overhead.synthetic_svd():
        fake = torch.linalg.svd(a, full_matrices=False)
    assert [t.shape for t in fake] == [t.shape for t in real] and torch.linalg.svd is not None
    assert torch.allclose(torch.linalg.svd(a, full_matrices=False)[1], real[1])  # restored


def test_memory_rows_and_bf16_formula_is_two_bytes_per_parameter():
    result = memory.run(["llama-3.1-8b"], ("bf16", "nf4"), (1, 8), micro_batch=1, seq_len=64, methods=["ssh", "lora"], **TINY)
    assert [(r["precision"], r["world_size"]) for r in result["base"]] == [("bf16", 1), ("bf16", 8), ("nf4", 1), ("nf4", 8)]
    model = meta_llama(memory.llama_config("llama-3.1-8b", **TINY))
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert result["base"][0]["base_per_rank"] == 2 * n_params + buffers
    assert result["base"][3]["quant_state"] == result["base"][2]["quant_state"] > 0  # never partitioned
    assert {r["setting"] for r in result["adapters"]} == {"ssh n=750", "lora r=8", "lora r=16", "lora r=64"}
    text = memory.format_table(result)
    assert "frozen base/rank" in text and "ssh n=750" in text


def test_memory_formula_matches_measured_bytes_on_tiny_models():
    pytest.importorskip("bitsandbytes")
    rows = memory.validate()
    assert len(rows) == 8  # fp32, bf16, nf4, nf4-dq, int8 storage; three activation checks
    for row in rows:
        assert abs(row["rel_error"]) < 0.02, row
    nf4 = next(r for r in rows if r["what"].endswith(", nf4"))
    assert nf4["linear_bytes_per_param"] == pytest.approx(0.5 + 4 / 64, abs=0.002)  # one fp32 absmax per 64


def test_memory_load_peak_is_the_base_share_plus_the_largest_tensor():
    result = memory.run(["llama-3-70b"], ("bf16", "nf4", "nf4-dq", "int8"), (1, 8), methods=["ssh"])
    rows = {(r["precision"], r["world_size"]): r for r in result["base"]}
    embedding = 2 * 128256 * 8192  # the largest LLaMA-3-70B tensor, bf16
    for precision in ("bf16", "nf4-dq", "int8"):
        assert rows[precision, 8]["load_peak"] == rows[precision, 8]["base_per_rank"] + embedding
    assert rows["nf4", 8]["load_peak"] is None and rows["bf16", 8]["whole_load"] is None  # no megaspec load path
    assert rows["nf4-dq", 8]["whole_load"] == rows["nf4-dq", 1]["base_per_rank"]  # the old load: all of it per rank
    assert rows["nf4-dq", 8]["load_peak"] < 8e9  # issue 16's target


def test_load_checkpoint_writer_shards_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = load.write_checkpoint(tmp_path / "ckpt", {**load.SYNTHETIC, **TINY}, shard_bytes=200_000)
    stats = load.checkpoint_stats(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["bytes"] == 2 * stats["params"] and stats["largest_tensor"] == 2 * 512 * 128 and stats["shards"] > 2
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.bfloat16))


@pytest.mark.slow
def test_load_bench_rows_on_one_rank(tmp_path):
    """`bench load` on a tiny model: quantize on load holds shards and quant state only; the bound is computed from them."""
    pytest.importorskip("bitsandbytes")
    result = load.run((1,), ("nf4",), ("stream",), {**TINY, "intermediate_size": 512}, str(tmp_path))
    (row,) = result["rows"]
    assert row["path"] == "stream" and row["whole"] == 0 and row["shards"] > 0 and row["quant_state"] > 0
    assert 0 < row["peak"] and row["bound"] == row["shards"] + row["quant_state"] + result["checkpoint"]["largest_tensor"]
    assert "peak/bound" in load.format_table(result)


def test_selection_layer_and_combine_tables():
    result = selection.run("llama-3-70b", n_coeffs=50, world_sizes=(1, 2), threads=1, rank_sizes=(), **TINY)
    assert {r["shape"] for r in result["layer"]} == {"128x128", "64x128", "256x128", "128x256"}
    assert all(r["plan_layer_s"] > 0 and r["k"] == math.floor(0.5 * 50 * 14) for r in result["layer"])
    by = {(r["targets"], r["world_size"]): r for r in result["model"]}
    # only the picks travel (energy ratio 0.5 of 50 x 14 layers), not every layer's top 350
    assert by[("all 7", 1)]["allgather_received"] == 350 * selection.CANDIDATE_BYTES
    assert by[("all 7", 1)]["before_received"] == 14 * 350 * selection.CANDIDATE_BYTES
    assert by[("all 7", 2)]["max_rank_s"] <= by[("all 7", 1)]["max_rank_s"]
    assert [r["coefficients"] for r in result["combine"]] == [4 * 50, 14 * 50]
    qv, every = result["combine"]
    assert qv["received_bytes"] == math.floor(0.5 * 50 * 4) * selection.CANDIDATE_BYTES
    assert every["received_bytes"] == 350 * selection.CANDIDATE_BYTES
    # held while planning: the floors and top `take`, plus the newest layer's 350 before it shrinks
    assert every["candidates"] == 14 * 350 and every["held"] <= 2 * 350
    assert "plan_layer s" in selection.format_table(result)


@pytest.mark.slow
def test_selection_zero3_ranks_agree():
    rows = selection.ranks_run(2, layers=2, width=128, n_coeffs=20)
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["digest"] == rows[1]["digest"]
    assert sum(r["planned_here"] for r in rows) == 2


def test_quality_smoke():
    results = quality.run(steps=2, seeds=(0, 1), methods=["ssh", "lora", "peft_lora"], lrs=(1e-2,), jobs=1, threads=1)
    labels = [r["label"] for r in results]
    assert labels[0] == "base model, no fine-tuning" and "lora r=8" in labels and "peft lora r=8" in labels
    assert any(label.startswith("ssh n=") and "1/100" in label for label in labels)
    lora = next(r for r in results if r["label"] == "lora r=8")
    ssh_small = next(r for r in results if r["label"].startswith("ssh n=") and "1/100" in r["label"])
    assert lora["trainable"] == 3584 and ssh_small["trainable"] * 100 <= lora["trainable"]
    curve = [r for r in results if r["label"].startswith("ssh n=")]
    assert [r["label"].split("(")[1] for r in curve] == ["<= 1/100 LoRA8)", "<= 1/30 LoRA8)", "<= 1/10 LoRA8)", "<= 1/3 LoRA8)", "= LoRA8)"]
    for r, k in zip(curve, (100, 30, 10, 3, 1), strict=True):
        assert r["trainable"] * k <= lora["trainable"] < (r["trainable"] + 4) * k  # n per layer floored, 4 layers
    assert all(math.isfinite(r["test_mean"]) and len(r["tests"]) in (1, 2) for r in results)
    assert "test loss mean" in quality.format_table(results)


def test_throughput_without_cuda_exits_2_with_one_line(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = bench_cli("throughput")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"bench: error: {throughput.NO_CUDA}"), result.stderr


def test_throughput_runs_on_cpu_for_a_tiny_model():
    rows = throughput.run(layers=2, batch=1, seq_len=16, steps=1, warmup=0, device="cpu", peak_tflops=1.0,
                          **{**TINY, "num_hidden_layers": 3})
    assert [r["setting"] for r in rows] == ["frozen only", "ssh n=750", "lora r=16"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["flops_per_token_6N"] > r["flops_per_token_4N"] > 0
    assert "MFU 4N" in throughput.format_table(rows)


def test_throughput_in_the_trainers_zero3_engine_on_cpu():
    """zero.Init + a ZeRO-3 engine (AdamW on the adapters) times, and counts N like plain PyTorch."""
    from megaspec.train.dsconfig import read_ds_config

    kwargs = dict(layers=2, batch=1, seq_len=16, steps=2, warmup=1, device="cpu", dtype=torch.float32, peak_tflops=1.0,
                  **{**TINY, "num_hidden_layers": 3})
    plain = throughput.run(**kwargs)
    zero3 = throughput.run(**kwargs, ds_config=read_ds_config(REPO / "ds_configs" / "zero3.json"))
    assert [r["engine"] for r in zero3] == ["zero3"] * 3 and [r["engine"] for r in plain] == ["plain"] * 3
    # q, v of 2 layers: SSH 750 each (global budget); LoRA r=16 on q 128x128 and v 64x128
    assert [r["trainable"] for r in plain] == [0, 750 * 4, 2 * 16 * (256 + 192)]
    # the engine's frozen row trains the final norm (128) so that it runs the same engine step
    assert [r["trainable"] for r in zero3] == [128, 750 * 4, 2 * 16 * (256 + 192)]
    for p, z in zip(plain, zero3, strict=True):
        assert z["setting"] == p["setting"] and z["tokens_per_s"] > 0
        assert z["flops_per_token_6N"] == p["flops_per_token_6N"]  # N counted through ZeRO-3's empty local tensors


def test_throughput_reports_a_bad_ds_config_in_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    result = bench_cli("throughput", "--ds_config", str(tmp_path / "bad.json"))
    assert result.returncode == 2 and "is not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_events_sizes_add_up_on_a_small_model():
    from megaspec.benchmarks import events

    r = events.run(layers=2, hidden=64, steps=2, image_every=1, n_coeffs=8)
    # step 0 allocation; steps 1 and 2: up to 6 spectrum images (4 adapted layers) + one growth heatmap each
    assert r["images"] == 1 + 2 * (4 + 1)
    assert r["spectrum_bytes"] + r["growth_bytes"] + r["allocation_bytes"] == r["image_bytes"] <= r["event_bytes"]
    assert r["report_bytes"] > r["allocation_bytes"]


def test_packing_bench_times_the_same_tokens_both_ways():
    from megaspec.benchmarks import packing

    r = packing.run(seq_len=64, batch=2, steps=1, records=40)
    naive, isolated = r["rows"]
    assert (naive["packing"], isolated["packing"]) == ("naive", "isolated")
    # 2 blocks of 64 tokens per step, so tokens/s x s/step is 128 for both
    assert naive["tokens_per_s"] * naive["step_s"] == pytest.approx(128) == isolated["tokens_per_s"] * isolated["step_s"]
    assert r["isolated_over_naive"] == pytest.approx(isolated["tokens_per_s"] / naive["tokens_per_s"])
    assert r["docs_per_block"] > 1  # several documents share a block: the case isolation is for
    assert "isolated / naive tokens/s" in packing.format_table(r)


def test_s2ft_paper_setting_is_fourierfts_budget():
    """README's methods table, docs/methods.md §8 and PAPER_SETTINGS agree: S2FT n = 1000 on q,v, 64,000 on LLaMA-3.1-8B."""
    rows = params.run(["llama-3.1-8b"], ["s2ft"])
    assert [(r["setting"], r["trainable"]) for r in rows] == [("s2ft n=1000", 64_000)]
    assert "| S2FT n = 1000 on q,v | 64,000 |" in (REPO / "README.md").read_text()
    assert "| llama-3.1-8b | s2ft n=1000 | q,v | 64,000 |" in (REPO / "BENCHMARKS.md").read_text()
