"""Check a run's arguments against its files before any distributed work starts.

Every check reads only the arguments and files, never weights (JSON configs, the model's config.json,
the tokenizer, a local dataset file streamed once without tokenizing, a run folder's saved state), so a
bad input fails in seconds with one ConfigError/DataError line, before a process group exists and before the
run folder is created or (with --overwrite) removed. The one exception is a .gguf --model: its header is
checked first, then it is converted once into the cache (megaspec.gguf) and checked as that HF folder.
The loop repeats the checks it can only do collectively (output folder named by rank 0's clock, empty
dataset after tokenising, digests).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from megaspec.adapters import adapter_class, linear_shape
from megaspec.config import current_names
from megaspec.gguf import resolve_model, run_dtype
from megaspec.model import SUPPORTED_MODEL_TYPES
from megaspec.train.activations import check_attn_implementation, use_checkpointing
from megaspec.train.chat import (
    CHAT_FIELDS,
    ChatError,
    chat_field,
    pair_messages,
    render_spans,
    resolve_template,
    to_messages,
)
from megaspec.train.checkpoint import CHECKPOINTS, TRAINER_STATE, config_hash, read_latest
from megaspec.train.config import TrainConfig, resume_keys
from megaspec.train.data import (
    FILE_BUILDERS,
    DataConfig,
    DataError,
    _looks_like_path,
    check_dataset_file,
    detect_format,
    format_fields,
    load_records,
    load_tokenizer,
)
from megaspec.train.data_cache import check_cache_dir
from megaspec.train.dsconfig import ConfigError, check_ds_numbers, read_ds_config, resolve_ds_config
from megaspec.train.global_batch import fit_global_batch, ranks_word
from megaspec.train.loop import _model_tokenizer, run_folder_problem, writable_problem
from megaspec.train.trackers import parse_report_to

RUN_CONFIG = "train_config.json"


def validate(cfg: TrainConfig) -> list[str]:
    """Raise one ConfigError/DataError for the first bad input of `cfg`; return warnings to show."""
    warnings: list[str] = []
    adapter_class(cfg.adapter.method)  # "unknown method 'x'; choose one of [...]"
    check_numbers(cfg)
    parse_report_to(cfg.report_to)  # "unknown tracker 'x'"
    raw_ds = read_ds_config(cfg.ds_config)
    check_ds_numbers(raw_ds, cfg.ds_config)
    warnings += check_ds_keys(raw_ds, cfg.ds_config)
    model = resolve_model(cfg.model, run_dtype(raw_ds))  # a .gguf: checked from its header, then converted once (cached)
    model_config = load_model_config(model)
    check_seq_len(cfg.seq_len, model_config)
    tokenizer = check_tokenizer(cfg, model_config, model)
    check_adapters(cfg, model_config)
    use_checkpointing(getattr(cfg, "gradient_checkpointing", "auto"), 0)  # a bad setting fails here
    if getattr(cfg, "s2ft_estimate_group_mb", 1) < 1:
        raise ConfigError(f"--s2ft_estimate_group_mb {cfg.s2ft_estimate_group_mb} must be at least 1")
    check_attn_implementation(getattr(cfg, "attn_implementation", None), model_config)
    check_dataset(cfg.dataset)
    warnings += check_eval_data(cfg)
    check_packing(getattr(cfg, "packing", "naive"))
    check_chat(cfg, tokenizer)
    problem = check_cache_dir(getattr(cfg, "data_cache", None))  # waiting ranks need the builder's file
    if problem:
        raise ConfigError(problem)
    check_ds_config(raw_ds, cfg, int(getattr(model_config, "hidden_size", 4096)))
    if getattr(cfg, "quantize", "none") not in (None, "none"):
        check_quantize(cfg.quantize)
        if cfg.model:
            from megaspec.quant_load import check_checkpoint

            check_checkpoint(model, raw_ds, cfg.quantize)  # quantize on load reads safetensors
    if not getattr(cfg, "show_data", 0):  # --show_data writes nothing, so an existing run folder is no concern
        check_output_dir(cfg)  # last: every other input is known good before the folder's state is judged
    return warnings


# --- plain arguments ---------------------------------------------------------------------------
def check_numbers(cfg: TrainConfig) -> None:
    """Counts and rates that must be positive (the rest is checked by the method's own adapter)."""
    a = cfg.adapter
    positive = {"max_steps": cfg.max_steps, "seq_len": cfg.seq_len, "save_every": cfg.save_every,
                "log_every": cfg.log_every, "image_every": cfg.image_every, "keep_checkpoints": cfg.keep_checkpoints,
                "lora_rank": a.lora_rank, "s2ft_estimate_steps": a.s2ft_estimate_steps}
    if cfg.halt_at_step is not None:
        positive["halt_at_step"] = cfg.halt_at_step
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name} {value} must be at least 1")
    for name in ("eval_every", "eval_batches", "max_skipped_steps", "show_data"):
        if getattr(cfg, name, 0) < 0:
            raise ConfigError(f"--{name} {getattr(cfg, name)} must be 0 or more")
    rates = {"lr": cfg.lr, "scale": a.scale, "alpha": a.alpha}  # None: the method's default
    for name, value in rates.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name} {value} must be a finite number above 0")
    if not 0 <= a.energy_ratio <= 1:  # also false for nan
        raise ConfigError(f"--energy_ratio {a.energy_ratio} must be within [0, 1]")
    if cfg.seq_len < 2:
        raise ConfigError(f"--seq_len {cfg.seq_len} is too short; use at least 2 tokens")
    if adapter_class(a.method).trains_coefficients and a.n_coeffs < 1:
        raise ConfigError(f"--n_coeffs {a.n_coeffs} must be at least 1")


