"""scalora against peft on tiny transformers models: same names, logits, gradients and parameter counts."""

import io
from contextlib import redirect_stdout

import peft
import pytest
import torch

import scalora
from scalora.core import quant
from conftest import assert_lora_parity, copy_lora, load_quantized, randomize_lora, tiny_model, tokens
from tolerance import assert_rounding_close, operand_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py

CONFIGS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "suffixes+rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn", "down_proj"],
                            use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2, "c_fc": 2},
                     alpha_pattern={"o_proj": 3.0, "c_proj": 3.0}),
}


def _pair(make_base, cfg):
    ours = scalora.get_peft_model(make_base(), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**cfg))
    # The reference runs bitsandbytes' plain 4-bit path, as scalora does: on AVX512-BF16 CPUs bitsandbytes would
    # otherwise switch peft's model to its packed CPU kernel at the first eval forward (tests/test_cpu_paths.py).
    quant.keep_4bit_weights_plain(theirs)
    randomize_lora(ours)
    copy_lora(ours, theirs)
    return ours, theirs


def _assert_parity(ours, theirs):
    assert_lora_parity(ours, theirs, tokens())


FP32_CASES = [(a, c) for a in ("llama", "qwen2", "gpt2") for c in CONFIGS if (a, c) != ("qwen2", "suffixes+rslora")]


@pytest.mark.parametrize("arch,cfg", FP32_CASES, ids=[f"{a}-{c}" for a, c in FP32_CASES])
def test_fp32_parity(arch, cfg):
    ours, theirs = _pair(lambda: tiny_model(arch), CONFIGS[cfg])
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_match_peft(bias):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias=bias)
    ours, theirs = _pair(lambda: tiny_model("qwen2"), cfg)
    _assert_parity(ours, theirs)
    assert any(n.endswith(".bias") and p.requires_grad for n, p in ours.named_parameters())


@pytest.mark.parametrize("saved,copies", [(["lm_head"], 1), (["norm"], 5), (["layernorm"], 4), (["model.norm"], 1)])
def test_modules_to_save_match_peft(saved, copies):
    """The modules peft picks by its suffix rule, as text: "norm" is model.norm and the 2 x 2 decoder layers'
    input_layernorm / post_attention_layernorm, "layernorm" those 4 alone, "model.norm" the last one."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=saved)
    ours, theirs = _pair(lambda: tiny_model("llama"), cfg)
    _assert_parity(ours, theirs)
    assert sum(isinstance(m, scalora.ModulesToSaveWrapper) for m in ours.modules()) == copies


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_print_trainable_parameters_matches_peft(arch):
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear")
    ours = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(**cfg))
    printed = []
    for m in (ours, theirs):
        buf = io.StringIO()
        with redirect_stdout(buf):
            m.print_trainable_parameters()
        printed.append(buf.getvalue())
    assert printed[0] == printed[1]
    assert printed[0].startswith("trainable params: ")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


QUANT = [(4, "nf4", True), (4, "nf4", False), (4, "fp4", True), (4, "fp4", False), (8, None, None)]


@pytest.mark.parametrize("bits,qtype,dq", QUANT, ids=["nf4-dq", "nf4", "fp4-dq", "fp4", "int8"])
def test_quantized_parity(saved_tiny_models, bits, qtype, dq):
    path = saved_tiny_models["llama"]
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours, theirs = _pair(lambda: load_quantized(path, bits, qtype, dq), cfg)
    kinds = {type(m.base_layer).__name__ for m in ours.modules() if isinstance(m, scalora.LoraLayer)}
    assert kinds == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    _assert_parity(ours, theirs)
    # The count of a packed 4-bit model is peft's too
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_lora_output_keeps_input_dtype():
    """A bf16 base with fp32 LoRA weights returns bf16, as the base alone would."""
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    wrapped = scalora.LoraLayer(layer)
    wrapped.update_layer("default", 4, 8, 0.0, True, False)
    randomize_lora(wrapped)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = wrapped(x)
    assert y.dtype == torch.bfloat16 and wrapped.lora_A["default"].weight.dtype == torch.float32
    # two bf16 roundings: the LoRA term's cast to bf16 and the sum's; a LoRA term without its scale (a LoRA term of
    # the base's size) is far outside
    with torch.no_grad():
        wrapped.lora_B["default"].weight.mul_(10)
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    lora = x.float() @ wrapped.lora_A["default"].weight.T @ wrapped.lora_B["default"].weight.T
    ref = layer(x).float() + lora * 2
    assert_rounding_close(wrapped(x).float(), ref, operand_rtol(2), wrong=ref - lora, what="bf16 base + fp32 LoRA")
