"""Plan adapters from data: the coarse update estimate of S2FT, on a plain model or under ZeRO-3.

Why two phases. The estimate dWhat = -sum_batches dL/dW0 (docs/methods.md §4 step 1) needs forward and
backward passes. Under ZeRO-3 the frozen base is partitioned and only the DeepSpeed engine's
module hooks gather it, so the passes can only run once the engine exists; but the engine's
optimizer must be built over the final trainable parameters. So `apply_adapters` gives
data-planned adapters (those whose class sets `needs_calibration`) a provisional plan and their
real coefficient parameter (zero: delta == 0), and `calibrate_adapters` runs after
`deepspeed.initialize` (at once on a plain model), overwriting only the plan buffers in place.

The estimate. Forward hooks on the adapters keep each layer's input x; a tensor hook on the
adapter's output receives g = dL/dy, the gradient of the base output too (y = base(x) + delta),
so dL/dW0 = g^T x over all tokens. Each micro-batch's g^T x is computed in fp32 and subtracted
from an fp32 M x N buffer per target layer, allocated on the activations' device at the first
gradient. The passes run in eval mode (no dropout, and HF gradient checkpointing, which would
re-run the hooks, is off) on module(**batch).loss, with every adapter's parameters set
requires_grad=False (no gradient reaches the DeepSpeed optimizer) and the input embeddings'
output made to require grad, so backward reaches every frozen layer. Under ZeRO-3
`engine.module` is called directly: its gather/release hooks are module hooks and run as in
training. Every rank must pass the same number of batches (each its own shard).

Memory: layer groups. Holding every target layer's buffer at once would cost 2.7 GB per rank for
LLaMA-3.1-8B q,v and 24 GB for 70B q,v. So the target layers are cut, in model order, into groups
whose fp32 M x N buffers fit `group_bytes` (DEFAULT_GROUP_BYTES; a layer larger than the budget
is a group of its own), and each group takes its own forward/backward passes over the same
micro-batches, with hooks on its layers only; its estimates are reduced and planned (below) and
dropped before the next group starts. Peak: one group's buffers, plus one transient M x N
contribution and each layer's input held until its backward. The cost is one set of passes per
group. Each layer's sum is the same sequence of the same fp32 operations whatever the grouping
(hooks do not change the values the backward computes), so the plans do not depend on it.

Then, one layer at a time in layer order within the group, the buffers are summed onto the
layer's planning rank (torch.distributed.reduce, not all_reduce: the same traffic, and the other
ranks can drop their copy at once; layers spread by megaspec.distributed.assign_layers, by size), the
others drop theirs, the owner computes `plan_from_estimate`; after the last group the small
plans are all-gathered, applied
with `set_plan` on every rank, and a digest of every adapter's plan is compared across ranks.
A 1-rank and an N-rank run sum the same micro-batch gradients in a different order, so their
estimates agree to fp32 rounding, not bit for bit (with one micro-batch per rank the order is the
same), and a near-tie in a distance or a sampling key could in principle resolve differently;
within a run every rank uses the owner's plan. Calibrate before training: the estimate is taken
at the current weights, i.e. at W0 only while the coefficients are still zero.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from megaspec.adapters import Adapter
from megaspec.distributed import assign_layers, plan_digest
from megaspec.distributed.comm import all_gather_object, rank, reduce_to, to_cpu, world_size

Batch = dict[str, torch.Tensor]
DEFAULT_GROUP_BYTES = 2**30  # fp32 estimate buffers held at once per rank: 1 GiB, 3 passes for 8B q,v


def calibrating(adapters: dict[str, Adapter]) -> dict[str, Adapter]:
    """The adapters whose plan comes from data (their class sets needs_calibration)."""
    return {name: a for name, a in adapters.items() if a.needs_calibration}


def _adapters(module: nn.Module) -> dict[str, Adapter]:
    return {name: m for name, m in module.named_modules() if isinstance(m, Adapter)}


def _module(engine_or_model: Any) -> nn.Module:
    """The model itself: a DeepSpeed engine's `module`, or the model passed."""
    inner = getattr(engine_or_model, "module", None)
    return inner if isinstance(inner, nn.Module) else engine_or_model


