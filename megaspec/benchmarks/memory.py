"""Per-rank memory of a ZeRO-3 run, from the model config: frozen base, activations, adapter state.

Frozen base (bytes, from a meta-device model; "linear" = every nn.Linear that bitsandbytes replaces,
i.e. all decoder projections; embeddings, norms and lm_head stay bf16):

    bf16     2 per parameter
    nf4      packed codes ceil(P/2) + absmax 4*ceil(P/64) (one fp32 per block of 64) + 64 (16-entry fp32 code)
    nf4-dq   packed ceil(P/2) + absmax ceil(P/64) (uint8) + 4*ceil(ceil(P/64)/256) (fp32 absmax of the absmax)
             + 1024 (256-entry fp32 code) + 64 + 4 (offset): what megaspec's --quantize nf4 loads
    int8     P + 4*out_features (one fp32 SCB per output row)

ZeRO-3 divides parameters by the world size W, except those below the persistence threshold (10*h,
megaspec's dsconfig default: the norms), which stay whole on every rank. The quantization state
(absmax, code tables, SCB) is not a parameter: it is never partitioned, every rank holds all of it.

Activations, bf16, T = micro_batch * seq_len tokens per rank, bytes saved for backward (measured
layer by layer with saved_tensors_hooks; validated below). With gradient checkpointing on every
decoder layer:

    checkpoints       L * 2h * T                                   each layer's input hidden state
    head              (4h + 4 + 4V + 8) * T                        final RMSNorm (fp32 copy + rsqrt), fp32 log-softmax, labels
    layer recompute   (8h + 8 + 4q + 4kv + 4*heads + 4*head_dim + 6f) * T
                      two RMSNorms (fp32 copy + rsqrt each), q and k after RoPE, v, attention output and
                      its fp32 log-sum-exp, RoPE cos/sin, SwiGLU gate, up and silu(gate)

Without it, every layer keeps its saved tensors: L * layer recompute - (L - 1) * 4*head_dim*T (one
RoPE cos/sin shared by all layers), plus the head. Which of the two a row shows follows the
trainer's rule (megaspec.train.activations: `auto` is on above 1B parameters) unless overridden.

Frozen projections save no input (their weights need no gradient); transient buffers of the
backward (gradients flowing through a layer, the logits before the fp32 upcast) are not counted, and
adapters add their own saved tensors (LoRA: its input, 2h per token per adapted linear; SSH: 8n).

Adapter state (bf16 mixed precision, DeepSpeed's layout): parameters 2 B (whole on every rank below
the persistence threshold, else /W) + gradients 2 B / W + fp32 master weights and Adam m, v 12 B / W.

Loading the base (nf4-dq, int8: megaspec's --quantize under ZeRO-3, megaspec.quant_load; bf16:
transformers' zero.Init): peak per rank <= frozen base/rank + the largest checkpoint tensor in bf16
(the embedding or lm_head, 2 * V * h), the bound that `bench load` checks against measured peaks.
The old whole load kept the whole quantized base on every rank: frozen base/rank at W = 1.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megaspec.benchmarks.common import LLAMA_CONFIGS, Setting, llama_config, meta_llama, paper_settings, table
from megaspec.model import apply_adapters
from megaspec.train.activations import count_parameters, use_checkpointing

PRECISIONS = ("bf16", "nf4", "nf4-dq", "int8")
LOADS = ("bf16", "nf4-dq", "int8")  # loaded partitioned: zero.Init (bf16), quantize on load (--quantize nf4, int8)
WORLD_SIZES = (1, 2, 8, 16, 64)
SKIP_QUANTIZE = ("lm_head",)  # transformers keeps the output layer unquantized
NF4_BLOCK, NESTED_BLOCK = 64, 256


@dataclass
class Inventory:
    """The parameters of a model by kind: quantizable linears (out, in) and everything else (numel)."""

    linears: list[tuple[int, int]] = field(default_factory=list)
    plain: list[int] = field(default_factory=list)
    buffer_bytes: int = 0  # RoPE frequencies: never partitioned, whole on every rank


def inventory(model: nn.Module) -> Inventory:
    """Split the model's parameters as bitsandbytes would: decoder linears vs the rest."""
    inv = Inventory()
    linear_weights = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIP_QUANTIZE:
            inv.linears.append((module.out_features, module.in_features))
            linear_weights.add(id(module.weight))
    seen = set()
    for p in model.parameters():
        if id(p) not in linear_weights and id(p) not in seen:
            seen.add(id(p))
            inv.plain.append(p.numel())
    inv.buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return inv


