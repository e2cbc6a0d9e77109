"""The real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9 / 3 heads, tied embeddings, a
49,152-token vocabulary, a chat template), from the GGUF file `make test` fetches once into ~/.cache/scalora
(`make fetch-smollm2`; `SCALORA_SMOLLM2` names another copy).

- scalora's LoRA on the 4-bit NF4 base equals peft's on it: logits and every LoRA gradient to fp32 rounding;
- `scalora train configs/smollm2-135m.yaml` for a few steps lowers the held-out loss, and the adapter it writes
  loads in peft with the logits scalora gives.
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import scalora
from scalora.core import quant
from scalora.model import resolve_model_path

from conftest import assert_lora_parity, copy_lora, load_quantized, randomize_lora
from helpers import run
from tolerance import assert_rounding_close, logits_rtol

pytestmark = pytest.mark.slow

SMOLLM2 = os.environ.get("SCALORA_SMOLLM2",
                         os.path.expanduser("~/.cache/scalora/SmolLM2-135M-Instruct.Q4_1.gguf"))
PROMPT = [{"role": "user", "content": "Which topic is this sentence about? Answer with one word.\n"
                                      "the chef baked the bread near the oven ."}]


@pytest.fixture(scope="module")
def smollm2(env):
    """(the plain folder the GGUF file converts into, its tokenizer), converted into the cache the CLI runs of the
    session use, so that they read it instead of converting again."""
    if not os.path.isfile(SMOLLM2):
        pytest.fail(f"{SMOLLM2} is missing: `make fetch-smollm2` fetches it (make test does it first)")
    saved = os.environ.get("SCALORA_CACHE")
    os.environ["SCALORA_CACHE"] = env["env"]["SCALORA_CACHE"]
    try:
        folder = resolve_model_path(SMOLLM2)
    finally:
        os.environ.pop("SCALORA_CACHE") if saved is None else os.environ.__setitem__("SCALORA_CACHE", saved)
    from transformers import AutoTokenizer

    return folder, AutoTokenizer.from_pretrained(folder)


def _ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) + "food"
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_lora_on_the_4bit_real_model_equals_peft(smollm2):
    folder, tokenizer = smollm2
    base = load_quantized(folder, 4)
    assert base.config.vocab_size == 49152 and base.config.num_key_value_heads == 3 and base.config.tie_word_embeddings
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    ours = scalora.get_peft_model(base, scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(load_quantized(folder, 4), peft.LoraConfig(**cfg))
    quant.keep_4bit_weights_plain(theirs)  # bitsandbytes' packed CPU kernel off in the reference too (STACK.md)
    randomize_lora(ours)
    copy_lora(ours, theirs)
    assert_lora_parity(ours, theirs, _ids(tokenizer))


@pytest.fixture(scope="module")
def trained(smollm2, env, tmp_path_factory):
    """A 4-step run of configs/smollm2-135m.yaml from the GGUF file (fp32 compute), 8 examples a step (the config's
    16 took twice the time for the same fall of the loss): (run folder, its stdout)."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    p = run(env, "train", "configs/smollm2-135m.yaml", f"model.name_or_path={SMOLLM2}", "train.max_steps=4",
            "train.global_batch_size=8",
            "train.eval_every=0", "train.save_every=0", "train.warmup_ratio=0", "data.max_eval_examples=16",
            "data.max_eval_generate=0", "log.report_to=none", "model.dtype=float32", f"train.output_dir={out}")
    return out, p.stdout


def _plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_few_steps_lower_the_loss_and_the_adapter_loads_in_peft(smollm2, trained):
    folder, tokenizer = smollm2
    out, stdout = trained
    summary = json.loads((out / "summary.json").read_text())
    first, last = summary["first_eval"]["eval/loss"], summary["final_eval"]["eval/loss"]
    assert last < 0.7 * first, (first, last)  # 2.83 -> 0.97 in 4 steps of lr 2e-4 [avx2] (a step's noise: far less)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf | 4-bit base" in stdout

    ids = _ids(tokenizer)
    ours = scalora.PeftModel.from_pretrained(_plain(folder), str(out / "final")).eval()
    theirs = peft.PeftModel.from_pretrained(_plain(folder), str(out / "final")).eval()
    with torch.no_grad():
        bare = _plain(folder)(input_ids=ids).logits
        assert_rounding_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, logits_rtol(_plain(folder)),
                              wrong=bare, what="adapted logits, scalora vs peft (wrong: the base alone)")


def test_the_fine_tune_exports_to_gguf_as_merged(smollm2, trained, env):
    """`scalora export --gguf` of the real fine-tune (f32), read back by transformers' GGUF reader: the logits of
    `scalora merge`'s folder (both merge the adapter into the de-quantized 4-bit base, as trained) to fp32 rounding,
    the same token ids for a chat prompt, the same chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tokenizer = smollm2
    out, _ = trained
    run(env, "merge", str(out / "final"), "--out", str(out / "merged"))
    run(env, "export", str(out / "final"), "--gguf", str(out / "gguf" / "m.gguf"), "--type", "f32")
    from scalora.gguf_base import parsed_once

    with parsed_once():  # transformers' reader, the file parsed once for the weights and the tokenizer
        read = AutoModelForCausalLM.from_pretrained(str(out / "gguf"), gguf_file="m.gguf", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(out / "gguf"), gguf_file="m.gguf")
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template
    ids = _ids(tokenizer)
    merged = _plain(str(out / "merged"))
    with torch.no_grad():
        assert_rounding_close(read(input_ids=ids).logits, merged(input_ids=ids).logits, logits_rtol(merged),
                              wrong=_plain(smollm2[0])(input_ids=ids).logits,
                              what="GGUF read back vs merged (wrong: the base without the fine-tune)")
