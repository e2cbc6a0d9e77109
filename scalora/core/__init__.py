"""The peft-compatible LoRA core: `LoraConfig`, `get_peft_model`, `PeftModel`, the LoRA layers and PEFT's file format.

A peft user needs this floor alone; it imports nothing from the orchestrator above it (`scalora train` and its
config, data, loop, checkpoints, trackers, sharding), which builds on it.

    lora_config   LoraConfig, PeftType, TaskType, adapter_config.json
    lora          LoraLayer (one forward for every base kind), ModulesToSaveWrapper
    quant         the base kinds: nn.Linear, Conv1D, bitsandbytes 4-bit / 8-bit; dense read / write for merging
    targets       which modules get LoRA
    peft_model    get_peft_model, PeftModel
    lora_model    LoraModel: injecting, switching, merging, unloading adapters
    init_weights  PiSSA / OLoRA / LoftQ initialisation from the base weight; PiSSA / OLoRA adapters as plain LoRA
    interop       how transformers, accelerate and TRL recognise adapter models; peft configs converted
    adapter_io    PEFT's file keys, checked loading
"""

from .adapter_io import get_peft_model_state_dict, set_peft_model_state_dict
from .lora import LoraLayer, ModulesToSaveWrapper
from .lora_config import LoraConfig, PeftType, TaskType
from .lora_model import LoraModel
from .init_weights import replace_lora_weights_loftq
from .peft_model import PeftModel, get_peft_model

__all__ = [
    "LoraConfig", "LoraLayer", "LoraModel", "ModulesToSaveWrapper", "PeftModel", "PeftType", "TaskType",
    "get_peft_model", "get_peft_model_state_dict", "replace_lora_weights_loftq", "set_peft_model_state_dict",
]
