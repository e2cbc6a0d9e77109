"""`get_peft_model` and `PeftModel`: the layering that gives PEFT's parameter names.

    PeftModel.base_model -> LoraModel.model -> the user's module, with targeted layers replaced by `LoraLayer`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterator, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from . import interop, quant
from .adapter_io import get_peft_model_state_dict, read_tensors, set_peft_model_state_dict
from .errors import UserError
from .init_weights import changes_base, convert_to_lora
from .lora import LoraLayer, Wrapper
from .lora_config import WEIGHTS_NAME, LoraConfig, resolve_adapter_file, weight_init_kind
from .lora_model import LoraModel

class _ForwardWithTheBaseSignature:
    """`peft_model.forward`, showing the base model's argument names to `inspect.signature` (transformers' Trainer
    and TRL read them to decide which dataset columns to keep); it calls `PeftModel._forward`."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self

        @functools.wraps(obj.get_base_model().forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return obj._forward(*args, **kwargs)

        return forward


@interop.shadow_peft_only
class PeftModel(Wrapper, interop.peft_model_class()):
    """The model `get_peft_model` returns; `base_model` is a `LoraModel`, so names read `base_model.model.<path>`.

    Where peft is installed it is also a `peft.PeftModel` for `isinstance`, the only way transformers, accelerate and
    TRL recognise an adapter model; no code of peft's runs in it (scalora/core/interop.py).
    """

    inner = "base_model"
    forward = _ForwardWithTheBaseSignature()

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        nn.Module.__init__(self)  # not super(): peft's __init__ (next in line where peft is installed) must not run
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(model)
        self.base_model = LoraModel(model, peft_config, adapter_name)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.generate(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Names of the modules trained in full and saved with the adapters (as peft's)."""
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    @property
    def is_quantized(self) -> bool:
        """Whether the frozen base is quantized (the adapters are full precision either way)."""
        return bool(getattr(self.get_base_model(), "is_quantized", False))

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.get_base_model(), "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # --- parameters -------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as peft counts them (packed 4-bit weights unpacked)."""
        trainable = total = 0
        seen: set[int] = set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                # a ZeRO-3 partition's own numel is 0; a 4-bit weight counts its unpacked elements, also where
                # sharding has replaced its Params4bit with a plain (D)Tensor of packed bytes
                n = getattr(p, "ds_numel", None) or p.numel()
                if quant.is_4bit(module) and name == "weight":
                    n = module.in_features * module.out_features
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
        peft_config = interop.from_peft_config(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_or_path(self.get_base_model())
        self.base_model.inject_adapter(peft_config, adapter_name)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make an adapter (or several, whose outputs add up) the active and trainable one(s)."""
        self.base_model.set_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Make these adapters' weights trainable or frozen, whether they are active or not (as peft's)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names:
            self.base_model._check_name(name)
        for n, p in self.named_parameters():
            if any(f".{a}." in n for a in names) and (".lora_" in n or ".modules_to_save." in n):
                p.requires_grad_(requires_grad)

    def enable_adapter_layers(self) -> None:
        self.base_model.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.base_model.disable_adapter_layers()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.base_model.add_weighted_adapter(*args, **kwargs)

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
                        safe_serialization: bool = True,
                        path_initial_model_for_weight_conversion: Optional[str] = None,
                        initial_state_dict: Optional[dict[str, torch.Tensor]] = None, **_: Any) -> None:
        """Write each adapter in PEFT's format: "default" into `save_directory`, others into a sub-folder.

        A PiSSA / OLoRA adapter fits the residual base its initialisation left; with
        `path_initial_model_for_weight_conversion` (the folder the adapter was saved to right after
        initialisation, as in peft) or `initial_state_dict` (that adapter's parameters, by the model's names) it is
        written as plain LoRA on the original base instead (init_weights.convert_to_lora: r and lora_alpha
        doubled), what vLLM, TGI and a peft user with the original base load."""
        if not safe_serialization:
            raise UserError("scalora writes adapters as safetensors only (safe_serialization=True)")
        if os.path.isfile(save_directory):
            raise UserError(f"{save_directory} is a file; save_pretrained needs a folder path")
        for name in selected_adapters or list(self.peft_config):
            self.base_model._check_name(name)
            tensors = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)
            if not is_main_process:
                continue
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            config = self.peft_config[name]
            if path_initial_model_for_weight_conversion is not None or initial_state_dict is not None:
                if path_initial_model_for_weight_conversion is not None:
                    initial = read_tensors(resolve_adapter_file(path_initial_model_for_weight_conversion,
                                                                WEIGHTS_NAME))
                else:
                    initial = get_peft_model_state_dict(self, state_dict=initial_state_dict, adapter_name=name)
                tensors, config = convert_to_lora(tensors, initial, config)
            if weight_init_kind(config.init_lora_weights) == "loftq":
                # LoftQ leaves the base as it is: the file is plain LoRA (as peft's replace_lora_weights_loftq
                # leaves it); "loftq" would make peft run LoftQ again on load, on a GPU
                config = dataclasses.replace(config, init_lora_weights=True, loftq_config={})
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"})
            _with_inference_mode(config, True).save_pretrained(out)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     config: Optional[LoraConfig] = None, **hub_kwargs: Any) -> None:
        """Add the adapter saved in `model_id` under `adapter_name` (it does not become active). Into an adapter of
        that name that exists already, only the weights are loaded (how the Trainer resumes from a checkpoint)."""
        config = config or LoraConfig.from_pretrained(model_id, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = resolve_adapter_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        file_state = read_tensors(weights)  # validate the file before touching the model
        if adapter_name in self.peft_config:
            set_peft_model_state_dict(self, file_state, adapter_name, source=weights)
            self.set_requires_grad(adapter_name, is_trainable and adapter_name in self.active_adapters)
            return
        init = _file_init(config)
        self.base_model.inject_adapter(dataclasses.replace(config, init_lora_weights=True) if init else config,
                                       adapter_name)
        try:
            set_peft_model_state_dict(self, file_state, adapter_name, source=weights)
        except Exception:
            self.base_model.delete_adapter(adapter_name)
            raise
        _loaded(self.base_model, adapter_name, config, init)
        if not is_trainable:
            self.eval()

    def push_to_hub(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: str = "Upload adapter", **kwargs: Any) -> Any:
        """Upload the adapter files (adapter_config.json, adapter_model.safetensors; nothing of the base) to a hub
        repository, as peft's push_to_hub does."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        **hub_kwargs: Any) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id` (a folder or a hub id)."""
        config = config or LoraConfig.from_pretrained(model_id, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = resolve_adapter_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        file_state = read_tensors(weights)
        init = _file_init(config)
        peft_model = cls(model, dataclasses.replace(config, init_lora_weights=True) if init else config, adapter_name)
        set_peft_model_state_dict(peft_model, file_state, adapter_name, source=weights)
        _loaded(peft_model.base_model, adapter_name, config, init)
        if not is_trainable:
            peft_model.eval()
        return peft_model


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   **_: Any) -> PeftModel:
    """Wrap `model`'s targeted linear layers with LoRA; only the adapters are left trainable. `peft_config` is
    scalora's LoraConfig or peft's (converted field for field)."""
    return PeftModel(model, interop.from_peft_config(peft_config), adapter_name)


def _file_init(config: LoraConfig) -> Optional[str]:
    """An adapter file's initialisation from the weights (PiSSA / OLoRA / LoftQ), which loading does not compute:
    the file's A and B replace it (the adapter is added with init True, then filled)."""
    return config.init_lora_weights if weight_init_kind(config.init_lora_weights) else None


def _loaded(lora_model: LoraModel, adapter_name: str, config: LoraConfig, init: Optional[str]) -> None:
    """After a file's weights are in: the file's own config kept, and an adapter trained from PiSSA / OLoRA given
    the residual base it fits, derived again from this (original) base as peft derives it on load."""
    lora_model.peft_config[adapter_name] = config
    for m in lora_model.model.modules():  # the file's magnitudes are the adapter's, not its base's norms
        if isinstance(m, LoraLayer):
            m.dora_pending.discard(adapter_name)
    if changes_base(init):
        lora_model.derive_residual(adapter_name, init)


def _with_inference_mode(config: LoraConfig, value: bool) -> LoraConfig:
    return dataclasses.replace(config, inference_mode=value)


def _name_or_path(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
