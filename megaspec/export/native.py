"""The native megaspec adapter (positions + coefficients), copied byte for byte, with a model card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from megaspec.export.run import Run
from megaspec.model import CONFIG_NAME, LAYERS_NAME, WEIGHTS_NAME

CARD_NAME = "model_card.json"
TRAINING_KEYS = ("dataset", "method", "n_coeffs", "target_modules", "energy_ratio", "selection", "lora_rank", "alpha", "scale", "init", "max_steps", "seq_len", "lr", "seed", "quantize")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_card(run: Run, files: list[Path]) -> dict[str, Any]:
    """What the adapter is, what it was trained on, and how to use it (README-style, as JSON)."""
    summary_file = run.path / "adapter_summary.json"
    metrics_file = run.path / "final_metrics.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    config = run.adapter_config
    return {
        "format": "megaspec",
        "method": config.method,
        "base_model": run.train_config.get("model") or "embedded tiny LLaMA (megaspec.train.embedded.embedded_base())",
        "tokenizer": run.train_config.get("tokenizer") or "the base model's",
        "target_modules": list(config.target_modules),
        "adapted_layers": len(run.layers),
        "trainable_parameters": summary.get("trainable"),
        "adapter_config": json.loads(config.to_json()),
        "training": {k: run.train_config[k] for k in TRAINING_KEYS if k in run.train_config},
        "final_metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
        "source": {"run": str(run.path.resolve()), "adapter": str(run.adapter_dir.resolve())},
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
        "usage": {
            "load": "from megaspec.model import load_adapter; load_adapter(base_model, ADAPTER_DIR)",
            "merged": f"python launch/export.py --run {run.path} --out MERGED --format merged",
            "peft": f"python launch/export.py --run {run.path} --out PEFT --format peft",
        },
    }


def export_native(run: Run, folder: Path) -> dict[str, Any]:
    """Copy the adapter's three files into `folder` and write model_card.json beside them."""
    files = []
    for name in (WEIGHTS_NAME, CONFIG_NAME, LAYERS_NAME):
        shutil.copyfile(run.adapter_dir / name, folder / name)
        files.append(folder / name)
    card = model_card(run, files)
    (folder / CARD_NAME).write_text(json.dumps(card, indent=1, default=str) + "\n")
    return {"bytes": sum(f["bytes"] for f in card["files"].values())}
