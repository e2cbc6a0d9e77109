"""Bad input: each a clear error that names the value and the fix."""

import pytest
import torch
from torch import nn

import scalora
from conftest import tiny_model


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), r"r=0: the rank must be a positive integer"),
    (dict(r=-2), r"r=-2"),
    (dict(r=2.5), r"r=2.5"),
    (dict(lora_alpha=0), r"lora_alpha=0: must be a positive number"),
    (dict(lora_alpha=-1.0), r"lora_alpha=-1.0"),
    (dict(lora_dropout=1.0), r"lora_dropout=1.0: must be in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout=-0.1"),
    (dict(bias="some"), r"bias='some': must be 'none', 'all' or 'lora_only'"),
    (dict(init_lora_weights="pisa"), r"init_lora_weights='pisa'.*'pissa_niter_<n>'"),
    (dict(target_modules=3), r"target_modules=3"),
    (dict(layers_to_transform=[0], target_modules="q.*"), r"layers_to_transform cannot be combined"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0"),
    (dict(peft_type="IA3"), r"scalora implements LoRA only"),
    (dict(task_type="CAUSAL"), r"task_type='CAUSAL'"),
])
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scalora.LoraConfig(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as e:
        scalora.LoraConfig(r=0, lora_alpha=-1, lora_dropout=2, bias="x")
    text = str(e.value)
    assert all(s in text for s in ("r=0", "lora_alpha=-1", "lora_dropout=2", "bias='x'"))


def test_targets_that_match_nothing_list_what_exists():
    with pytest.raises(ValueError, match=r"matched no module.*'down_proj'.*'q_proj'.*all-linear"):
        scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[9\]"):
        scalora.get_peft_model(tiny_model("llama"),
                               scalora.LoraConfig(target_modules=["q_proj"], layers_to_transform=[9]))


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is a Embedding; LoRA wraps linear layers"):
        scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(target_modules=["embed_tokens"]))


def test_unknown_adapter_names():
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(target_modules=["q_proj"]))
    for call in (model.set_adapter, model.delete_adapter):
        with pytest.raises(ValueError, match=r"no adapter named 'nope'; this model has \['default'\]"):
            call("nope")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'"):
        model.save_pretrained("/tmp/unused", selected_adapters=["nope"])
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", scalora.LoraConfig(target_modules=["q_proj"]))


def test_selection_rules():
    """exclude_modules, layers_to_transform, regex and all-linear choose the modules peft would choose."""
    import peft

    cases = [
        dict(target_modules="all-linear", exclude_modules=["o_proj"]),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        dict(target_modules=r".*\.0\.mlp\.(up|down)_proj"),
        dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
    ]
    for kwargs in cases:
        ours = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kwargs))
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()], kwargs
    lm_head = [n for n, _ in ours.named_parameters() if "lm_head" in n]
    assert lm_head == ["base_model.model.lm_head.weight"]


def test_all_linear_on_a_plain_module_skips_nothing_but_the_head():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    model = scalora.get_peft_model(Net(), scalora.LoraConfig(target_modules="all-linear"))
    assert isinstance(model.base_model.model.a, scalora.LoraLayer)
    assert isinstance(model.base_model.model.b, scalora.LoraLayer)
    assert torch.is_tensor(model.base_model.model.a.weight)  # reads through to the base layer
