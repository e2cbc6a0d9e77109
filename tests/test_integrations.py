"""A peft user's Trainer / SFTTrainer script with only the import changed: the same losses as with peft, adapters
that peft loads with the same logits, checkpoints that resume; and the peft API nothing of which falls through."""

from __future__ import annotations

import inspect
import json
from unittest import mock

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import scalora
from scalora.core import quant

from conftest import tokens
from tolerance import assert_losses_close, assert_rounding_close, logits_rtol, rel_diff, rounding_rtol, trained_rtol

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1, task_type="CAUSAL_LM")
LIBS = {"scalora": scalora, "peft": peft}


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A tiny Llama with the builtin tokenizer, saved as a real model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalora.builtin import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("trainer") / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _adapted(lib: str, path: str):
    """The script's model: a 4-bit base and get_peft_model, from `lib` (the only line that changes)."""
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32)
    torch.manual_seed(1)
    adapted = LIBS[lib].get_peft_model(model, LIBS[lib].LoraConfig(**LORA))
    quant.keep_4bit_weights_plain(adapted)  # peft's too: bitsandbytes' plain 4-bit path (tests/test_cpu_paths.py)
    return adapted


def _token_rows(n: int = 48):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(8, 200, (16,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 16, "source": "unused column"})
    return Dataset.from_list(rows)


def _trainer(lib: str, path: str, out, **args):
    targs = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                              logging_steps=1, save_steps=3, report_to=[], seed=0, **args)
    return Trainer(model=_adapted(lib, path), args=targs, train_dataset=_token_rows())


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(base_path, tmp_path_factory):
    """The same Trainer script run with scalora and with peft (default TrainingArguments otherwise, so
    remove_unused_columns=True drops the extra column by the forward's argument names)."""
    runs = {}
    for lib in LIBS:
        out = tmp_path_factory.mktemp(f"trainer-{lib}")
        trainer = _trainer(lib, base_path, out)
        trainer.train()
        trainer.save_model(str(out / "final"))
        runs[lib] = (trainer, out)
    return runs


def test_trainer_gives_peft_losses(trained):
    ours, theirs = _losses(trained["scalora"][0]), _losses(trained["peft"][0])
    assert len(ours) == 6
    assert_losses_close(ours, theirs, trained["scalora"][0].model.get_base_model())
    assert isinstance(trained["scalora"][0].model, scalora.PeftModel)


def test_save_model_writes_a_peft_adapter_that_peft_loads(trained, base_path):
    trainer, out = trained["scalora"]
    files = sorted(p.name for p in (out / "final").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "model.safetensors" not in files
    tensors = load_file(out / "final" / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)  # nothing of the base
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for ckpt in ("checkpoint-3", "checkpoint-6"):  # the Trainer's checkpoints hold the adapter the same way
        assert (out / ckpt / "adapter_model.safetensors").exists() and not (out / ckpt / "model.safetensors").exists()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, quantization_config=q, dtype=torch.float32), out / "final")
    quant.keep_4bit_weights_plain(reloaded)
    ids = tokens(batch=2, length=12)
    ours = _logits(trainer.model, ids)
    with reloaded.disable_adapter():
        bare = _logits(reloaded, ids)  # the trained adapter changes the output far beyond rounding...
    assert_rounding_close(_logits(reloaded, ids), ours, logits_rtol(reloaded.get_base_model()), wrong=bare,
                          what="logits")  # ...and peft gives the same


def test_trainer_resumes_from_its_checkpoint(trained, base_path, tmp_path):
    """resume_from_checkpoint=checkpoint-3 of the scalora run: the same losses and adapter as the whole run."""
    import shutil

    whole, out = trained["scalora"]
    shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")
    resumed = _trainer("scalora", base_path, tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    base = whole.model.get_base_model()
    assert_losses_close(_losses(resumed), _losses(whole), base)  # 1-3 from the checkpoint
    assert resumed.state.global_step == 6
    resumed.save_model(str(tmp_path / "final"))
    assert load_file(tmp_path / "final" / "adapter_model.safetensors").keys() == \
        load_file(out / "final" / "adapter_model.safetensors").keys()
    # the adapters by what they do (tests/helpers.py's assert_runs_agree): rounding, plus 3 steps' worth of it
    ids = tokens(batch=2, length=12)
    expected, got = _logits(whole.model, ids), _logits(resumed.model, ids)
    with whole.model.disable_adapter():
        bare = _logits(whole.model, ids)
    rtol = trained_rtol(base, 3, rel_diff(bare, expected))
    assert_rounding_close(got, expected, rtol, wrong=bare, what="resumed against whole")


def test_sft_trainer_gives_peft_losses_and_a_peft_adapter(base_path, tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from scalora.builtin import generate_topics

    rows = [{"text": r["input"] + " it is about " + r["output"]} for r in generate_topics()["train"][:48]]
    losses, models = {}, {}
    for lib in LIBS:
        args = SFTConfig(output_dir=str(tmp_path / lib), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0, max_length=64,
                         use_cpu=True)  # SFTConfig asks for bf16 and a GPU unless told it runs on the CPU
        trainer = SFTTrainer(model=_adapted(lib, base_path), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(base_path))
        trainer.train()
        trainer.save_model(str(tmp_path / lib / "final"))
        losses[lib], models[lib] = _losses(trainer), trainer.model
    assert len(losses["scalora"]) == 4
    assert_losses_close(losses["scalora"], losses["peft"], models["peft"].get_base_model())
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                              tmp_path / "scalora" / "final")
    ours = scalora.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                             str(tmp_path / "scalora" / "final"))
    ids = tokens(batch=2, length=12)
    with reloaded.disable_adapter():
        bare = _logits(reloaded, ids)
    assert_rounding_close(_logits(reloaded, ids), _logits(ours, ids), logits_rtol(reloaded.get_base_model()),
                          wrong=bare, what="logits")


