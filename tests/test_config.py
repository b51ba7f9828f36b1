"""megaspec.config: every option declared once; flags, dicts and the resume check follow from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from megaspec.config import (
    AdapterConfig,
    add_flags,
    flat_dict,
    from_dict,
    from_flags,
    read_config_file,
    to_dict,
)
from megaspec.train.config import TrainConfig, resume_keys

# What --resume compared before the config had one source: the hash of these must not change.
LEGACY_RESUME_KEYS = {"model", "dataset", "method", "n_coeffs", "target_modules", "energy_ratio", "selection", "rank",
                      "alpha", "scale", "init", "seq_len", "seed", "quantize"}


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    return from_flags(TrainConfig, parser.parse_args(argv))


def test_every_option_has_help_text():
    for cls in (AdapterConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.name == "adapter" or f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_no_flags_give_the_defaults_and_every_adapter_field_is_a_flag():
    assert parse([]) == TrainConfig()
    cfg = parse(["--method", "smoa", "--n_blocks", "4", "--separable", "--min_per_layer", "3", "--s2ft_gamma", "2",
                 "--s2ft_estimate_steps", "6", "--target_modules", "q_proj, k_proj", "--seed", "7"])
    assert cfg.adapter == AdapterConfig(method="smoa", n_blocks=4, separable=True, min_per_layer=3, s2ft_gamma=2.0,
                                        s2ft_estimate_steps=6, target_modules=["q_proj", "k_proj"], seed=7)
    assert parse(["--deepspeed_config", "x.json"]).ds_config == "x.json"


def test_dicts_round_trip_nested_and_flat():
    cfg = TrainConfig(adapter=AdapterConfig(method="lora", lora_rank=4), max_steps=3, seed=5)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert from_dict(TrainConfig, flat_dict(cfg)) == cfg
    assert from_dict(TrainConfig, {"method": "lora", "lora_rank": 4, "max_steps": 3, "seed": 5}) == cfg
    assert AdapterConfig.from_json(cfg.adapter.to_json()) == cfg.adapter
    assert json.loads(json.dumps(flat_dict(cfg)))["method"] == "lora"


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown adapter config keys \['methd'\]"):
        from_dict(AdapterConfig, {"methd": "ssh"})
    with pytest.raises(ValueError, match=r"unknown train config keys \['max_step'\]"):
        from_dict(TrainConfig, {"max_step": 3})


def test_resume_keys_are_the_legacy_set_until_a_new_option_is_set():
    assert set(resume_keys(TrainConfig(), former=True)) == LEGACY_RESUME_KEYS
    assert set(resume_keys(TrainConfig(adapter=AdapterConfig(n_blocks=4)), former=True)) == LEGACY_RESUME_KEYS | {"n_blocks"}
    assert set(resume_keys(TrainConfig())) == LEGACY_RESUME_KEYS - {"rank"} | {"lora_rank"}


def test_a_renamed_field_is_read_under_its_former_name():
    # adapter_config.json and train_config.json saved before `rank` became `lora_rank` still load
    assert from_dict(AdapterConfig, {"method": "lora", "rank": 4}) == AdapterConfig(method="lora", lora_rank=4)
    assert from_dict(TrainConfig, {"adapter": {"rank": 4}}).adapter.lora_rank == 4
    assert from_dict(TrainConfig, {"rank": 4}).adapter.lora_rank == 4
    with pytest.raises(ValueError, match="both 'rank' and 'lora_rank' are given"):
        from_dict(AdapterConfig, {"rank": 4, "lora_rank": 4})


def test_a_config_file_reads_a_former_name(tmp_path):
    (tmp_path / "run.yaml").write_text("method: lora\nadapter:\n  rank: 4\n")
    assert read_config_file(TrainConfig, tmp_path / "run.yaml") == {"method": "lora", "lora_rank": 4}


def test_the_run_seed_seeds_the_adapter():
    assert TrainConfig(seed=3).adapter.seed == 3
    assert AdapterConfig().seed == 2024


# --- config files (--config) ---------------------------------------------------------------------
def train_script():
    from tests.test_bad_inputs import script

    return script("train")


def test_a_file_sets_options_flat_and_nested_and_only_given_flags_override_it(tmp_path):
    (tmp_path / "run.yaml").write_text("max_steps: 7\nlr: 1e-3\nn_coeffs: 300\nwarmup_ratio: 0\nadapter:\n"
                                       "  method: fourierft\n  target_modules: q_proj, k_proj\n  init: gaussian\n")
    parse_args = train_script().parse_args
    from_file = TrainConfig(max_steps=7, lr=1e-3, warmup_ratio=0.0, adapter=AdapterConfig(
        method="fourierft", target_modules=["q_proj", "k_proj"], n_coeffs=300, init="gaussian"))
    assert parse_args(["--config", str(tmp_path / "run.yaml")]) == from_file
    # a flag given on the command line wins, even when it repeats the default; flags not given leave the file's value
    got = parse_args(["--config", str(tmp_path / "run.yaml"), "--max_steps", "100", "--init", "zeros", "--seq_len", "64"])
    assert got == dataclasses.replace(from_file, max_steps=100, seq_len=64,
                                      adapter=dataclasses.replace(from_file.adapter, init="zeros"))
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 7, "lr": 1e-3, "warmup_ratio": 0, "adapter": {
        "method": "fourierft", "n_coeffs": 300, "init": "gaussian"}, "target_modules": ["q_proj", "k_proj"]}))
    assert parse_args(["--config", str(tmp_path / "run.json")]) == from_file


def some_other_value(name: str, hint, field: dataclasses.Field):
    """A value of the option's type that is not its default."""
    from megaspec.config import _checked

    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    for candidate in (*(field.metadata.get("choices") or ()), 3, 0.25, True, "x/y", ["a_proj", "b_proj"]):
        try:
            if candidate != default and _checked(name, (field, hint), candidate, "f") == candidate:
                return candidate
        except ValueError:
            continue
    raise AssertionError(name)