def linear_bytes(out_features: int, in_features: int, precision: str, dtype_bytes: int = 2) -> tuple[int, int]:
    """(partitionable bytes, quantization-state bytes) of one linear weight at `precision`."""
    p = out_features * in_features
    if precision in ("bf16", "fp32"):
        return p * dtype_bytes, 0
    if precision == "nf4":
        return math.ceil(p / 2), 4 * math.ceil(p / NF4_BLOCK) + 16 * 4
    if precision == "nf4-dq":
        blocks = math.ceil(p / NF4_BLOCK)
        return math.ceil(p / 2), blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 16 * 4 + 4
    if precision == "int8":
        return p, 4 * out_features
    raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")


def base_bytes(inv: Inventory, precision: str, world_size: int, persistence: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Per-rank bytes of the frozen base: partitioned share, whole small params, quantization state."""
    sharded, whole, state = 0.0, float(inv.buffer_bytes), 0.0
    for out_f, in_f in inv.linears:
        packed, quant = linear_bytes(out_f, in_f, precision, dtype_bytes)
        if out_f * in_f < persistence:
            whole += packed
        else:
            sharded += packed
        state += quant
    for numel in inv.plain:
        if numel < persistence:
            whole += numel * dtype_bytes
        else:
            sharded += numel * dtype_bytes
    per_rank = sharded / world_size + whole + state
    return {"sharded": sharded, "whole": whole, "quant_state": state, "per_rank": per_rank}


def activation_bytes(config: Any, tokens: int, act_bytes: int = 2, checkpointing: bool = True) -> dict[str, int]:
    """Saved-for-backward bytes per rank, with or without gradient checkpointing (formula in the module docstring).

    "layers" is what the decoder layers hold at once: one layer's recompute with checkpointing, every
    layer's saved tensors without.
    """
    h, f, n_layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    head = (4 * h + 4 + 4 * vocab + 8) * tokens
    layer = (8 * h + 8 + 2 * act_bytes * (q + kv) + 4 * heads + 2 * act_bytes * head_dim + 3 * act_bytes * f) * tokens
    if checkpointing:
        checkpoints, layers = n_layers * act_bytes * h * tokens, layer
    else:
        rope = 2 * act_bytes * head_dim * tokens  # cos and sin, computed once and saved by every layer
        checkpoints, layers = 0, n_layers * layer - (n_layers - 1) * rope
    return {"checkpoints": checkpoints, "head": head, "layer_recompute": layer, "layers": layers,
            "total": checkpoints + head + layers}


def adapter_bytes(numels: list[int], world_size: int, persistence: int) -> float:
    """Per-rank bytes of trainable adapter state (bf16 params and grads, fp32 master + Adam m, v)."""
    total = 0.0
    for numel in numels:
        total += 2 * numel if numel < persistence else 2 * numel / world_size
        total += 14 * numel / world_size
    return total


def adapter_numels(config: Any, setting: Setting) -> list[int]:
    """Sizes of every trainable adapter tensor of `setting` on a meta-device model."""
    model = meta_llama(config)
    apply_adapters(model, setting.config())
    return [p.numel() for p in model.parameters() if p.requires_grad]


def run(
    models: list[str] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    world_sizes: tuple[int, ...] = WORLD_SIZES,
    micro_batch: int = 1,
    seq_len: int = 4096,
    methods: list[str] | None = None,
    gradient_checkpointing: str = "auto",
    **config_overrides: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Per-rank bytes: {"base": one row per (model, precision, W), "adapters": one row per (model, setting)}.

    Activations are with or without checkpointing as the trainer decides for the model
    (`gradient_checkpointing`: auto, on, off, as --gradient_checkpointing). Each base row's total
    adds the adapter state of SSH n=750 (or of the first setting when SSH is not selected) to the
    frozen base and the activations.
    """
    settings = paper_settings(methods)
    base_rows, adapter_rows = [], []
    for name in models or list(LLAMA_CONFIGS):
        config = llama_config(name, **config_overrides)
        persistence = 10 * config.hidden_size
        inv = inventory(meta_llama(config))
        tokens = micro_batch * seq_len
        checkpointing, _ = use_checkpointing(gradient_checkpointing, count_parameters(config))
        acts = activation_bytes(config, tokens, checkpointing=checkpointing)
        per_setting = {}
        for setting in settings:
            numels = adapter_numels(config, setting)
            per_setting[setting.label] = {w: adapter_bytes(numels, w, persistence) for w in world_sizes}
            adapter_rows.append({"model": name, "setting": setting.label, "trainable": sum(numels),
                                 **{f"W={w}": per_setting[setting.label][w] for w in world_sizes}})
        total_with = next((label for label in per_setting if label.startswith("ssh")), next(iter(per_setting), None))
        largest = 2 * max([o * i for o, i in inv.linears] + inv.plain)  # the largest checkpoint tensor, bf16
        for precision in precisions:
            whole_load = base_bytes(inv, precision, 1, persistence)["per_rank"] if precision in ("nf4-dq", "int8") else None
            for world in world_sizes:
                base = base_bytes(inv, precision, world, persistence)
                load = base["per_rank"] + largest if precision in LOADS else None
                adapter = per_setting[total_with][world] if total_with else 0.0
                base_rows.append({
                    "model": name, "precision": precision, "world_size": world, "tokens": tokens,
                    "base_per_rank": base["per_rank"], "quant_state": base["quant_state"],
                    "checkpointing": "on" if checkpointing else "off",
                    "act_checkpoints": acts["checkpoints"], "act_head": acts["head"], "act_layer": acts["layers"],
                    "activations": acts["total"], "adapter_setting": total_with, "adapter_state": adapter,
                    "total": base["per_rank"] + acts["total"] + adapter,
                    "load_peak": load, "whole_load": whole_load,
                })
    return {"base": base_rows, "adapters": adapter_rows}


BASE_COLUMNS = [
    ("model", "model", ""), ("precision", "precision", ""), ("world_size", "W", "d"),
    ("base_per_rank", "frozen base/rank", "bytes"), ("quant_state", "of which quant state (whole)", "bytes"),
    ("checkpointing", "grad ckpt", ""), ("act_checkpoints", "act: ckpt", "bytes"), ("act_head", "act: head", "bytes"),
    ("act_layer", "act: layers", "bytes"),
    ("adapter_setting", "adapter", ""), ("adapter_state", "adapter state", "bytes"), ("total", "total/rank", "bytes"),
    ("load_peak", "load peak/rank", "bytes"), ("whole_load", "old whole load/rank", "bytes"),
]


def format_table(result: dict[str, list[dict[str, Any]]]) -> str:
    """The base/activation table, then the adapter-state table (bytes per rank by world size)."""
    adapters = result["adapters"]
    worlds = [k for k in (adapters[0] if adapters else {}) if k.startswith("W=")]
    adapter_columns = [("model", "model", ""), ("setting", "setting", ""), ("trainable", "trainable", ",d")]
    adapter_columns += [(w, f"state/rank {w}", "bytes") for w in worlds]
    return table(result["base"], BASE_COLUMNS) + "\n\nadapter state (bf16 params + grads, fp32 master + Adam m, v)\n" + table(adapters, adapter_columns)


# --- validation on tiny real models ----------------------------------------------------------------


def _quant_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor hanging off a bnb weight: QuantState (nested too), CB and SCB."""
    state = getattr(obj, "quant_state", None)
    while state is not None:
        for key in ("absmax", "code", "offset"):
            value = getattr(state, key, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    for key in ("CB", "SCB"):
        value = getattr(obj, key, None)
        if isinstance(value, torch.Tensor):
            yield value


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage behind the model's parameters, buffers and quantization state."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for p in module.parameters(recurse=False):
            tensors += list(_quant_tensors(p))
        tensors += list(_quant_tensors(getattr(module, "state", None)))
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def tiny_config(**overrides: Any) -> Any:
    """The validation model: hidden 256, 3 layers, GQA (k/v 128 x 256), vocab 512."""
    from transformers import LlamaConfig

    base = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **overrides})


def _bnb_config(precision: str) -> Any:
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "nf4":  # bitsandbytes defaults: uint8 storage, fp32 absmax
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(  # megaspec.quant.bnb_config("nf4", bf16)
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_use_double_quant=True,
    )


def build_tiny(precision: str, config: Any) -> nn.Module:
    """A real tiny LLaMA at `precision` (fp32, bf16; nf4, nf4-dq, int8 via from_pretrained + bitsandbytes on CPU)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if precision == "fp32":
        return model
    quantization = None if precision == "bf16" else _bnb_config(precision)
    with tempfile.TemporaryDirectory(prefix="megaspec-mem-") as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        return LlamaForCausalLM.from_pretrained(tmp, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu")


def _saved_bytes(fn: Any, exclude: set[int]) -> int:
    """Bytes of distinct storages that autograd saves while running fn(), minus `exclude` storages."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measured_activations(config: Any, micro_batch: int = 2, seq_len: int = 64) -> dict[str, int]:
    """Saved bytes of a real bf16 tiny model: whole model with checkpointing, and one layer's forward."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    model.config.use_cache = False
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(micro_batch, seq_len, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq_len)[None].expand(micro_batch, seq_len)
    rope = model.model.rotary_emb(x, positions)
    inputs = params | {x.untyped_storage().data_ptr()}
    layer = _saved_bytes(lambda: model.model.layers[0](x, position_embeddings=rope, attention_mask=None), inputs)
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    model.enable_input_require_grads()  # as checkpointing does below: the same graph, every layer saved
    plain = _saved_bytes(lambda: model(input_ids=ids, labels=ids), params)
    # checkpointing on: each layer keeps only its input; the recompute is what `layer` measured
    with warnings.catch_warnings():  # transformers 5 renamed it (FutureWarning); the old name works in 4.x too
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    whole = _saved_bytes(lambda: model(input_ids=ids, labels=ids), params)
    return {"whole_model": whole, "layer_recompute": layer, "whole_model_no_ckpt": plain}


def validate(precisions: tuple[str, ...] = ("fp32", "bf16", *PRECISIONS[1:]), config: Any = None) -> list[dict[str, Any]]:
    """Formula vs measured bytes on tiny real models: storage per precision, then saved activations."""
    config = config or tiny_config()
    rows = []
    inv = inventory(meta_llama(config))
    for precision in precisions:
        model = build_tiny(precision, config)
        measured = storage_bytes(model)
        dtype_bytes = 4 if precision == "fp32" else 2
        formula = base_bytes(inv, precision, 1, 0, dtype_bytes)["per_rank"]
        others = inv.buffer_bytes + dtype_bytes * sum(inv.plain)
        per_param = (measured - others) / sum(o * i for o, i in inv.linears)
        rows.append({"what": f"frozen base storage, {precision}", "formula": formula, "measured": measured,
                     "rel_error": (formula - measured) / measured, "linear_bytes_per_param": per_param})
    batch, seq = 2, 64
    acts = activation_bytes(config, batch * seq)
    plain = activation_bytes(config, batch * seq, checkpointing=False)
    measured = measured_activations(config, batch, seq)
    checks = (("whole_model", acts["checkpoints"] + acts["head"]), ("layer_recompute", acts["layer_recompute"]),
              ("whole_model_no_ckpt", plain["total"]))
    for key, formula in checks:
        what = {"whole_model": "activations, checkpointed model (ckpt + head)", "layer_recompute": "activations, one layer recompute",
                "whole_model_no_ckpt": "activations, no checkpointing (layers + head)"}[key]
        rows.append({"what": f"{what}, bf16, {batch}x{seq} tokens", "formula": formula, "measured": measured[key],
                     "rel_error": (formula - measured[key]) / measured[key]})
    return rows


VALIDATE_COLUMNS = [("what", "what", ""), ("formula", "formula B", ",.0f"), ("measured", "measured B", ",d"),
                    ("rel_error", "rel. error", "+.4%"), ("linear_bytes_per_param", "measured B/param (linears)", ".5f")]
