"""`LoraModel`: holds the user's model as `.model` and injects, switches, merges and removes LoRA layers in it."""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from . import init_weights, quant, targets
from .errors import UserError
from .lora import LoraLayer, ModulesToSaveWrapper, Wrapper
from .lora_config import LoraConfig, TaskType

# Heads that peft trains in full by default for sequence classification.
_SEQ_CLS_MODULES_TO_SAVE = ["classifier", "score"]


class LoraModel(Wrapper):
    """Holds the user's model as `.model` and injects / removes / merges LoRA layers in it."""

    inner = "model"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = [adapter_name]
        quant.keep_4bit_weights_plain(model)  # before any eval forward can repack a 4-bit weight (see quant.py)
        self.inject_adapter(config, adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # --- injection --------------------------------------------------------------------------------------------
    def inject_adapter(self, config: LoraConfig, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise UserError(f"an adapter named {adapter_name!r} already exists; pick another name or "
                             "delete_adapter it first")
        target_list = targets.resolve_targets(config, self.model)
        inside_wrappers = tuple(name + "." for name, m in self.model.named_modules()
                                if isinstance(m, (LoraLayer, ModulesToSaveWrapper)))
        matched: list[str] = []
        for key, module in list(self.model.named_modules()):
            if not key or key.startswith(inside_wrappers) or not targets.is_target(key, config, target_list):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                raise UserError(f"{key} is in modules_to_save of another adapter and cannot also take LoRA")
            if not isinstance(module, LoraLayer) and not quant.is_wrappable(module):
                if isinstance(target_list, str):
                    continue  # a regex may match containers too; only linear layers are taken
                raise UserError(f"target {key!r} is a {type(module).__name__}; LoRA wraps linear layers only "
                                 "(nn.Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt). Narrow "
                                 f"target_modules to linear layers, e.g. {targets.linear_names_hint(self.model)}")
            r = targets.pattern_value(config.rank_pattern, key, config.r)
            alpha = targets.pattern_value(config.alpha_pattern, key, config.lora_alpha)
            layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
            layer.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                               config.use_rslora, config.use_dora)
            if layer is not module:
                _set_submodule(self.model, key, layer)
            matched.append(key)
        if not matched:
            raise targets.no_match_error(config, self.model)
        self.finish_initialisation()

        modules_to_save = config.modules_to_save
        if modules_to_save is None and config.task_type == TaskType.SEQ_CLS:
            modules_to_save = [n for n in _SEQ_CLS_MODULES_TO_SAVE if _has_suffix(self.model, n)]
        wrapped = inside_wrappers
        for key, module in list(self.model.named_modules()):
            if not key or key.startswith(wrapped) or not modules_to_save or not targets.saves(key, modules_to_save):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                _set_submodule(self.model, key, ModulesToSaveWrapper(module, adapter_name))
            wrapped += (key + ".",)  # what is inside a copied module is copied with it

        self.peft_config[adapter_name] = config
        self._mark_trainable(adapter_name)
        active = [n for n in self.active_adapters if n in self.peft_config]
        self.set_adapter(active or adapter_name)

    def finish_initialisation(self) -> int:
        """Compute the initialisations left pending on loaded layers (PiSSA / OLoRA / LoftQ, then DoRA's
        magnitudes; scalora/core/init_weights.py), a quantized layer's original weight read from the checkpoint the
        base came from. Layers still on the meta device wait for the layer-by-layer loader."""
        return init_weights.finish(self.model, self._original_weights())

    def derive_residual(self, adapter_name: str, init: str) -> None:
        """Turn the base into the residual that PiSSA / OLoRA initialisation `init` leaves, keeping the adapter's
        A and B: an adapter trained from that initialisation, loaded from its file onto the original base (peft's
        files keep init_lora_weights, and peft derives the residual again the same way on load)."""
        for m in self.model.modules():
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
                m.residual_pending[adapter_name] = init
        self.finish_initialisation()  # (a base on the meta device: when the layer-by-layer loader fills it)

    def _original_weights(self):
        """name, layer -> the layer's weight before quantization, from the base's checkpoint (opened at the first
        call: a model with nothing to initialise from the weights needs none)."""
        checkpoint = functools.cache(lambda: init_weights.CheckpointWeights.of(self.model))
        return lambda name, layer: checkpoint()(name, layer)

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
            raise UserError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name; a list when several are active (as peft's)."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make one adapter, or several (their outputs add up), the active and trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise UserError(f"set_adapter needs an adapter name or a list of them; this model has "
                             f"{sorted(self.peft_config)}")
        for name in names:
            self._check_name(name)
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                if layer.merged:
                    layer.unmerge()
                mine = [n for n in names if n in layer.lora_A]
                layer.set_adapter(mine, trainable=not any(self.peft_config[n].inference_mode for n in mine))
            else:  # a full copy per adapter: the first of the names that has one
                mine = [n for n in names if n in layer.modules_to_save]
                if mine:
                    layer.set_adapter(mine[0], trainable=not self.peft_config[mine[0]].inference_mode)
        self.active_adapters = names

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
        if self.peft_config:
            self.set_adapter([n for n in self.active_adapters if n != adapter_name] or next(iter(self.peft_config)))

    def set_adapters_enabled(self, enabled: bool) -> None:
        for layer in self._layers():
            layer.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self.set_adapters_enabled(True)

    def disable_adapter_layers(self) -> None:
        """The base model alone until `enable_adapter_layers` (merged adapters are unmerged at the next forward)."""
        self.set_adapters_enabled(False)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter (combining adapters into a new one) is not implemented in scalora. To use several "
            "adapters at once, activate them together with set_adapter([name1, name2]) (their outputs add up), or "
            "merge them one after another with merge_adapter; to build a weighted combination, load the adapters in "
            "peft and save the result, which scalora then loads.")

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
                if merge and dequantize and quant.is_quantized(base):
                    module.unmerge()  # start from the base as loaded, not from a re-quantized merge
                    base = quant.to_full_precision(module.base_layer, dtype or torch.float32)
                    names = [n for n in adapter_names or module.active_adapters if n in module.lora_A]
                    quant.set_dense_weight(base, module.merged_weight(base.weight.data.float(), names))
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


def _has_suffix(model: nn.Module, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules())


def _set_submodule(root: nn.Module, key: str, module: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