# --- DeepSpeed config --------------------------------------------------------------------------
def known_ds_keys() -> set[str]:
    """Every key name DeepSpeed's config code knows (its string constants), a superset of the top-level keys."""
    import deepspeed.runtime.config  # noqa: F401  (loads the config modules whose constants we read)

    keys = set()
    for name, module in list(sys.modules.items()):
        if name.startswith("deepspeed.") and module is not None:
            keys |= {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    return keys


def check_ds_keys(config: dict[str, Any], path: str) -> list[str]:
    """DeepSpeed ignores unknown top-level keys: a near miss of a known key is an error, others a warning."""
    known = known_ds_keys()
    warnings = []
    for key in config:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"--ds_config {path}: unknown key '{key}' (did you mean '{close[0]}'?); DeepSpeed would ignore it silently")
        warnings.append(f"--ds_config {path}: DeepSpeed does not know the key '{key}' and will ignore it")
    return warnings


def _offline_ds_config(config: dict[str, Any], world_size: int) -> Any:
    """DeepSpeedConfig parsed without a process group, for `world_size` ranks (batch-size arithmetic)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class OfflineConfig(DeepSpeedConfig):
        def _configure_train_batch_size(self) -> None:
            self.world_size = world_size  # the parent falls back to 1 before init_distributed
            super()._configure_train_batch_size()

    return OfflineConfig(config)


def _pydantic_problem(error: Any, config: dict[str, Any]) -> str:
    """One line for a pydantic ValidationError from DeepSpeed's config models, with a 'did you mean'."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    sections = [k for k, v in config.items() if isinstance(v, dict) and first["loc"] and first["loc"][0] in v]
    where = f"{sections[0]}.{loc}" if len(sections) == 1 else loc
    line = f"{where}: {first['msg']}"
    if first["type"] == "extra_forbidden":
        fields: set[str] = set()
        todo = [DeepSpeedConfigModel]
        while todo:
            cls = todo.pop()
            todo += cls.__subclasses__()
            if cls.__name__ == error.title:
                fields |= {alias for name, f in cls.model_fields.items() for alias in (name, f.alias) if alias}
        close = difflib.get_close_matches(str(first["loc"][-1]), sorted(fields), n=1, cutoff=0.6)
        if close:
            line += f" (did you mean '{close[0]}'?)"
    return line


