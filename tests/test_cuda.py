"""The CUDA paths: bitsandbytes' CUDA kernels under LoRA against peft, bf16 chosen by itself, paged 8-bit AdamW, CUDA
peak memory, a GPU run against the same run on the CPU, and the GPU-only speed levers against the plain path.

Every test here needs a CUDA GPU and is skipped, with that reason, anywhere else: on CPU-only machines these tests
are not run and prove nothing. Run them on a GPU machine with `bench/gpu.sh` (or `pytest -m cuda`).
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import scalora
from conftest import assert_lora_parity, copy_lora, randomize_lora, tokens
from helpers import losses, run, train_args
from tolerance import assert_rounding_close, bf16_loss_rtol, logits_rtol, rounding_rtol

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these)")]



def _load_on_cuda(path: str, bits: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": "cuda"},
                                                dtype=dtype).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_matches_peft_on_cuda(bits, saved_tiny_models):
    """bitsandbytes' CUDA kernels under scalora's LoRA layers and under peft's: same logits and LoRA gradients."""
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours = scalora.get_peft_model(_load_on_cuda(saved_tiny_models["llama"], bits, torch.float32),
                                  scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(_load_on_cuda(saved_tiny_models["llama"], bits, torch.float32),
                                 peft.LoraConfig(**cfg))
    randomize_lora(ours)
    copy_lora(ours, theirs)
    assert_lora_parity(ours, theirs, tokens().cuda())


def test_auto_dtype_is_bf16_on_cuda():
    from scalora.hardware import compute_dtype

    dtype, why = compute_dtype("auto", 4096)
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), why
    assert torch.cuda.get_device_name() in why


@pytest.fixture(scope="module")
def cuda_runs(env, tmp_path_factory):
    """The same short run three ways: on the GPU with AdamW, on the GPU with paged 8-bit AdamW, on the CPU."""
    root = tmp_path_factory.mktemp("cuda-runs")
    common = ["train.max_steps=8", "train.eval_every=0", "train.save_every=0", "lora.lora_dropout=0"]
    out = {"gpu": root / "gpu", "paged": root / "paged", "cpu": root / "cpu"}
    run(env, *train_args(out["gpu"], *common))
    run(env, *train_args(out["paged"], *common, "train.optimizer=paged_adamw_8bit"))
    run({**env, "env": dict(env["env"], CUDA_VISIBLE_DEVICES="")}, *train_args(out["cpu"], *common))
    return out


def test_gpu_run_equals_the_cpu_run(cuda_runs):
    """bf16 on the GPU (auto), fp32 on the CPU: the same losses step by step to bf16's rounding (bf16_loss_rtol;
    fp16, where the GPU has no bf16, rounds finer)."""
    gpu, cpu = losses(cuda_runs["gpu"]), losses(cuda_runs["cpu"])
    assert gpu.keys() == cpu.keys() and len(gpu) == 8
    for step in gpu:
        assert_rounding_close(torch.tensor([gpu[step]]), torch.tensor([cpu[step]]), bf16_loss_rtol(step),
                              what=f"step {step}")
    summary = json.load(open(os.path.join(cuda_runs["gpu"], "summary.json")))
    assert summary["compute_dtype"] in ("bfloat16", "float16")


def test_paged_adamw_8bit_steps_on_cuda(cuda_runs):
    paged, plain = losses(cuda_runs["paged"]), losses(cuda_runs["gpu"])
    assert paged[8] < paged[1]
    assert paged[8] == pytest.approx(plain[8], rel=0.1)  # 8-bit state: close to AdamW's path over 8 steps


def test_cuda_peak_memory_is_reported(cuda_runs):
    """summary.json's peak is torch.cuda.max_memory_allocated of the training (a GPU figure, not host RSS)."""
    summary = json.load(open(os.path.join(cuda_runs["gpu"], "summary.json")))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert 0 < summary["peak_memory_gb"] < total
    cpu = json.load(open(os.path.join(cuda_runs["cpu"], "summary.json")))
    assert summary["peak_memory_gb"] < cpu["peak_memory_gb"]  # no Python runtime in the GPU figure


def _llama_on_cuda(dtype: torch.dtype, seed: int = 0):
    from conftest import tiny_model

    return tiny_model("llama", seed).to("cuda", dtype)


def test_liger_kernels_match_the_plain_model():
    """model.liger_kernel: RMSNorm, RoPE and SwiGLU from liger-kernel give the plain model's logits and gradients."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (bench/gpu.sh installs it)")
    from scalora.model import apply_liger_kernel

    plain, fused = _llama_on_cuda(torch.float32), _llama_on_cuda(torch.float32)
    apply_liger_kernel(fused)
    ids = tokens().cuda()
    a, b = plain(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert_rounding_close(b.logits, a.logits, logits_rtol(plain), what="logits")
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert_rounding_close(q.grad, p.grad, logits_rtol(plain, backward=True), what=n)


def test_liger_fused_linear_cross_entropy_matches_the_plain_loss():
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (bench/gpu.sh installs it)")
    from scalora.loss import token_loss_sum

    model = _llama_on_cuda(torch.float32)
    model.config.use_cache = False
    ids = tokens().cuda()
    batch = {"input_ids": ids, "labels": ids}
    plain = token_loss_sum(model, batch, chunked=False)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = token_loss_sum(model, batch, chunked="liger")
    fused.backward()
    # only the head and the loss are computed differently: 3 stages (as tests/test_loss.py)
    rtol = rounding_rtol(model.config.vocab_size, depth=3)
    assert_rounding_close(fused.reshape(1), plain.reshape(1), rtol, what="loss")
    for n, p in model.named_parameters():
        assert_rounding_close(p.grad, want[n], rtol, what=n)


def test_compiled_layers_on_cuda_give_the_eager_losses(env, tmp_path):
    common = ["train.max_steps=6", "train.eval_every=0", "train.save_every=0", "lora.lora_dropout=0"]
    run(env, *train_args(tmp_path / "eager", *common))
    run(env, *train_args(tmp_path / "compiled", *common, "model.compile=true"))
    compiled = losses(tmp_path / "compiled")
    for step, want in losses(tmp_path / "eager").items():  # model.dtype auto: bf16 (or fp16, finer) on GPUs
        assert_rounding_close(torch.tensor([compiled[step]]), torch.tensor([want]), bf16_loss_rtol(step),
                              what=f"step {step}")
