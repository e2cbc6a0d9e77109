"""scalora: QLoRA fine-tuning with PEFT's names and file format, from one CPU to many GPU nodes.

The PEFT-style names below are imported on first use (PEP 562), so that `import scalora.malloc` and the command's
entry point load no torch: `scalora` starts itself again with its allocator before anything heavy is in memory
(scalora/malloc.py). `from scalora import LoraConfig` and `scalora.get_peft_model` work as with eager imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "ModulesToSaveWrapper", "PeftModel", "PeftType", "TaskType",
    "get_peft_model", "get_peft_model_state_dict", "replace_lora_weights_loftq", "set_peft_model_state_dict",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(".core", __name__), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: `scalora.train` after import
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
