"""PEFT's on-disk format: `adapter_model.safetensors` keys without the adapter name, checked on load."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import UserError
from .lora import LoraLayer, ModulesToSaveWrapper
from .lora_config import LoraConfig


def read_tensors(path: str, what: str = "an adapter_model.safetensors written by save_pretrained"
                 ) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a UserError naming the file and what it should hold (a truncated copy, a
    file of another kind, an unreadable one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); expected {what}. It may be truncated "
                        "(an interrupted copy or download) or another kind of file") from None


def checkpoint_index(folder: str) -> Optional[dict[str, str]]:
    """tensor name -> safetensors file of a model checkpoint folder (the index of a sharded one, or the single
    model.safetensors), None where it has neither."""
    import json
    import os

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return None


def read_copies(files: dict[str, str], names) -> dict[str, torch.Tensor]:
    """The named tensors, copied out of their memory-mapped files: a tensor read from a file is a view of a mapping
    of the whole file, and a view kept (a 4-bit weight's statistics, a weight a sharder leaves as is) would keep
    every page read through that mapping resident, layer after layer (measured: the whole packed base again)."""
    from collections import defaultdict

    from safetensors import safe_open

    by_file: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_file[files[n]].append(n)
    out = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k).clone()
    return out


def adapter_key_map(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, str]:
    """File key -> model state-dict key, for every tensor that belongs to `adapter_name`.

    File keys are the model keys with the adapter name removed: `...q_proj.lora_A.default.weight` is stored as
    `...q_proj.lora_A.weight` (DoRA's `...lora_magnitude_vector.default.weight` as `...lora_magnitude_vector`); a
    `modules_to_save` copy `...lm_head.modules_to_save.default.weight` as `...lm_head.weight`; trained biases keep
    their key.
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            for part in ("lora_A", "lora_B"):
                out[f"{name}.{part}.weight"] = f"{name}.{part}.{adapter_name}.weight"
            if adapter_name in module.lora_magnitude_vector:  # peft's file key for DoRA's magnitude: no ".weight"
                out[f"{name}.lora_magnitude_vector"] = f"{name}.lora_magnitude_vector.{adapter_name}.weight"
            if config.bias == "lora_only" and module.base_layer.bias is not None:
                out[f"{name}.base_layer.bias"] = f"{name}.base_layer.bias"
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k in module.modules_to_save[adapter_name].state_dict():
                out[f"{name}.{k}"] = f"{name}.modules_to_save.{adapter_name}.{k}"
    if config.bias == "all":
        for k, _ in model.named_parameters():
            if k.endswith(".bias") and ".modules_to_save." not in k and ".lora_" not in k:
                out.setdefault(k, k)
    return out


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys. `state_dict` may come from accelerate's gathered state."""
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()
    return {fk: state_dict[mk] for fk, mk in adapter_key_map(model, adapter_name, config).items()}


def set_peft_model_state_dict(model: nn.Module, file_state: dict[str, torch.Tensor],
                              adapter_name: str = "default", source: str = "the adapter") -> None:
    """Copy file tensors into the model's adapter, refusing any key or shape that does not fit."""
    config = model.peft_config[adapter_name]
    key_map = adapter_key_map(model, adapter_name, config)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unexpected = sorted(set(file_state) - set(key_map))
    missing = sorted(set(key_map) - set(file_state))
    bad_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[key_map[k]].shape)}"
                 for k, v in file_state.items() if k in key_map and v.shape != params[key_map[k]].shape]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) for modules this model does not have or does not target, "
                        f"e.g. {unexpected[:3]}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model expects are absent from the file, e.g. {missing[:3]}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es), e.g. {bad_shape[:3]}")
    if problems:
        raise UserError(f"{source} does not fit this base model:\n  - " + "\n  - ".join(problems)
                         + "\nLoad it on the base model it was trained on (see base_model_name_or_path in its "
                           "adapter_config.json) with the same target_modules and r.")
    with torch.no_grad():
        for fk, tensor in file_state.items():
            p = params[key_map[fk]]
            p.copy_(tensor.to(device=p.device, dtype=p.dtype))