# --- the peft API: nothing peft gives its own meaning falls through to the base -------------------------------------
@pytest.fixture()
def model(base_path):
    return _adapted("scalora", base_path)


def test_recognised_where_transformers_and_accelerate_look(model):
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model, validate_quantization_for_training

    assert isinstance(model, peft.PeftModel) and is_peft_model(model) and _is_peft_model(model)
    validate_quantization_for_training(model)  # no "purely quantized" refusal
    assert model.is_quantized is True


def test_forward_shows_the_base_signature(model):
    names = list(inspect.signature(model.forward).parameters)
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "labels" in names
    ids = tokens(batch=1, length=8)
    torch.testing.assert_close(model(input_ids=ids).logits, model.forward(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.numerics
def test_adapter_switches(model):
    """disable / enable_adapter_layers, set_adapter with one name or a list (whose LoRA outputs add up)."""
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)

    def out():
        model.eval()
        with torch.no_grad():
            return layer(x)

    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.disable_adapter_layers()
    plain = out()
    torch.testing.assert_close(plain, layer.base_layer(x), rtol=0, atol=0)
    model.enable_adapter_layers()
    default = out()
    model.set_adapter("other")
    other = out()
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    # one LoRA layer's output: sums of 64 terms, then of three outputs; either adapter alone lies far outside
    rtol = rounding_rtol(64, depth=2)
    assert_rounding_close(out(), default + other - plain, rtol, wrong=default, what="both adapters")
    assert_rounding_close(out(), default + other - plain, rtol, wrong=other, what="both adapters")
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "other"}
    with pytest.raises(NotImplementedError, match="set_adapter\\(\\[name1, name2\\]\\)"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")


def test_push_to_hub_uploads_the_adapter_only(model, tmp_path):
    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        import os

        uploaded.update(repo=repo_id, files=sorted(os.listdir(folder_path)))
        uploaded["tensors"] = load_file(os.path.join(folder_path, "adapter_model.safetensors"))

    with mock.patch("huggingface_hub.HfApi.create_repo"), mock.patch("huggingface_hub.HfApi.upload_folder",
                                                                      side_effect=upload_folder):
        model.push_to_hub("me/my-adapter")
    assert uploaded["repo"] == "me/my-adapter"
    assert uploaded["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(".lora_" in k for k in uploaded["tensors"])


def test_peft_config_accepted_and_peft_only_attributes_refused(base_path):
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    ours = scalora.get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), theirs)
    cfg = ours.peft_config["default"]
    assert isinstance(cfg, scalora.LoraConfig) and (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.05)
    assert sorted(cfg.target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="lora_bias=True"):
        scalora.get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                               peft.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    assert not hasattr(ours, "get_layer_status")  # peft's, not scalora's: refused, not run on scalora's layers
    with pytest.raises(AttributeError, match="belongs to peft's PeftModel and is not part of scalora"):
        ours.get_layer_status()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["examples/trainer.py", "examples/sft_trl.py", "examples/quickstart.py"])
def test_readme_examples_run(env, tmp_path, script):
    """The README's examples, as shipped: each finishes and writes a PEFT-format adapter. Each runs as `python
    SCRIPT` would, in a process forked from the session's pre-imported interpreter (tests/zygote.py)."""
    p = env["zygote"].run([str(tmp_path / "out")], env["env"], script=script)
    assert p.returncode == 0, p.stderr[-3000:]
    if "quickstart" in script:
        assert "['adapter_config.json', 'adapter_model.safetensors']" in p.stdout
    else:
        final = tmp_path / "out" / "final"
        assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
        losses = eval(p.stdout.strip().splitlines()[-1].split("losses:")[1])
        assert len(losses) == 4 and losses[-1] < losses[0]
