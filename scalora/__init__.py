"""scalora: QLoRA fine-tuning with PEFT's names and file format, from one CPU to many GPU nodes."""

from .adapter_io import get_peft_model_state_dict, set_peft_model_state_dict
from .lora import LoraLayer, ModulesToSaveWrapper
from .lora_config import LoraConfig, PeftType, TaskType
from .peft_model import LoraModel, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "ModulesToSaveWrapper", "PeftModel", "PeftType", "TaskType",
    "get_peft_model", "get_peft_model_state_dict", "set_peft_model_state_dict", "__version__",
]
