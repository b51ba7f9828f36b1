"""What the benchmarks share: the LLaMA shapes, each method's paper setting, meta models, tables.

Methods are read from the adapter registry at run time (megaspec.adapters.ADAPTERS), so a method
registered tomorrow shows up in every benchmark; one without an entry in PAPER_SETTINGS runs at
AdapterConfig's defaults (n_coeffs 750 or lora_rank 8, q and v).
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaspec.adapters import ADAPTERS
from megaspec.config import AdapterConfig

QV = ("q_proj", "v_proj")
QKV_MLP = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj")

# vocab, hidden, MLP, layers, heads, kv heads: the public config.json of each model
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class Setting:
    """One method at one setting: a label for tables, the method, its config fields and targets."""

    label: str
    method: str
    fields: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = QV

    def config(self, **overrides: Any) -> AdapterConfig:
        """The AdapterConfig of this setting (overrides win)."""
        return AdapterConfig(method=self.method, target_modules=list(self.targets), **{**self.fields, **overrides})


# docs/methods.md §8: the settings each paper reports for LLaMA-class models.
PAPER_SETTINGS: dict[str, list[Setting]] = {
    "ssh": [Setting("ssh n=750", "ssh", {"n_coeffs": 750})],
    "fourierft": [Setting("fourierft n=1000", "fourierft", {"n_coeffs": 1000})],
    "lora": [Setting(f"lora r={r}", "lora", {"lora_rank": r, "alpha": 2.0 * r}) for r in (8, 16, 64)],
    "spectral_a": [Setting("spectral_a r=8", "spectral_a", {"lora_rank": 8}, QKV_MLP)],
    # the Spectral^R paper has no LLM setting: the same rank and targets as Spectral^A
    "spectral_r": [Setting("spectral_r r=8", "spectral_r", {"lora_rank": 8}, QKV_MLP)],
    "smoa": [Setting("smoa r=8 K=2", "smoa", {"lora_rank": 8, "n_blocks": 2}, ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))],
    # S2FT reports against FourierFT "at the same budget" (docs/methods.md §9): n = 1000 on q,v
    "s2ft": [Setting("s2ft n=1000", "s2ft", {"n_coeffs": 1000})],
}


def registered_methods() -> list[str]:
    """The methods registered right now, in registry order."""
    return list(ADAPTERS)


def is_sparse_spectrum(method: str) -> bool:
    """Whether the method trains n spectral coefficients per layer (ssh, fourierft, s2ft, ...)."""
    return ADAPTERS[method].trains_coefficients


def default_setting(method: str) -> Setting:
    """A registered method with no paper entry: AdapterConfig defaults (q,v; n=750 or lora_rank 8)."""
    defaults = AdapterConfig()
    if is_sparse_spectrum(method):
        return Setting(f"{method} n={defaults.n_coeffs}", method, {"n_coeffs": defaults.n_coeffs})
    return Setting(f"{method} r={defaults.lora_rank}", method, {"lora_rank": defaults.lora_rank})


def paper_settings(methods: list[str] | None = None) -> list[Setting]:
    """Every registered method (or those in `methods`) at its paper setting(s)."""
    out = []
    for method in registered_methods():
        if methods is None or method in methods:
            out += PAPER_SETTINGS.get(method) or [default_setting(method)]
    return out


def parse_methods(text: str | None) -> list[str] | None:
    """'ssh,lora' -> ['ssh', 'lora']; None or 'all' -> None (no filter)."""
    if text is None or text.strip() in ("", "all"):
        return None
    return [m.strip() for m in text.split(",") if m.strip()]


def llama_config(name: str, **overrides: Any) -> Any:
    """The transformers LlamaConfig of a named model (LLAMA_CONFIGS), with overrides."""
    from transformers import LlamaConfig

    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(LLAMA_CONFIGS)}")
    return LlamaConfig(**{**LLAMA_CONFIGS[name], **overrides})


def meta_llama(config: Any) -> nn.Module:
    """A LlamaForCausalLM on the meta device: shapes only, no memory."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def decoder_linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of the seven projections of one decoder layer."""
    h, f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
    }


def machine() -> dict[str, Any]:
    """CPU model, cores, load average, threads and torch version: the header of every measurement."""
    model = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    info = {"cpu": model, "cores": os.cpu_count(), "load_avg": load,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format spec); strings left, numbers right."""
    cells = [[_cell(r.get(key), spec) for key, _, spec in columns] for r in rows]
    widths = [max([len(head)] + [len(c[i]) for c in cells]) for i, (_, head, _) in enumerate(columns)]
    left = [all(isinstance(r.get(key), str) or r.get(key) is None for r in rows) for key, _, _ in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if lf else v.rjust(w) for v, w, lf in zip(values, widths, left, strict=True)).rstrip()

    head = line([h for _, h, _ in columns])
    return "\n".join([head, "-" * len(head), *(line(c) for c in cells)])


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "bytes":
        return fmt_bytes(value)
    return format(value, spec) if spec else str(value)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a local process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank_processes(module: str, spec: dict[str, Any], world_size: int, what: str, timeout: float = 1800.0,
                       env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`python -m module SPEC` as `world_size` fresh local CPU ranks (gloo, one thread each); each rank's JSON result.

    Each rank reads SPEC (spec + "out", a temporary folder) and writes out/rank<r>.json; RuntimeError
    with every failed rank's exit code and stderr tail, naming `what`.
    """
    with tempfile.TemporaryDirectory(prefix="megaspec-ranks-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({**spec, "out": tmp}))
        base = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size), **(env or {})}
        procs = [subprocess.Popen([sys.executable, "-m", module, str(spec_path)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for r in range(world_size)]
        errors = []
        for r, proc in enumerate(procs):
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(f"rank {r} exit {proc.returncode}: {err.decode()[-2000:]}")
        if errors:
            raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world_size)]


def lr_sweep_lines(results: list[dict[str, Any]], title: str) -> str:
    """Each row's lr sweep ('label: lr: val, ...') under `title`; empty when no row swept."""
    lines = "\n".join(f"  {r['label']}: " + ", ".join(f"{lr}: {v}" for lr, v in r["sweep"].items()) for r in results if r["sweep"])
    return f"\n\n{title}\n{lines}" if lines else ""
