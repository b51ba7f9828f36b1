"""Generate from a run: its base with the adapter applied (fast spectral forward), or a merged checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from megaspec.export.run import ExportError, load_base, open_run
from megaspec.model import load_adapter
from megaspec.train.chat import render_prompt
from megaspec.train.data import load_tokenizer


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_for_inference(
    run_dir: str | Path, merged: str | Path | None = None, adapter: str | Path | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer): merged checkpoint if given, else base + the run's adapter."""
    from transformers import AutoModelForCausalLM

    run = open_run(run_dir, adapter)
    if merged is not None:
        if not (Path(merged) / "config.json").is_file():
            raise ExportError(f"--merged {merged} is not a model folder (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(merged), dtype="auto").to(_device()).eval()
        has_tokenizer = any((Path(merged) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return model, load_tokenizer(str(merged) if has_tokenizer else run.tokenizer)
    model = load_base(run, device=_device())
    load_adapter(model, run.adapter_dir)
    return model.eval(), load_tokenizer(run.tokenizer)


@torch.no_grad()
def complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 32,
    greedy: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    template: str | None = None,
) -> str:
    """The completion of `prompt` (new tokens only, special tokens dropped), tokenized as in training.

    template None: [BOS] prompt, as plain-text and untemplated records train; a chat template: the prompt
    as one user turn followed by the assistant header, as templated records train (megaspec.train.chat).
    """
    if template is not None:
        text = render_prompt(tokenizer, template, [{"role": "user", "content": prompt}])
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        tokens = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokens], device=next(model.parameters()).device)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p}
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=not greedy, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
