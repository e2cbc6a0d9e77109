"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment for CLI subprocesses: the builtin base built once into a private cache, no hub, no wandb key; the
    pre-imported interpreter that `helpers.run` forks them from (tests/zygote.py)."""
    from scalora import malloc
    from scalora.builtin import tiny_llama_path
    from zygote import Zygote

    cache = tmp_path_factory.mktemp("cache")
    base = tiny_llama_path(str(cache))
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    e.update(SCALORA_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    e = malloc.preload_env(e)  # the allocator the `scalora` command starts itself with, for the runs forked too
    zygote = Zygote(e, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    yield {"env": e, "base": base, "root": tmp_path_factory.mktemp("runs"), "zygote": zygote}
    zygote.close()


@pytest.fixture(scope="session")
def untrained_base(tmp_path_factory):
    """builtin:tiny-llama's shape and tokenizer with its random initial weights, saved like a checkpoint: for tests of
    shapes and byte counts, which do not need the `env` fixture's pretraining (~30 s on an AVX2-only CPU)."""
    from scalora.builtin import tiny_llama

    path = tmp_path_factory.mktemp("untrained") / "tiny-llama"
    model, tokenizer = tiny_llama(pretrained=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def dist_reference(env):
    """One process training configs/tiny.yaml with the multi-process tests' settings (tests/helpers.py's DIST):
    the run every 2-process run must reproduce (tests/test_dist.py, tests/test_faults.py)."""
    from helpers import DIST, run

    out = env["root"] / "dist-single"
    run(env, "train", "configs/tiny.yaml", *DIST, f"train.output_dir={out}")
    return out


def tiny_config(arch: str):
    """A few-thousand-parameter transformers config of a real architecture."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "qwen2":  # biases on q/k/v: exercises bias="all" / "lora_only"
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":  # Conv1D layers, (in, out) weights
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def saved_tiny_models(tmp_path_factory):
    """Each tiny architecture saved with save_pretrained, so tests load it the way a real model is loaded."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for arch in ("llama", "qwen2", "gpt2"):
        path = root / arch
        tiny_model(arch).save_pretrained(path)
        paths[arch] = str(path)
    return paths


def load_quantized(path: str, bits: int, quant_type: str = "nf4", double_quant: bool = True,
                   dtype: torch.dtype = torch.float32):
    """The saved model with its linear layers quantized by bitsandbytes; `dtype`: the non-quantized weights' and the
    4-bit compute dtype (bf16: the base as `scalora train` runs it in bf16, under autocast)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype).eval()


def randomize_lora(model, seed: int = 1) -> None:
    """Give every lora_B a non-zero value so that parity tests compare a real adapter, not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def randomize_dora(model, seed: int = 1) -> None:
    """lora_A and lora_B random (B non-zero, so that the direction moves), the magnitude its initial norms times
    1 + 0.2 N(0, 1) (so that it is not the no-op m = n)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def copy_lora(src, dst) -> None:
    """Copy LoRA weights between two models whose parameter names agree (scalora <-> peft)."""
    src_params = dict(src.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if "lora_" in name:
                p.copy_(src_params[name])
                n += 1
    assert n > 0, "no LoRA parameters copied"


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def assert_lora_parity(ours, theirs, ids: torch.Tensor) -> None:
    """scalora's and peft's models: the same parameter names and trainable set, logits and every LoRA gradient
    (non-zero) equal to rounding (`tolerance.logits_rtol`, forward and backward), on the token batch `ids`; the
    logits without the adapter (what a LoRA layer that lost its term would give) lie far outside that tolerance."""
    from tolerance import assert_rounding_close, logits_rtol

    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    with torch.no_grad(), theirs.disable_adapter():
        bare = theirs(input_ids=ids).logits
    out_o = ours(input_ids=ids, labels=ids)
    out_t = theirs(input_ids=ids, labels=ids)
    rtol, grad_rtol = logits_rtol(ours.get_base_model()), logits_rtol(ours.get_base_model(), backward=True)
    assert_rounding_close(out_o.logits, out_t.logits, rtol, wrong=bare, what="logits")
    out_o.loss.backward()
    out_t.loss.backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert_rounding_close(p.grad, grads_t[n], grad_rtol, what=n)
            checked += 1
    assert checked > 0


def pytest_sessionfinish(session, exitstatus):
    """SCALORA_TOLERANCE_REPORT=FILE: every rounding comparison of the run, with its tolerance (tests/tolerance.py)."""
    from tolerance import write_report

    write_report()
