"""How the Hugging Face ecosystem recognises an adapter model, and how scalora's classes present themselves to it.

transformers' `Trainer` (`trainer_utils._is_peft_model`), accelerate (`utils.is_peft_model`) and TRL's trainers
recognise an adapter model in one way only: `isinstance(model, peft.PeftModel)`. There is no registry or protocol to
join (checked with transformers 5.24, accelerate 1.15, TRL 1.16). A model they do not recognise is refused as
"purely quantized", saved whole by `save_model()` (the 4-bit base included, no adapter_config.json) and not
resumed as an adapter. So, where peft is installed, scalora's `PeftModel` derives from `peft.PeftModel`, and none
of peft's code runs in it: `__init__` and every method the ecosystem calls are scalora's own, and every other
attribute peft's class defines is shadowed by one that says it is not part of scalora (`shadow_peft_only`).
Without peft installed, those libraries recognise no adapter model at all, so nothing is lost.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def peft_model_class() -> type:
    """`peft.PeftModel` where peft is installed and imports, else `nn.Module`."""
    try:
        from peft import PeftModel
    except Exception:  # peft absent (it is not a dependency) or broken: nothing then checks for it
        return nn.Module
    return PeftModel


class _NotInScalora:
    """Shadows an attribute of peft's PeftModel that scalora's does not have: reading it is an AttributeError (so
    `hasattr` is False, as for any missing attribute); the wrapper's `not_read_through` gives the message."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        raise AttributeError


def shadow_peft_only(cls: type) -> type:
    """Class decorator: every attribute `peft.PeftModel` (and its mixins) defines beyond `nn.Module`'s, that `cls`
    does not define itself, is shadowed by `_NotInScalora` and never read through to the base model either."""
    peft_base = peft_model_class()
    if peft_base is nn.Module:
        return cls
    own = {name for klass in cls.__mro__ if not issubclass(peft_base, klass) for name in vars(klass)}
    refused = {}
    for name in dir(peft_base):
        if not name.startswith("__") and not hasattr(nn.Module, name) and name not in own:
            setattr(cls, name, _NotInScalora())
            refused[name] = (f"{name!r} belongs to peft's PeftModel and is not part of scalora's: scalora derives "
                             "from it only so that transformers, accelerate and TRL recognise its models")
    cls.not_read_through = {**cls.not_read_through, **refused}
    return cls


def from_peft_config(config: Any) -> Any:
    """A `peft.LoraConfig` as scalora's `LoraConfig` (same fields; features scalora lacks are refused by name)."""
    from .lora_config import LoraConfig

    if isinstance(config, LoraConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if type(config).__module__.startswith("peft") and callable(to_dict):
        return LoraConfig.from_dict(to_dict(), source=f"peft.{type(config).__name__}")
    raise TypeError(f"peft_config must be a LoraConfig (scalora's or peft's), not {type(config).__name__}")