def test_every_option_is_settable_in_a_file_and_has_a_flag():
    from megaspec.config import _leaves, read_config_file

    leaves = _leaves(TrainConfig)
    values = {name: some_other_value(name, hint, f) for name, (f, hint) in leaves.items()}
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
        f.flush()
        cfg = from_dict(TrainConfig, read_config_file(TrainConfig, f.name))
    assert flat_dict(cfg) == values
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    dests = {a.dest for a in parser._actions}
    assert set(leaves) <= dests
    assert {f.name for f in dataclasses.fields(AdapterConfig)} <= dests  # the adapter's seed: the run's --seed


def test_saved_config_yaml_reads_back_to_the_run_config(tmp_path):
    from megaspec.config import read_config_file
    from megaspec.train.config import run_config_yaml

    cfg = TrainConfig(adapter=AdapterConfig(method="s2ft", n_coeffs=64, separable=True), max_steps=3, seed=5, lr=2e-3,
                      gradient_checkpointing="on", output_dir="runs/x", resume=True, data_cache="none")
    (tmp_path / "config.yaml").write_text(run_config_yaml(cfg, "runs/x"))
    back = from_dict(TrainConfig, read_config_file(TrainConfig, tmp_path / "config.yaml"))
    assert back == dataclasses.replace(cfg, output_dir=None, resume=False)  # run-folder options are the new run's


@pytest.mark.parametrize("name", ["ssh_tiny.yaml", "smollm2_ssh.yaml", "llama70b_nf4.yaml"])
def test_example_configs_parse(name):
    from tests.distributed import REPO

    cfg = train_script().parse_args(["--config", str(REPO / "configs" / name)])
    assert cfg.adapter.method == "ssh" and cfg.max_steps > 1
    assert cfg != TrainConfig()


def test_smollm2_config_does_not_share_the_readme_train_commands_run_folder():
    """Running README's four commands and then its Config files example must not hit "already holds a run"."""
    import re

    from tests.distributed import REPO

    cfg = train_script().parse_args(["--config", str(REPO / "configs" / "smollm2_ssh.yaml")])
    readme = (REPO / "README.md").read_text()
    four = readme.split("## A real model in four commands")[1].split("\n## ")[0]
    assert re.findall(r"--output_dir (\S+)", four) == ["runs/smollm2-boolq"]
    assert cfg.output_dir == "runs/smollm2-boolq-config"


def test_unknown_key_line_names_the_file_as_given_and_the_nearest_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("n_coef: 300\n")
    with pytest.raises(SystemExit) as exit_:
        train_script().parse_args(["--config", "run.yaml"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "train: error: unknown key 'n_coef' in run.yaml; did you mean 'n_coeffs'?\n"


@pytest.mark.slow
def test_tiny_config_runs_and_its_saved_config_yaml_trains_the_same_run(tmp_path):
    """configs/ssh_tiny.yaml trains; runs/A/config.yaml trains the same losses again, from the tokenized-data cache."""
    from tests.distributed import REPO
    from tests.launcher import check, losses, run_train

    first = check(run_train(["--config", "configs/ssh_tiny.yaml", "--output_dir", str(tmp_path / "a"),
                             "--data_cache", str(tmp_path / "cache")], cwd=REPO))
    saved = tmp_path / "a" / "config.yaml"
    again = check(run_train(["--config", str(saved), "--output_dir", str(tmp_path / "b")], cwd=REPO))
    assert "tokenized data: built" in first.stdout and "tokenized data: loaded" in again.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 7))  # max_steps from the file
    assert a == pytest.approx(b, abs=1e-6)
    assert (tmp_path / "b" / "config.yaml").read_text().replace("/b", "/a") == saved.read_text()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_ranks_train_in_fp32_whatever_the_config_enables(precision, monkeypatch):
    import torch

    from megaspec.train.dsconfig import resolve_ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = {"train_micro_batch_size_per_gpu": 1, precision: {"enabled": True}}
    resolved = resolve_ds_config(raw, lr=1e-3, max_steps=10, warmup_steps=1, hidden_size=64)
    assert resolved[precision]["enabled"] is False
    assert raw[precision]["enabled"] is True  # the caller's dict is left alone