def estimate_updates(module: nn.Module, adapters: dict[str, Adapter], batches: Iterable[Batch]) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's -sum_batches dL/dW0 (fp32, M x N) for each adapter's frozen weight, and the batch count."""
    sums: dict[str, torch.Tensor] = {}
    seen = dict.fromkeys(adapters, 0)

    def capture(name: str) -> Any:
        def forward_hook(layer: nn.Module, args: Any, output: torch.Tensor) -> None:
            x = args[0]

            def gradient_hook(g: torch.Tensor) -> None:
                contrib = g.reshape(-1, g.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
                if name not in sums:
                    sums[name] = torch.zeros_like(contrib)
                sums[name].sub_(contrib)
                seen[name] += 1

            if output.requires_grad:
                output.register_hook(gradient_hook)

        return forward_hook

    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        raise ValueError("calibration needs a model with get_input_embeddings() (an HF PreTrainedModel)")
    handles = [a.register_forward_hook(capture(name)) for name, a in adapters.items()]
    handles.append(embeddings.register_forward_hook(lambda m, args, out: out.requires_grad_(True)))
    # every trainable parameter, not only the estimated layers' (a layer group): no gradient may reach them
    trainable = [p for p in module.parameters() if p.requires_grad]
    modes = [(m, m.training) for m in module.modules()]  # restored one by one: they may differ
    count = 0
    try:
        for p in trainable:
            p.requires_grad_(False)
        module.eval()
        with torch.enable_grad():
            for batch in batches:
                loss = module(**batch).loss
                if loss is None:
                    raise ValueError("calibration batches need labels: the model returned no loss")
                loss.backward()
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training
    if count == 0:
        raise ValueError("calibration got no batches; pass at least one (s2ft_estimate_steps >= 1)")
    missing = [name for name, n in seen.items() if n == 0]
    if missing:
        raise RuntimeError(f"calibration: no gradient reached {len(missing)} adapted layer(s), first {missing[:3]}")
    return sums, count


def estimate_groups(shapes: dict[str, tuple[int, int]], group_bytes: int) -> list[list[str]]:
    """Consecutive layers (model order: name -> (M, N)) whose fp32 M x N buffers fit `group_bytes` together (at least one each)."""
    if group_bytes < 1:
        raise ValueError(f"group_bytes={group_bytes} must be positive")
    groups: list[list[str]] = []
    used = 0
    for name, (m, n) in shapes.items():
        size = 4 * m * n
        if not groups or used + size > group_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def calibrate_adapters(engine_or_model: Any, batches: Iterable[Batch], group_bytes: int = DEFAULT_GROUP_BYTES) -> dict[str, Any]:
    """Estimate, plan and install the plans of every data-planned adapter; collective over all ranks.

    `engine_or_model`: the DeepSpeed engine (ZeRO-3) or a plain model; `batches`: this rank's
    micro-batches (model inputs with labels, on the model's device), kept for one set of passes
    per layer group; `group_bytes`: the fp32 estimate buffers one group may hold. Returns the plan
    digest (of all adapters, as apply_adapters reports it) and what the calibration did.
    """
    module = _module(engine_or_model)
    everything = _adapters(module)
    adapters = calibrating(everything)
    if not adapters:
        return {}
    names = list(adapters)
    layers = [(name, type(a).__name__, a.shape) for name, a in adapters.items()]
    if any(other != layers for other in all_gather_object(layers)):
        raise RuntimeError("ranks disagree on the layers to calibrate (names, methods, shapes)")
    batches = list(batches)
    groups = estimate_groups({name: a.shape for name, a in adapters.items()}, group_bytes)
    owners = dict(zip(names, assign_layers([a.shape[0] * a.shape[1] for a in adapters.values()], world_size()), strict=True))
    local = {}
    count, held = 0, 0
    for group in groups:
        sums, count = estimate_updates(module, {name: adapters[name] for name in group}, batches)
        held = max(held, sum(t.numel() * t.element_size() for t in sums.values()))
        if group is groups[0]:
            counts = all_gather_object(count)
            if len(set(counts)) != 1:
                raise RuntimeError(f"ranks ran different numbers of calibration batches: {counts}")
        for name in group:  # the same order on every rank: the reduces pair up
            estimate = sums.pop(name)
            reduce_to(estimate, owners[name])
            if owners[name] == rank():
                local[name] = to_cpu(adapters[name].plan_from_estimate(estimate))
            del estimate
    plans: dict[str, Any] = {}
    for part in all_gather_object(local):
        plans.update(part)
    for name in names:
        adapters[name].set_plan(plans[name])
    digest = hashlib.sha256("".join(plan_digest(n, a.plan_state()) for n, a in everything.items()).encode()).hexdigest()
    digests = all_gather_object(digest)
    if any(other != digest for other in digests):
        raise RuntimeError(f"ranks disagree on the calibrated plan: digests {[d[:12] for d in digests]}")
    calibration = {"layers": len(names), "batches": count, "ranks": world_size(), "planned_by": owners,
                   "groups": len(groups), "max_group_bytes": held}
    return {"digest": digest, "calibration": calibration}
