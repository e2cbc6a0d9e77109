"""Resumable checkpoints: the adapter (PEFT format), optimizer and RNG states (accelerate), loop state, config.

    OUTPUT/checkpoints/step-000100/{adapter/, optimizer.bin, random_states_*.pkl, trainer_state.json, config.yaml}

A checkpoint is written into a `.tmp` folder and renamed into place only when complete, and `trainer_state.json`
is written last: a folder without it is never taken for a checkpoint. The frozen base is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from .peft_model import PeftModel

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def register_adapter_only_hooks(accelerator) -> None:
    """accelerate saves and loads the optimizer and RNG states; the model part is the adapter, handled here."""

    def skip_model_save(models, weights, output_dir):
        weights.clear()

    def skip_model_load(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(skip_model_save)
    accelerator.register_load_state_pre_hook(skip_model_load)


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
                found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest(out_dir: str) -> Optional[str]:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def save(accelerator, model, step: int, state: dict[str, Any], config_yaml: str, out_dir: str,
         keep: int) -> str:
    final = os.path.join(out_dir, "checkpoints", f"step-{step:06d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    save_adapter(accelerator, model, os.path.join(tmp, "adapter"))
    if accelerator.is_main_process:
        shutil.copyfile(config_yaml, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_adapter(accelerator, model, path: str) -> None:
    """The adapter in PEFT format, written once by the main process."""
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(path, is_main_process=accelerator.is_main_process)


def load(accelerator, model, path: str) -> dict[str, Any]:
    """Restore adapter, optimizer and RNG states; returns the loop state."""
    from safetensors.torch import load_file

    from .adapter_io import set_peft_model_state_dict

    accelerator.load_state(path)
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    weights = os.path.join(path, "adapter", "adapter_model.safetensors")
    set_peft_model_state_dict(unwrapped, load_file(weights), "default", source=weights)
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
