"""`get_peft_model`, `PeftModel` and `LoraModel`: the layering that gives PEFT's parameter names.

    PeftModel.base_model -> LoraModel.model -> the user's module, with targeted layers replaced by `LoraLayer`s.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import quant, targets
from .adapter_io import get_peft_model_state_dict, set_peft_model_state_dict
from .lora import LoraLayer, ModulesToSaveWrapper, Wrapper
from .lora_config import WEIGHTS_NAME, LoraConfig, TaskType, resolve_adapter_file

# Heads that peft trains in full by default for sequence classification.
_SEQ_CLS_MODULES_TO_SAVE = ["classifier", "score"]


class LoraModel(Wrapper):
    """Holds the user's model as `.model` and injects / removes / merges LoRA layers in it."""

    inner = "model"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str = adapter_name
        quant.keep_4bit_weights_plain(model)  # before any eval forward can repack a 4-bit weight (see quant.py)
        self.inject_adapter(config, adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # --- injection --------------------------------------------------------------------------------------------
    def inject_adapter(self, config: LoraConfig, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name or "
                             "delete_adapter it first")
        target_list = targets.resolve_targets(config, self.model)
        inside_wrappers = tuple(name + "." for name, m in self.model.named_modules()
                                if isinstance(m, (LoraLayer, ModulesToSaveWrapper)))
        matched: list[str] = []
        for key, module in list(self.model.named_modules()):
            if not key or key.startswith(inside_wrappers) or not targets.is_target(key, config, target_list):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                raise ValueError(f"{key} is in modules_to_save of another adapter and cannot also take LoRA")
            if not isinstance(module, LoraLayer) and not quant.is_wrappable(module):
                if isinstance(target_list, str):
                    continue  # a regex may match containers too; only linear layers are taken
                raise ValueError(f"target {key!r} is a {type(module).__name__}; LoRA wraps linear layers only "
                                 "(nn.Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt). Narrow "
                                 f"target_modules to linear layers, e.g. {targets.linear_names_hint(self.model)}")
            r = targets.pattern_value(config.rank_pattern, key, config.r)
            alpha = targets.pattern_value(config.alpha_pattern, key, config.lora_alpha)
            layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
            layer.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                               config.use_rslora)
            if layer is not module:
                _set_submodule(self.model, key, layer)
            matched.append(key)
        if not matched:
            raise targets.no_match_error(config, self.model)

        modules_to_save = config.modules_to_save
        if modules_to_save is None and config.task_type == TaskType.SEQ_CLS:
            modules_to_save = [n for n in _SEQ_CLS_MODULES_TO_SAVE if _has_suffix(self.model, n)]
        for key, module in list(self.model.named_modules()):
            if not key or key.startswith(inside_wrappers) or not modules_to_save or \
                    not targets.matches(key, modules_to_save):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                _set_submodule(self.model, key, ModulesToSaveWrapper(module, adapter_name))

        self.peft_config[adapter_name] = config
        self._mark_trainable(adapter_name)
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def _mark_trainable(self, adapter_name: str) -> None:
        """Freeze everything but adapters, then the biases that `bias` asks for (peft's rule)."""
        config = self.peft_config[adapter_name]
        for n, p in self.model.named_parameters():
            if "lora_" not in n and ".modules_to_save." not in n:
                p.requires_grad_(False)
        if config.inference_mode:
            return
        if config.bias == "all":
            for n, p in self.model.named_parameters():
                if n.endswith(".bias") and ".modules_to_save." not in n:
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for m in self.model.modules():
                if isinstance(m, LoraLayer) and m.base_layer.bias is not None:
                    m.base_layer.bias.requires_grad_(True)

    # --- adapters ---------------------------------------------------------------------------------------------
    def _layers(self) -> Iterator[Union[LoraLayer, ModulesToSaveWrapper]]:
        return (m for m in self.model.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper)))

    def _check_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        trainable = not self.peft_config[adapter_name].inference_mode
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                if layer.merged:
                    layer.unmerge()
                layer.set_adapter(adapter_name, trainable=trainable)
            elif adapter_name in layer.modules_to_save:
                layer.set_adapter(adapter_name, trainable=trainable)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        del self.peft_config[adapter_name]
        for layer in list(self._layers()):
            if isinstance(layer, LoraLayer):
                if adapter_name in layer.merged_adapters:
                    layer.unmerge()
                layer.delete_adapter(adapter_name)
            else:
                if adapter_name in layer.modules_to_save:
                    del layer.modules_to_save[adapter_name]
        # Layers left with no adapter at all go back to their base module.
        for key, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer) and not module.lora_A:
                _set_submodule(self.model, key, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
                _set_submodule(self.model, key, module.original_module)
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def set_adapters_enabled(self, enabled: bool) -> None:
        for layer in self._layers():
            layer.disable_adapters = not enabled

    # --- merging and unloading --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = True) -> None:
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.unmerge()

    def _unload(self, merge: bool, dequantize: bool = False, dtype: Optional[torch.dtype] = None,
                adapter_names: Optional[list[str]] = None, safe_merge: bool = True) -> nn.Module:
        for key, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                base = module.base_layer
                if merge and dequantize and (quant.is_4bit(base) or quant.is_8bit(base)):
                    module.unmerge()  # start from the base as loaded, not from a re-quantized merge
                    base = quant.to_full_precision(module.base_layer, dtype or torch.float32)
                    w = base.weight.data.float()
                    for name in adapter_names or module.active_adapters:
                        w = w + module.delta_weight(name).to(w.device)
                    quant.set_dense_weight(base, w)
                elif merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                _set_submodule(self.model, key, base)
            elif isinstance(module, ModulesToSaveWrapper):
                _set_submodule(self.model, key, module._current())
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = True,
                         adapter_names: Optional[list[str]] = None, dequantize: bool = False,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The base model with the active adapters merged in and no LoRA layers left.

        A 4-bit / 8-bit base is re-quantized (with a warning about rounding) unless `dequantize=True`, which turns
        those layers into full-precision `nn.Linear`s (fp32, or `dtype`) holding W + scaling * B @ A exactly.
        """
        return self._unload(True, dequantize=dequantize, dtype=dtype, adapter_names=adapter_names,
                            safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """The base model with LoRA layers removed and nothing merged."""
        return self._unload(False)


class PeftModel(Wrapper):
    """The model `get_peft_model` returns; `base_model` is a `LoraModel`, so names read `base_model.model.<path>`."""

    inner = "base_model"

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(model)
        self.base_model = LoraModel(model, peft_config, adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.generate(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # --- parameters -------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as peft counts them (packed 4-bit weights unpacked)."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n = n * 2 * p.element_size()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(self.get_base_model())
        self.base_model.inject_adapter(peft_config, adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        self.base_model.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.base_model.set_adapters_enabled(True)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = True) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, **kwargs: Any) -> nn.Module:
        return self.base_model.merge_and_unload(**kwargs)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # --- files ------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        state_dict: Optional[dict[str, torch.Tensor]] = None, is_main_process: bool = True,
                        safe_serialization: bool = True, **_: Any) -> None:
        """Write each adapter in PEFT's format: "default" into `save_directory`, others into a sub-folder."""
        if not safe_serialization:
            raise ValueError("scalora writes adapters as safetensors only (safe_serialization=True)")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder path")
        for name in selected_adapters or list(self.peft_config):
            self.base_model._check_name(name)
            tensors = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)
            if not is_main_process:
                continue
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            config = self.peft_config[name]
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"})
            _with_inference_mode(config, True).save_pretrained(out)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     config: Optional[LoraConfig] = None, **hub_kwargs: Any) -> None:
        """Add the adapter saved in `model_id` under `adapter_name` (it does not become active)."""
        config = config or LoraConfig.from_pretrained(model_id, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = resolve_adapter_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        file_state = load_file(weights)  # validate the file before touching the model
        self.base_model.inject_adapter(config, adapter_name)
        try:
            set_peft_model_state_dict(self, file_state, adapter_name, source=weights)
        except Exception:
            self.base_model.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        **hub_kwargs: Any) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id` (a folder or a hub id)."""
        config = config or LoraConfig.from_pretrained(model_id, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = resolve_adapter_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        file_state = load_file(weights)
        peft_model = cls(model, config, adapter_name)
        set_peft_model_state_dict(peft_model, file_state, adapter_name, source=weights)
        if not is_trainable:
            peft_model.eval()
        return peft_model


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   **_: Any) -> PeftModel:
    """Wrap `model`'s targeted linear layers with LoRA; only the adapters are left trainable."""
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a scalora LoraConfig, not {type(peft_config).__name__}")
    return PeftModel(model, peft_config, adapter_name)


def _with_inference_mode(config: LoraConfig, value: bool) -> LoraConfig:
    import dataclasses

    return dataclasses.replace(config, inference_mode=value)


def _name_or_path(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def _has_suffix(model: nn.Module, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules())


def _set_submodule(root: nn.Module, key: str, module: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
