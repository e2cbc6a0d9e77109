"""PEFT's on-disk format, both ways: scalora -> peft and peft -> scalora give the same logits."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import scalora
from scalora.core import quant
from conftest import load_quantized, randomize_lora, tiny_model, tokens
from tolerance import assert_rounding_close, logits_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.05)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scalora_adapter_loads_in_peft(tmp_path, arch):
    ours = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**CFG))
    randomize_lora(ours)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["inference_mode"]
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    # and it is not the base: the adapter's effect lies far outside the tolerance
    assert_rounding_close(_logits(theirs), _logits(ours), logits_rtol(tiny_model(arch)),
                          wrong=_logits(tiny_model(arch)), what="logits")


@pytest.mark.parametrize("arch,saved", [("llama", "lm_head"), ("gpt2", "lm_head"), ("llama", "norm")])
def test_peft_adapter_loads_in_scalora(tmp_path, arch, saved):
    """With whole modules trained: "norm" is peft's suffix rule's 5 norms (test_peft_parity), each copy changed."""
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(**CFG, modules_to_save=[saved]))
    randomize_lora(theirs)
    copies = [m for m in theirs.modules() if isinstance(m, peft.utils.ModulesToSaveWrapper)]
    assert len(copies) == (5 if saved == "norm" else 1)
    with torch.no_grad():
        for m in copies:
            m.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = scalora.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    assert not any(p.requires_grad for p in ours.parameters())
    with theirs.disable_adapter():
        bare = _logits(theirs)
    assert_rounding_close(_logits(ours), _logits(theirs), logits_rtol(tiny_model(arch)), wrong=bare, what="logits")


def test_quantized_adapter_round_trip_with_peft(tmp_path, saved_tiny_models):
    path = saved_tiny_models["llama"]
    ours = scalora.get_peft_model(load_quantized(path, 4), scalora.LoraConfig(**CFG))
    randomize_lora(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(path, 4), tmp_path)
    quant.keep_4bit_weights_plain(theirs)  # bitsandbytes' plain path, as scalora's (tests/test_cpu_paths.py)
    with theirs.disable_adapter():
        bare = _logits(theirs)
    assert_rounding_close(_logits(theirs), _logits(ours), logits_rtol(theirs.get_base_model()), wrong=bare,
                          what="logits")


def test_trainable_load_and_multi_adapter_folders(tmp_path):
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    model.add_adapter("other", scalora.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    randomize_lora(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    loaded = scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    loaded.load_adapter(str(tmp_path / "other"), "other")
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_shape_mismatch_is_refused_with_the_key(tmp_path):
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch.*lora_A.weight.*file \(4, 64\) vs model \(8, 64\)"):
        scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))


def test_adapter_for_another_model_is_refused(tmp_path):
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)does not fit.*layers\.7\.self_attn\.q_proj"):
        scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))


def test_missing_folder_and_unsupported_features(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "nope"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True"):
        scalora.LoraConfig.from_pretrained(str(tmp_path))


def test_load_adapter_failure_leaves_model_unchanged(tmp_path):
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    before = _logits(model)
    other = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_adapter(str(tmp_path), "broken")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