def check_ds_config(raw: dict[str, Any], cfg: TrainConfig, hidden_size: int) -> None:
    """Resolve "auto" as the run will, then parse with DeepSpeed's own config classes; one line per failure."""
    import deepspeed.runtime.lr_schedules as lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from pydantic import ValidationError

    lr = cfg.learning_rate()
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))
    resolved = resolve_ds_config(raw, lr=lr, max_steps=cfg.max_steps, warmup_steps=warmup, hidden_size=hidden_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    saved = _latest_trainer_state(Path(cfg.output_dir)) if cfg.resume and cfg.output_dir else None
    if saved is not None and saved.get("format", 1) >= 2:  # the run keeps the checkpoint's global batch (loop.setup)
        resolved, _ = fit_global_batch(resolved, saved, world)
    try:
        _offline_ds_config(resolved, world)
    except ValidationError as e:
        raise ConfigError(f"--ds_config {cfg.ds_config}: {_pydantic_problem(e, resolved)}; fix the file") from e
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--ds_config {cfg.ds_config} is rejected by DeepSpeed for {world} rank(s): {text}; fix the file") from e
    name = resolved.get("optimizer", {}).get("type")
    if name is not None and name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, name):
        close = difflib.get_close_matches(name.lower(), DEEPSPEED_OPTIMIZERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; use one of {DEEPSPEED_OPTIMIZERS} or a torch.optim class"
        raise ConfigError(f"--ds_config {cfg.ds_config}: unknown optimizer type '{name}'{hint}")
    name = resolved.get("scheduler", {}).get("type")
    if name is not None and not hasattr(lr_schedules, name) and not hasattr(torch.optim.lr_scheduler, name):
        valid = lr_schedules.VALID_LR_SCHEDULES
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; use one of {valid}"
        raise ConfigError(f"--ds_config {cfg.ds_config}: unknown scheduler type '{name}'{hint}")


# --- run folder --------------------------------------------------------------------------------
def _latest_trainer_state(out: Path) -> dict[str, Any] | None:
    """The trainer state of the checkpoint a resume would start from (`latest`, else the highest step)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    tags = sorted((p.name for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()), reverse=True)
    named = read_latest(root)  # None for garbage bytes: scan the step folders as when it is missing
    if named is not None and (root / named / TRAINER_STATE).is_file():
        tags.insert(0, named)
    for tag in tags:
        try:
            return json.loads((root / tag / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
    return None


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to mix runs in one folder, a --resume with nothing to resume or other settings, and --overwrite of a non-run folder."""
    if not cfg.output_dir:
        return  # runs/<time>-<method>, named after init; the loop checks it
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; pass a folder")
    problem = writable_problem(out)
    if problem:
        raise ConfigError(problem)
    holds_files = out.is_dir() and any(out.iterdir())
    if not cfg.resume:
        if not holds_files:
            return
        if not cfg.overwrite:
            raise ConfigError(f"--output_dir {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        reason = run_folder_problem(out)
        if reason:
            raise ConfigError(f"--overwrite refuses to delete {out}: {reason}; choose another --output_dir, or move "
                              "those files away first")
        return
    if not out.is_dir():
        raise ConfigError(f"--resume: {out} does not exist, so there is nothing to resume; drop --resume to start a new run")
    if not any((out / CHECKPOINTS).glob("step-*")):
        raise ConfigError(f"--resume: {out} holds no checkpoint ({out / CHECKPOINTS} has no step-* folder); drop --resume "
                          "to start a new run there (with --overwrite if it holds files of a run), or point --output_dir "
                          "at the run to continue")
    wanted = resume_keys(cfg)
    saved_cfg = None
    if (out / RUN_CONFIG).is_file():
        try:
            saved_cfg = current_names(TrainConfig, json.loads((out / RUN_CONFIG).read_text()))
        except ValueError:
            saved_cfg = None
    state = _latest_trainer_state(out)
    differs = state is not None and state.get("config_hash") != config_hash(resume_keys(cfg, former=True))
    if saved_cfg is not None and (differs or state is None):
        changed = [k for k, v in wanted.items() if k in saved_cfg and saved_cfg[k] != v]
        if changed:
            then = ", ".join(f"{k}={saved_cfg[k]!r}" for k in changed)
            now = ", ".join(f"{k}={wanted[k]!r}" for k in changed)
            raise ConfigError(f"--resume: the run in {out} has {then} but this run has {now}; "
                              "pass the run's settings, or a new --output_dir")
    if differs:
        raise ConfigError(f"--resume: the checkpoint in {out} was made with other settings (config hash differs); "
                          "pass the run's settings (see its train_config.json), or a new --output_dir")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # a checkpoint with a rank-independent training state (format 2) resumes on any number of ranks
    if state is not None and state.get("format", 1) < 2 and state.get("world_size") not in (None, world):
        raise ConfigError(f"--resume: the checkpoint in {out} was saved by {ranks_word(state['world_size'])}, this run has {world}, "
                          "and it predates rank-independent checkpoints: resume it with the same number of ranks")
    step = int(state.get("step", 0)) if state is not None else 0
    if step > cfg.max_steps:
        raise ConfigError(f"--resume: the checkpoint in {out} is at step {step}, past --max_steps {cfg.max_steps}; pass "
                          f"--max_steps {step} or more")
    if step == cfg.max_steps and (out / "final_metrics.json").is_file() and (out / "adapter").is_dir():
        raise ConfigError(f"--resume: the run in {out} already finished at step {step} (--max_steps {cfg.max_steps}); "
                          "raise --max_steps to train it further, or pass a new --output_dir")


# --- model, tokenizer, adapters ----------------------------------------------------------------
def load_model_config(model: str | None) -> Any:
    """The HF config of --model (or of the embedded tiny LLaMA), read without loading weights."""
    if model is None:
        from megaspec.train.embedded import embedded_tokenizer, tiny_llama_config

        return tiny_llama_config(len(embedded_tokenizer()))
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if not path.exists() and _looks_like_path(model):
        raise ConfigError(f"--model {model} does not exist; pass a local HF model folder or a hub id")
    if path.is_file():
        raise ConfigError(f"--model {model} is a file; pass the HF model folder that holds config.json, or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"--model {model} has no config.json; pass a folder written by save_pretrained")
    if path.is_dir():
        check_model_type(_model_type_in(path / "config.json"), model)
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"--model {model}: cannot read its config ({type(e).__name__}: {first}); check the path or hub id") from e
    check_model_type(getattr(config, "model_type", None), model)
    return config


def _model_type_in(config_file: Path) -> str | None:
    """The model_type a local config.json declares (ConfigError if it is not a JSON object)."""
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"--model: {config_file} is not valid JSON ({e}); fix the file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--model: {config_file} must hold a JSON object, not {type(config).__name__}")
    return config.get("model_type")


def check_model_type(model_type: str | None, model: str) -> None:
    """The adapters find their layers by LLaMA's projection names: refuse other architectures before any download or load."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"--model {model} is a {model_type or 'model without model_type'}; megaspec supports LLaMA-style "
                          f"decoders ({', '.join(SUPPORTED_MODEL_TYPES)}) whose layers have q/k/v/o_proj and gate/up/down_proj")


def check_seq_len(seq_len: int, model_config: Any) -> None:
    """A block longer than the model's position table trains on positions it never had."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq_len {seq_len} exceeds the model's max_position_embeddings {limit}; use --seq_len {limit} or less")


def check_tokenizer(cfg: TrainConfig, model_config: Any, model: str | None = None) -> Any:
    """The tokenizer loads and every id it emits has a row in the model's embedding (`model`: --model as resolved)."""
    source = cfg.tokenizer or _model_tokenizer(model if model is not None else cfg.model)
    tokenizer = load_tokenizer(source)
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        name = source or "the embedded tokenizer"
        raise ConfigError(f"tokenizer {name} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
                          "pass the model's own tokenizer with --tokenizer")
    return tokenizer


def check_adapters(cfg: TrainConfig, model_config: Any) -> None:
    """Apply the adapters to the model built on the meta device: targets exist, sizes fit every layer."""
    from transformers import AutoModelForCausalLM

    from megaspec.model import apply_adapters, find_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    a, method = cfg.adapter, adapter_class(cfg.adapter.method)
    try:
        if method.trains_coefficients:  # named as a flag, for the smallest target (the adapter names the first)
            shapes = {name: linear_shape(model.get_submodule(name)) for name in find_targets(model, a.target_modules)}
            smallest = min(shapes, key=lambda name: method.coeff_capacity(shapes[name]))
            (m, n), room = shapes[smallest], method.coeff_capacity(shapes[smallest])
            if not 0 < a.n_coeffs <= room:
                raise ConfigError(f"--n_coeffs {a.n_coeffs} must be in 1..{room}: the smallest target {smallest} "
                                  f"is {m}x{n}; lower --n_coeffs or change --target_modules")
        apply_adapters(model, a)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e


# --- dataset -----------------------------------------------------------------------------------
def dataset_columns(dataset: str) -> list[str] | None:
    """The field names of a local dataset read from its first record or schema; None when not cheap to tell."""
    path = Path(dataset).expanduser()
    if not path.exists():
        if _looks_like_path(dataset):
            load_records(dataset)  # raises the "does not exist" DataError
        return None
    if path.is_dir():
        if not any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
            return None
        return list(load_records(dataset).column_names)  # memory-mapped: cheap
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        load_records(dataset)  # raises the "unsupported type" DataError
    if suffix == ".txt":
        return ["text"]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.stat().st_size == 0:
        raise DataError(f"dataset file {path} is empty; add records")
    with open(path, encoding="utf-8", errors="replace") as f:
        if suffix == ".csv":
            return next(csv.reader(f), [])
        if suffix in (".json", ".jsonl"):
            first = next((line for line in f if line.strip()), "")
            try:
                record = json.loads(first)
            except ValueError:
                return None  # a pretty-printed JSON array: left to datasets
            if not isinstance(record, dict):
                raise DataError(f"dataset file {path} holds {type(record).__name__} records, not JSON objects; write one object per line")
            return list(record)
    return None


def check_dataset(dataset: str | None) -> None:
    """A local dataset has the fields the loop needs in every record (the embedded default always does)."""
    if dataset is None:
        return
    cfg = DataConfig(dataset=dataset, format="auto")
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() in FILE_BUILDERS:
        check_dataset_file(path, cfg)  # the whole file, streamed: a bad record 10k lines in fails here, not after planning
    columns = dataset_columns(dataset)
    if columns is not None:
        detect_format(columns, cfg)
    if path.is_dir() and columns is not None:
        check_saved_fields(dataset, cfg)


def check_eval_data(cfg: TrainConfig) -> list[str]:
    """--eval_fraction in [0, 1) and a readable --eval_dataset; warnings for options that then do nothing."""
    fraction = getattr(cfg, "eval_fraction", 0.05)
    if not 0 <= fraction < 1:  # also false for nan
        raise ConfigError(f"--eval_fraction {fraction} must be within [0, 1) (0: no eval split)")
    eval_dataset = getattr(cfg, "eval_dataset", None)
    if eval_dataset is None:
        if fraction == 0 and cfg.eval_every:
            return ["--eval_fraction 0 and no --eval_dataset: the run has no eval records, so --eval_every evaluates "
                    "nothing; pass --eval_dataset FILE to evaluate"]
        return []
    try:
        check_dataset(eval_dataset)
    except DataError as e:
        raise DataError(f"--eval_dataset: {e}") from None
    if fraction != 0.05:
        return [f"--eval_fraction {fraction} is ignored: --eval_dataset {eval_dataset} holds the eval records and every "
                "record of --dataset trains"]
    return []


def check_packing(packing: str) -> None:
    """--packing isolated relies on transformers reading document boundaries from position_ids (megaspec.train.data.collate)."""
    from transformers import masking_utils

    if packing == "isolated" and not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ConfigError("--packing isolated needs a transformers that masks packed sequences from position_ids "
                          "(5.0 or later); upgrade transformers or pass --packing naive")


def _quietly_loaded(dataset: str) -> Any:
    """load_records without datasets' progress bars, which would break the one-line error."""
    from datasets.utils import logging as ds_logging

    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return load_records(dataset)
    finally:
        if shown:
            ds_logging.enable_progress_bar()


def check_chat(cfg: TrainConfig, tokenizer: Any) -> None:
    """Chat-formatted data renders with the chosen template, record by record (jinja only, no tokenizing)."""
    try:
        template = resolve_template(tokenizer, cfg.chat_template)
    except ChatError as e:
        raise ConfigError(str(e)) from None
    for dataset in (cfg.dataset, getattr(cfg, "eval_dataset", None)):
        if dataset is not None and Path(dataset).expanduser().exists():  # hub datasets: checked when the run builds its data
            _check_chat_records(dataset, tokenizer, template)


def _check_chat_records(dataset: str, tokenizer: Any, template: str | None) -> None:
    """Every chat-formatted record of a local `dataset` renders with `template`."""
    data_cfg = DataConfig(dataset=dataset, format="auto")
    records = _quietly_loaded(dataset)
    fmt = detect_format(records.column_names, data_cfg)
    if fmt == "text" or (fmt == "instruction" and template is None):
        return
    if template is None:
        raise DataError(f"dataset {dataset} holds chat records but the tokenizer has no chat template; "
                        "pass --chat_template FILE.jinja")
    field = chat_field(records.column_names)
    fields = [field] if field else format_fields(records.column_names, data_cfg)
    for row, record in enumerate(records.select_columns(fields)):
        try:
            if field:
                messages = to_messages(record[field])
            elif "instruction" in fields:
                messages = pair_messages(record["instruction"] or "", record["output"] or "")
            else:
                messages = pair_messages(record[fields[0]] or "", record[fields[1]] or "")
            render_spans(messages, tokenizer, template)
        except ChatError as e:
            raise DataError(f"dataset {dataset} record {row + 1}: {e}") from None


def check_saved_fields(dataset: str, cfg: DataConfig) -> None:
    """A saved datasets folder's text fields are typed as strings (its features say so without reading rows)."""
    from datasets import Value

    features = load_records(dataset).features
    for name in format_fields(list(features), cfg):
        if name in CHAT_FIELDS:
            continue
        feature = features[name]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")):
            raise DataError(f"saved dataset {dataset}: field '{name}' holds {feature} values, not strings; make it text")


# --- quantization ------------------------------------------------------------------------------
def check_quantize(mode: str, device: torch.device | str | None = None) -> None:
    """bitsandbytes runs `mode` (nf4 | fp4 | int8) on the device: a tiny layer's forward and backward."""
    if device is None:  # this rank's GPU: a context on GPU 0 from every rank would stay for the whole run
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    try:
        import bitsandbytes as bnb

        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
        elif mode in ("nf4", "fp4"):
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type=mode)
        else:
            raise ConfigError(f"--quantize {mode} is not one of none, nf4, fp4, int8")
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        if not (torch.isfinite(y).all() and torch.isfinite(x.grad).all()):
            raise RuntimeError("non-finite output from a 64x64 test layer")
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"--quantize {mode}: bitsandbytes cannot run on {device.type} ({type(e).__name__}: {first}); "
                          "use --quantize none or install a bitsandbytes build for this device") from e
