"""megaspec.config: every option declared once; flags, dicts and the resume check follow from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from megaspec.config import AdapterConfig, add_flags, flat_dict, from_dict, from_flags, to_dict
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


def test_the_run_seed_seeds_the_adapter():
    assert TrainConfig(seed=3).adapter.seed == 3
    assert AdapterConfig().seed == 2024
