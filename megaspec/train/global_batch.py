"""Keep a resumed run's global batch: split the checkpoint's samples per update over however many ranks resume it."""

from __future__ import annotations

import copy
from typing import Any

from megaspec.train.dsconfig import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _listed(values: list[int], limit: int = 6) -> str:
    shown = [str(v) for v in values[:limit]]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def ranks_word(count: int) -> str:
    """'1 rank', '2 ranks'."""
    return f"{count} rank" if count == 1 else f"{count} ranks"


def split_problem(global_batch: int, micro: int, world: int) -> str | None:
    """Why `global_batch` samples per update cannot be `micro` per rank x accumulation x `world` ranks, or None.

    The reason names the micro-batches that would work on `world` ranks and the rank counts that
    would work with `micro`.
    """
    if global_batch % (micro * world) == 0:
        return None
    micros = divisors(global_batch // world) if global_batch % world == 0 else []
    ranks = divisors(global_batch // micro) if global_batch % micro == 0 else []
    options = []
    if micros:
        options.append(f"train_micro_batch_size_per_gpu {_listed(micros[::-1])} in --ds_config")
    if ranks:
        options.append(f"{_listed(ranks[::-1])} ranks" if len(ranks) > 1 else ranks_word(ranks[0]))
    fix = " or ".join(options) if options else "a micro-batch and rank count whose product divides it"
    return (f"the checkpoint's global batch of {global_batch} samples per update cannot be split over {ranks_word(world)} "
            f"with micro-batch {micro}; use {fix}")


def fit_global_batch(ds_config: dict[str, Any], saved: dict[str, Any], world: int) -> tuple[dict[str, Any], str | None]:
    """A copy of `ds_config` whose batch keys give the checkpoint's global batch on `world` ranks, and a note if the split changed.

    The micro-batch is the config's (it is what fits in memory), else the checkpoint's; gradient
    accumulation makes up the rest. ConfigError, in one line, when no accumulation can.
    """
    global_batch, old_micro = int(saved["global_batch"]), int(saved["micro_batch"])
    micro = int(ds_config.get("train_micro_batch_size_per_gpu") or old_micro)
    problem = split_problem(global_batch, micro, world)
    if problem:
        raise ConfigError(f"--resume: {problem}")
    accum = global_batch // (micro * world)
    fitted = copy.deepcopy(ds_config)
    fitted.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    before = (int(saved["world_size"]), old_micro, int(saved["accumulation"]))
    asked = ds_config.get("train_batch_size")
    ignored = (f"; --ds_config's train_batch_size {asked} does not apply to a resumed run"
               if isinstance(asked, int) and asked != global_batch else "")
    if before == (world, micro, accum) and not ignored:
        return fitted, None
    return fitted, (f"global batch {global_batch} as in the checkpoint: {world} rank(s) x micro-batch {micro} x "
                    f"accumulation {accum} (it was written by {before[0]} rank(s) x {before[1]} x {before[2]}){ignored}")
