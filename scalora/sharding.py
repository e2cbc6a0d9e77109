"""Full (unsharded) views of the trainable parameters and their optimizer state, under any topology.

Checkpoints hold the adapter and its optimizer state whole, keyed by parameter name, so that a run saved on N
processes resumes on M (ZeRO and FSDP shard differently for every N). The frozen base is never gathered.

Two kinds of parameters are met, told apart by the parameter itself, not by the launch:
- plain tensors (one process, DDP) and DTensors (FSDP2): torch's `torch.distributed.checkpoint.state_dict`
  (`get_*_state_dict` / `set_*_state_dict` with full state dicts) gathers and scatters them;
- DeepSpeed ZeRO parameters: DeepSpeed's own accessors (`deepspeed.utils.safe_get_full_*`), which also hold the
  fp32 master copy and the optimizer state partitions (torch's state-dict API does not know DeepSpeed's engine).
Every function here is collective: all ranks call it, in the same order. Gathered values are complete on the main
process (DeepSpeed's on every rank); that is where checkpoints are written.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


def trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(PEFT-style name, parameter) of the trainable parameters, names as on the unwrapped model."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _is_deepspeed(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def is_sharded(p: torch.Tensor) -> bool:
    """Whether this process holds only a part of `p` (a ZeRO-3 partition, an FSDP2 DTensor)."""
    return hasattr(p, "ds_id") or _is_dtensor(p)


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The whole parameter's shape (a ZeRO-3 partition's own shape is empty; a DTensor's is already the whole)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _options(gather: bool = True):
    """Full state dicts when there are processes to gather from (on the main process's CPU), the trainable
    parameters only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed and gather,
                            ignore_frozen_params=True, strict=False)


@torch.no_grad()
def gather_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable parameters in fp32 on the CPU."""
    names = [name for name, _ in trainable(model)]
    if any(_is_deepspeed(p) for _, p in trainable(model)):
        from deepspeed.utils import safe_get_full_fp32_param

        full = {name: safe_get_full_fp32_param(p) for name, p in trainable(model)}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_options())
    return {n: full[n].detach().float().cpu().clone() for n in names if n in full}


@torch.no_grad()
def scatter_params(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set the trainable parameters from whole tensors (each rank keeps its part)."""
    if not any(_is_deepspeed(p) for _, p in trainable(model)):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, {n: tensors[n] for n, _ in trainable(model)}, options=_options(gather=False))
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in trainable(model):
        full = tensors[name]
        if hasattr(p, "ds_id"):  # ZeRO-3: the module holds a partition; gather, write on rank 0, re-partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(full.to(p.device, p.dtype))
        else:  # ZeRO-1/2: whole low-precision copy plus a partitioned fp32 master
            p.data.copy_(full.to(p.device, p.dtype))
        safe_set_full_fp32_param(p, full.to(p.device, torch.float32))


def _base_optimizer(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def gather_optimizer_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors "<param name>::<key>", scalars) of the optimizer state, whole. "::step" counts the optimizer steps
    taken, so that a state written with one topology restores into another (DeepSpeed keeps one count for all)."""
    base = _base_optimizer(optimizer)
    if any(_is_deepspeed(p) for _, p in trainable(model)):
        from deepspeed.utils import safe_get_full_optimizer_state

        _link_deepspeed_state(optimizer)
        state = {name: {key: safe_get_full_optimizer_state(p, key) for key in _deepspeed_state_keys(base)}
                 for name, p in trainable(model)}
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, base, options=_options()).get("state", {})
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = value.detach().cpu().clone()
            elif value is not None:
                scalars[f"{name}::{key}"] = value
    steps = [s["step"] for s in base.state.values() if "step" in s]
    scalars["::step"] = (steps[0].item() if torch.is_tensor(steps[0]) else steps[0]) if steps else 0
    return tensors, scalars


def _link_deepspeed_state(optimizer) -> None:
    """Point every parameter's view of ZeRO-1/2's optimizer state at the state as it is now. DeepSpeed links the
    views once, right after the step of the first parameter group, when the later groups have no state yet: with
    several groups (LoRA+'s two learning rates) their views stay empty for good, and reading or restoring their
    state failed ("exp_avg not found in optimizer state fragment", measured with DeepSpeed 0.19.8 at the first
    checkpoint). Linking again is what DeepSpeed's own lazy step does, for every group; ZeRO-3 keeps no such views."""
    zero = optimizer
    while zero is not None and not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero = getattr(zero, "optimizer", None)
    if zero is not None:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _deepspeed_state_keys(base) -> list[str]:
    for state in base.state.values():
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]
    return ["exp_avg", "exp_avg_sq"]


@torch.no_grad()
def scatter_optimizer_state(model: nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                            scalars: dict[str, Any]) -> None:
    """Restore the optimizer state written by `gather_optimizer_state`, whatever the topology then was."""
    base = _base_optimizer(optimizer)
    if any(_is_deepspeed(p) for _, p in trainable(model)):
        return _scatter_deepspeed_optimizer_state(model, optimizer, tensors, scalars)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state: dict[str, dict[str, Any]] = {name: {} for name, _ in trainable(model)}
    for full_key, value in [*tensors.items(), *scalars.items()]:
        name, _, key = full_key.partition("::")
        if name:
            state[name][key] = value
    for values in state.values():
        if values and "step" not in values:  # written under DeepSpeed, which keeps one count for all parameters
            values["step"] = torch.tensor(float(scalars.get("::step", 0)))
    groups = get_optimizer_state_dict(model, base, options=_options(gather=False))["param_groups"]
    set_optimizer_state_dict(model, base, {"state": state, "param_groups": groups}, options=_options(gather=False))


def _scatter_deepspeed_optimizer_state(model: nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                                       scalars: dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    base = _base_optimizer(optimizer)
    # DeepSpeed's flat fp32 partitions may have no AdamW state before their first step (ZeRO-3)
    zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    flats = [p for g in base.param_groups for p in g["params"]]
    flats += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    for flat in flats:
        if flat is not None and flat.numel() and not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
    _link_deepspeed_state(optimizer)
    for name, p in trainable(model):
        for key in _deepspeed_state_keys(base):
            safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(p.device), key)
    for state in base.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(scalars.get("::step", 0), dtype=old.dtype, device=old.device) \
                if torch.is_tensor(old) else scalars.get("::step", 0)


def local_optimizer_state_elements(optimizer) -> int:
    """Elements of optimizer state held by this rank (the measure of ZeRO/FSDP sharding)."""
    total = 0
    for state in _base_optimizer(optimizer).state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += (value.to_local() if _is_dtensor(value) else value).numel()
    return total
