"""Full (unsharded) views of the trainable parameters and their optimizer state, under any topology.

Checkpoints hold the adapter and its optimizer state whole, keyed by parameter name, so that a run saved on N
processes resumes on M (ZeRO and FSDP shard differently for every N). The frozen base is never gathered.

Three kinds of parameters are met, told apart by the parameter itself, not by the launch:
- plain tensors (one process, DDP): the tensor is whole already;
- DTensors (FSDP2): `full_tensor()` gathers, `distribute_tensor` scatters;
- DeepSpeed ZeRO parameters: DeepSpeed's own accessors (`deepspeed.utils.safe_get_full_*`), which also hold the
  fp32 master copy and the optimizer state partitions.
Every function here is collective: all ranks call it, in the same order.
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


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _scatter_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `target`, which may be a DTensor shard."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full.to(target.device, target.dtype))


@torch.no_grad()
def gather_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable parameters in fp32 on the CPU (on every rank)."""
    out = {}
    for name, p in trainable(model):
        if _is_deepspeed(p):
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
        else:
            value = _full(p.detach())
        out[name] = value.detach().float().cpu().clone()
    return out


@torch.no_grad()
def scatter_params(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set the trainable parameters from whole tensors (each rank keeps its part)."""
    for name, p in trainable(model):
        full = tensors[name]
        if hasattr(p, "ds_id"):  # ZeRO-3: the module holds a partition; gather, write on rank 0, re-partition
            import deepspeed
            from deepspeed.utils import safe_set_full_fp32_param

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(full.to(p.device, p.dtype))
            safe_set_full_fp32_param(p, full.to(p.device, torch.float32))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: whole low-precision copy plus a partitioned fp32 master
            from deepspeed.utils import safe_set_full_fp32_param

            p.data.copy_(full.to(p.device, p.dtype))
            safe_set_full_fp32_param(p, full.to(p.device, torch.float32))
        else:
            _scatter_into(p, full)


def _base_optimizer(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def gather_optimizer_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors "<param name>::<key>", scalars) of the optimizer state, whole, on every rank."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    base = _base_optimizer(optimizer)
    for name, p in trainable(model):
        if _is_deepspeed(p):
            from deepspeed.utils import safe_get_full_optimizer_state

            for key in _deepspeed_state_keys(base):
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    tensors[f"{name}::{key}"] = value.detach().float().cpu().clone()
            continue
        for key, value in base.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = _full(value).detach().cpu().clone()
            else:
                scalars[f"{name}::{key}"] = value
    steps = [s["step"] for s in base.state.values() if "step" in s]  # optimizer steps taken, for any topology
    scalars["::step"] = (steps[0].item() if torch.is_tensor(steps[0]) else steps[0]) if steps else 0
    return tensors, scalars


def _deepspeed_state_keys(base) -> list[str]:
    for state in base.state.values():
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]
    return ["exp_avg", "exp_avg_sq"]


@torch.no_grad()
def scatter_optimizer_state(model: nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                            scalars: dict[str, Any]) -> None:
    """Restore the optimizer state written by `gather_optimizer_state`, whatever the topology then was."""
    base = _base_optimizer(optimizer)
    ds = any(_is_deepspeed(p) for _, p in trainable(model))
    if ds:  # DeepSpeed's flat fp32 partitions may have no AdamW state before their first step (ZeRO-3)
        zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        flats = [p for g in base.param_groups for p in g["params"]]
        flats += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
        for flat in flats:
            if flat is not None and flat.numel() and not base.state.get(flat):
                base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
    for name, p in trainable(model):
        if ds:
            from deepspeed.utils import safe_set_full_optimizer_state

            for key in _deepspeed_state_keys(base):
                safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(p.device), key)
            continue
        state = base.state[p]
        prefix = f"{name}::"
        for full_key, value in tensors.items():
            if full_key.startswith(prefix):
                key = full_key[len(prefix):]
                if key in state and torch.is_tensor(state[key]) and state[key].shape == value.shape \
                        and not (value.dim() == 0 and _is_dtensor(state[key])):
                    _scatter_into(state[key], value)
                elif _is_dtensor(p) and value.dim() > 0:
                    from torch.distributed.tensor import distribute_tensor

                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
                else:
                    state[key] = value.clone() if value.dim() == 0 else value.to(p.device)
        for full_key, value in scalars.items():
            if full_key.startswith(prefix):
                state[full_key[len(prefix):]] = value
        if "step" not in state and state:  # written under DeepSpeed, which keeps one count for all parameters
            state["step"] = torch.tensor(float(scalars.get("::step", 0)))
    if ds:
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
