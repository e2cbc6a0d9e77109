"""Which modules of a model get LoRA: PEFT's matching rules, with an error that lists what exists."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from . import quant
from .errors import UserError
from .lora_config import LoraConfig

ALL_LINEAR = "all-linear"

# The target list a model family gets when `target_modules` is None (peft's defaults for these families).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{m: ["q_proj", "v_proj"] for m in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "opt", "phi", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere", "smollm3")},
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}


def matches(key: str, targets: Union[str, list[str]]) -> bool:
    """A regex string must match the whole module name; a list matches a name or a dotted suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith("." + t) for t in targets)


def saves(key: str, modules_to_save: list[str]) -> bool:
    """Whether `modules_to_save` picks the module named `key` in the base model, as peft picks it (peft 0.21,
    `utils.other._set_trainable`): its name in the PeftModel (`base_model.model.` + key) ends with one of the
    strings, as text, not at a dot: "norm" picks model.norm and every input_layernorm and post_attention_layernorm,
    and an adapter file saved with such a list holds the same modules in scalora and in peft."""
    full = "base_model.model." + key
    return any(full.endswith(name) for name in modules_to_save)


def layer_index(key: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", key))), None)
    return int(m.group(1)) if m else None


def pattern_value(pattern: dict, key: str, default):
    """Value of the first `rank_pattern` / `alpha_pattern` entry whose regex matches the end of `key`."""
    for p, v in pattern.items():
        if p == key or re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _linear_layers(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers: a LoRA layer counts as the layer it wraps, and what is inside it
    (its base layer, its lora_A / lora_B) does not (a second adapter's 'all-linear' finds the same layers as the
    first, as in peft)."""
    from .lora import LoraLayer

    out, inside = [], ()
    for name, m in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(m, LoraLayer):
            out.append(name)
            inside = (*inside, name + ".")
        elif quant.is_wrappable(m):
            out.append(name)
    return out


def all_linear_suffixes(model: nn.Module) -> list[str]:
    """Last name component of every linear layer except the output head (peft's 'all-linear')."""
    names = {name.rsplit(".", 1)[-1] for name in _linear_layers(model)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names -= {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is head}
    return sorted(names)


def resolve_targets(config: LoraConfig, model: nn.Module) -> Union[str, list[str]]:
    t = config.target_modules
    if t == ALL_LINEAR:
        return all_linear_suffixes(model)
    if t is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise UserError(f"target_modules is not set and scalora has no default for model type {model_type!r}: "
                             f"set target_modules, e.g. 'all-linear' or {linear_names_hint(model)}")
        return DEFAULT_TARGETS[model_type]
    return t


def is_target(key: str, config: LoraConfig, targets: Union[str, list[str]]) -> bool:
    if config.exclude_modules is not None and matches(key, config.exclude_modules):
        return False
    if not matches(key, targets):
        return False
    if config.layers_to_transform is not None:
        idx = layer_index(key, config.layers_pattern)
        wanted = config.layers_to_transform
        return idx is not None and (idx == wanted if isinstance(wanted, int) else idx in wanted)
    return True


def linear_names_hint(model: nn.Module, limit: int = 30) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})[:limit]


def no_match_error(config: LoraConfig, model: nn.Module) -> ValueError:
    examples = _linear_layers(model)[:5]
    return ValueError(
        f"target_modules={config.target_modules!r} matched no module of the model"
        + (f" (exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})"
           if config.exclude_modules or config.layers_to_transform is not None else "")
        + f". Its linear layers are named {linear_names_hint(model)} (full names such as {examples}). "
        "Use some of those names, a regex that fully matches full names, or 'all-linear'."
    )
