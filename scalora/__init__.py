"""scalora: QLoRA fine-tuning with PEFT's names and file format, from one CPU to many GPU nodes."""

from .core import (LoraConfig, LoraLayer, LoraModel, ModulesToSaveWrapper, PeftModel, PeftType, TaskType,
                   get_peft_model, get_peft_model_state_dict, replace_lora_weights_loftq,
                   set_peft_model_state_dict)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "ModulesToSaveWrapper", "PeftModel", "PeftType", "TaskType",
    "get_peft_model", "get_peft_model_state_dict", "replace_lora_weights_loftq", "set_peft_model_state_dict",
    "__version__",
]
