"""Merging, unloading, disabling and switching adapters, each against W + scaling * B @ A computed by hand."""

import math

import pytest
import torch

import scalora
from conftest import copy_lora, load_quantized, randomize_lora, tiny_model, tokens
from scalora.core import quant
from tolerance import LAMBDA, assert_rounding_close, logits_rtol, rounding_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def hand_merged(arch, peft_model, adapter="default", scale=True):
    """A fresh base whose targeted weights are W + scaling * B @ A, computed here, not by scalora (scale=False:
    W + B @ A, what a merge that forgot the scaling would give)."""
    ref = tiny_model(arch)
    for name, m in peft_model.named_modules():
        if isinstance(m, scalora.LoraLayer) and adapter in m.lora_A:
            path = name.removeprefix("base_model.model.")
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            delta = (m.lora_alpha[adapter] / m.r[adapter] if scale else 1.0) * (b @ a)
            target = ref.get_submodule(path)
            with torch.no_grad():
                target.weight += delta.T if type(target).__name__ == "Conv1D" else delta
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(arch):
    model = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _logits(model)
    reference = _logits(hand_merged(arch, model))
    rtol, unscaled = logits_rtol(tiny_model(arch)), _logits(hand_merged(arch, model, scale=False))
    assert_rounding_close(unmerged, reference, rtol, wrong=unscaled, what="W x + s B A x against (W + s B A) x")

    model.merge_adapter()
    ref_params = dict(hand_merged(arch, model).named_parameters())
    unscaled_params = dict(hand_merged(arch, model, scale=False).named_parameters())
    weight_rtol = rounding_rtol(CFG["r"] + 1)  # W + s * (B @ A): a sum of r + 1 terms
    for n, p in model.named_parameters():
        if n.endswith("base_layer.weight"):
            ref_name = n.removeprefix("base_model.model.").replace(".base_layer", "")
            assert_rounding_close(p, ref_params[ref_name], weight_rtol, wrong=unscaled_params[ref_name], what=n)
    assert_rounding_close(_logits(model), reference, rtol, wrong=unscaled, what="merged logits")

    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if "base_layer" in n:  # W + d - d: the rounding of two sums of r + 1 terms
            assert_rounding_close(p, base_weights[n], rounding_rtol(CFG["r"] + 1, depth=2), what=n)
    assert_rounding_close(_logits(model), unmerged, rtol, wrong=_logits(tiny_model(arch)), what="unmerged logits")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_and_unload(arch):
    model = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    reference, unscaled = _logits(hand_merged(arch, model)), _logits(hand_merged(arch, model, scale=False))
    merged = model.merge_and_unload()
    assert not any(isinstance(m, scalora.LoraLayer) for m in merged.modules())
    assert_rounding_close(_logits(merged), reference, logits_rtol(merged), wrong=unscaled, what="merged logits")

    model = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    plain = model.unload()
    assert not any(isinstance(m, scalora.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), _logits(tiny_model(arch)), rtol=0, atol=0)


def test_disable_adapter_gives_the_base_even_when_merged():
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    base, adapted = _logits(tiny_model("llama")), _logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():  # W + d - d in the layers: rounding only, and far from the adapted model
        assert_rounding_close(_logits(model), base, logits_rtol(tiny_model("llama")), wrong=adapted,
                              what="disabled after merge")


def test_multi_adapter_switching_and_delete():
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    model.add_adapter("small", scalora.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"]))
    randomize_lora(model)
    assert model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    ref_default = _logits(hand_merged("llama", model, "default"))
    ref_small = _logits(hand_merged("llama", model, "small"))
    rtol = logits_rtol(tiny_model("llama"))  # each adapter's logits lie far from the other's
    assert_rounding_close(_logits(model), ref_default, rtol, wrong=ref_small, what="default")
    model.set_adapter("small")
    assert all(".small." in n for n, p in model.named_parameters() if p.requires_grad)
    assert_rounding_close(_logits(model), ref_small, rtol, wrong=ref_default, what="small")
    model.delete_adapter("small")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".small." in n for n, _ in model.named_parameters())
    assert_rounding_close(_logits(model), ref_default, rtol, wrong=ref_small, what="default after delete")
    with pytest.raises(ValueError, match=r"no adapter named 'small'; this model has \['default'\]"):
        model.set_adapter("small")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_merge(saved_tiny_models, bits):
    path = saved_tiny_models["llama"]
    model = scalora.get_peft_model(load_quantized(path, bits), scalora.LoraConfig(**CFG))
    randomize_lora(model)
    with torch.no_grad():  # a delta well above the quantization step, so that the merge is visible
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3)
    adapted = _logits(model)
    # Reference: the de-quantized base weights plus the hand-computed delta, in a plain fp32 model; and what a merge
    # without the scaling would give.
    ref, unscaled_ref = tiny_model("llama"), tiny_model("llama")
    for name, m in model.named_modules():
        if isinstance(m, scalora.LoraLayer):
            ba = m.lora_B["default"].weight @ m.lora_A["default"].weight
            sub = name.removeprefix("base_model.model.")
            with torch.no_grad():
                ref.get_submodule(sub).weight.copy_(quant.dense_weight(m.base_layer) + m.scaling["default"] * ba)
                unscaled_ref.get_submodule(sub).weight.copy_(quant.dense_weight(m.base_layer) + ba)
    reference, unscaled = _logits(ref), _logits(unscaled_ref)
    rtol = logits_rtol(ref)
    # int8 matmuls also round their input rows to int8 (LLM.int8: a step of 1/127 of the row's largest value, an
    # error of at most 1/254 of it per element), in each of a layer's 4 stages of quantized matmuls (q/k/v, o,
    # gate/up, down); those independent errors add in quadrature, on one side only
    stages = 4 * ref.config.num_hidden_layers
    adapted_rtol = rtol if bits == 4 else LAMBDA * math.sqrt(stages) / 254
    assert_rounding_close(adapted, reference, adapted_rtol, wrong=unscaled, what="adapted")

    full = scalora.get_peft_model(load_quantized(path, bits), scalora.LoraConfig(**CFG))
    copy_lora(model, full)
    merged_fp = full.merge_and_unload(dequantize=True)
    assert not any(quant.is_4bit(m) or quant.is_8bit(m) for m in merged_fp.modules())
    assert_rounding_close(_logits(merged_fp), reference, rtol, wrong=unscaled, what="merged, de-quantized")

    with pytest.warns(UserWarning, match="re-quantizes"):
        merged_q = model.merge_and_unload()
    assert any(quant.is_4bit(m) or quant.is_8bit(m) for m in merged_q.modules())
    err = (_logits(merged_q) - reference).abs().max().item()
    base_gap = (_logits(load_quantized(path, bits)) - reference).abs().max().item()
    assert err < 0.5 * base_gap, (err, base_gap)  # re-quantized, but the adapter is in


def test_merge_refuses_non_finite_weights():
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
        layer.lora_A["default"].weight.fill_(1.0)
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
