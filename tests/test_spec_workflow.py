"""SPEC.md section 1, run as written."""

import io
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from scalora import LoraConfig, PeftType, get_peft_model

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py


class BaseModel(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.linear(x)


def test_spec_section_1_exact_parameters():
    torch.manual_seed(0)
    base_model = BaseModel(dim_in=2, dim_out=4)
    base_w, base_b = base_model.linear.weight.detach().clone(), base_model.linear.bias.detach().clone()
    config = LoraConfig(inference_mode=False, r=1, lora_alpha=4, lora_dropout=0.1,
                        target_modules=["linear"], peft_type=PeftType.LORA)
    lora_model = get_peft_model(model=base_model, peft_config=config)

    out = io.StringIO()
    with redirect_stdout(out):
        for name, param in lora_model.named_parameters():
            print(name, param.shape, param.requires_grad)
    assert out.getvalue().splitlines() == [
        "base_model.model.linear.base_layer.weight torch.Size([4, 2]) False",
        "base_model.model.linear.base_layer.bias torch.Size([4]) False",
        "base_model.model.linear.lora_A.default.weight torch.Size([1, 2]) True",
        "base_model.model.linear.lora_B.default.weight torch.Size([4, 1]) True",
    ]
    params = dict(lora_model.named_parameters())
    assert torch.equal(params["base_model.model.linear.base_layer.weight"], base_w)
    assert torch.equal(params["base_model.model.linear.base_layer.bias"], base_b)
    assert torch.count_nonzero(params["base_model.model.linear.lora_B.default.weight"]) == 0
    a = params["base_model.model.linear.lora_A.default.weight"]
    assert torch.count_nonzero(a) == a.numel()
    # Kaiming-uniform(a=sqrt(5)) on fan_in=2 draws from U(-1/sqrt(2), 1/sqrt(2))
    assert a.abs().max() <= 2 ** -0.5
    lora_model.eval()
    x = torch.randn(3, 2)
    # lora_B is zero: exactly the base layer's own computation (the same kernel, so the same bits on any CPU)
    torch.testing.assert_close(lora_model(x), torch.nn.functional.linear(x, base_w, base_b), rtol=0, atol=0)


def test_spec_init_matches_peft_for_the_same_seed():
    """LoRA weights are created as peft creates them, so a seed gives peft's exact initial adapter."""
    import peft

    def build(lib):
        torch.manual_seed(0)
        model = BaseModel(8, 6)
        torch.manual_seed(1)
        return lib.get_peft_model(model, lib.LoraConfig(r=2, lora_alpha=4, target_modules=["linear"]))

    ours, theirs = build(__import__("scalora")), build(peft)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
