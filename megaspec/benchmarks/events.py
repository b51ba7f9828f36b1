"""TensorBoard event-file and run-report size of a deep model's monitoring (`python launch/bench.py events`).

A random LLaMA of --layers layers (hidden --hidden, q_proj and v_proj adapted with SSH n=--n_coeffs)
is logged by the trainer's RunLogger as a run would be: scalars, per-layer norms and the histogram
every step (--log_every 1), the allocation at step 0, spectrum images and the growth heatmap at step
1, every --image_every steps and the last; the coefficients drift randomly between steps (no
training, so only the logging is measured). Then report.html is written from the folder.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def run(layers: int = 80, hidden: int = 512, steps: int = 1000, image_every: int = 50, n_coeffs: int = 750,
        folder: str | None = None) -> dict[str, Any]:
    """Log `steps` steps into a run folder; sizes of the event file, its images, and the report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaspec.config import AdapterConfig
    from megaspec.model import apply_adapters, save_adapter, summarize
    from megaspec.train.config import TrainConfig, run_record
    from megaspec.train.monitor import RunLogger, gathered_adapter_tensors
    from megaspec.train.report import write_report

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    apply_adapters(model, AdapterConfig(method="ssh", n_coeffs=n_coeffs, target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory(prefix="megaspec-events-") as tmp:
        out = Path(folder) if folder else Path(tmp) / "run"
        out.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(max_steps=steps, image_every=image_every, output_dir=str(out))
        (out / "train_config.json").write_text(json.dumps(run_record(cfg, None)))
        (out / "adapter_summary.json").write_text(json.dumps(summarize(model, "ssh").__dict__, default=str))
        log = RunLogger(out)
        log.log_allocation(model)
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0)
        image_s = 0.0
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
            tensors = gathered_adapter_tensors(model)
            log.log_scalars(step, {"loss": 3.0 / step**0.3, "lr": 0.02, "grad_norm": 1.0, "tokens_per_s": 1000.0, "step_time": 1.0})
            log.log_spectral(step, model, tensors)
            if step % image_every == 0 or step == steps or step == 1:
                start = time.perf_counter()
                log.log_spectral_images(step, model, tensors)
                image_s += time.perf_counter() - start
        log.close()
        save_adapter(model, out / "adapter")
        (out / "final_metrics.json").write_text(json.dumps({"step": steps}))
        event_bytes = sum(f.stat().st_size for f in (out / "tensorboard").iterdir())
        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "histograms": 0}).Reload()
        images = {tag: [len(e.encoded_image_string) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
        start = time.perf_counter()
        report = write_report(out)
        report_s = time.perf_counter() - start
        report_bytes = report.stat().st_size

    def total(match: str) -> int:
        return sum(sum(sizes) for tag, sizes in images.items() if match in tag)

    return {"layers": layers, "adapted": 2 * layers, "steps": steps, "image_every": image_every, "event_bytes": event_bytes,
            "images": sum(len(s) for s in images.values()), "image_bytes": total(""), "spectrum_bytes": total("positions"),
            "growth_bytes": total("spectral/growth"), "allocation_bytes": total("spectral/allocation"),
            "image_s": image_s, "report_bytes": report_bytes, "report_s": report_s}


def format_table(result: dict[str, Any]) -> str:
    """One line per measured size."""
    mib = 2**20
    return "\n".join([
        f"{result['layers']} layers ({result['adapted']} adapted), {result['steps']} steps, images every {result['image_every']}",
        f"event file       {result['event_bytes'] / mib:8.1f} MiB",
        f"images ({result['images']:4d})    {result['image_bytes'] / mib:8.1f} MiB",
        f"  spectrum       {result['spectrum_bytes'] / mib:8.1f} MiB",
        f"  growth         {result['growth_bytes'] / mib:8.2f} MiB",
        f"  allocation     {result['allocation_bytes'] / 1024:8.0f} KiB",
        f"image time       {result['image_s']:8.1f} s",
        f"report.html      {result['report_bytes'] / mib:8.2f} MiB in {result['report_s']:.1f} s",
    ])
