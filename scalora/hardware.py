"""What the hardware runs fast: the CPU's features and the compute dtype `model.dtype: auto` resolves to.

On GPUs: bf16 where the GPU has it, else fp16. On CPUs the choice rests on bench/dtype.py (BENCHMARKS.md, section
"Compute dtype"), measured on a 2-core Intel Xeon with AMX: a 2048 x 2048 bf16 matmul ran 6.2-6.5x faster than fp32
(2.2x with AVX512-BF16 alone, about 25x slower on AVX2-only CPUs, STACK.md), but a whole QLoRA step only gained where
the matmuls are large enough to outweigh bf16's casts and the size-independent work (dropout masks above all):
bf16 / fp32 tokens/s 0.88 at hidden size 256, 1.18 at 512, 1.21 at 768. So `auto` is bf16 on CPUs with AMX for
models of hidden size >= 512, fp32 otherwise. A CPU-feature rule, not a timing at start-up: every start of a run on
the same machine makes the same choice, so a resumed run keeps its dtype.
"""

from __future__ import annotations

import platform
from typing import Any, Optional

import torch

# The features the dtype rule and the benchmarks report, in the order they are printed.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _torch_flags() -> set[str]:
    """The same features from torch's own CPU detection (cpuinfo), where /proc/cpuinfo is not there."""
    checks = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = set()
    for flag, fn in checks.items():
        try:
            if getattr(torch.cpu, fn)():
                found.add(flag)
        except Exception:  # private helpers: absent in some torch builds
            pass
    return found


def cpu_features() -> dict[str, Any]:
    """{"model": CPU name, "flags": the FEATURES this CPU has}."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags is None:
        flags = _torch_flags()
    return {"model": model, "flags": [f for f in FEATURES if f in flags]}


# The smallest hidden size at which a bf16 step was measured faster than fp32 on an AMX CPU (bench/dtype.py).
BF16_MIN_HIDDEN = 512


def fast_cpu_bf16(features: dict[str, Any], hidden_size: Optional[int]) -> bool:
    """Whether a bf16 QLoRA step beats fp32 on this CPU: measured so only with AMX, and from hidden size 512."""
    return "amx_bf16" in features["flags"] and (hidden_size or 0) >= BF16_MIN_HIDDEN


def compute_dtype(name: str, hidden_size: Optional[int] = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for `model.dtype`: the named one, or for "auto" what the hardware runs fast for a model of this
    hidden size (None: unknown, taken as small)."""
    if name != "auto":
        return getattr(torch, name), f"model.dtype={name}"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"auto: {gpu} has bf16"
        return torch.float16, f"auto: {gpu} has no bf16"
    feats = cpu_features()
    have = ", ".join(feats["flags"]) or "no AVX2"
    if fast_cpu_bf16(feats, hidden_size):
        return torch.bfloat16, f"auto: CPU with AMX ({have}), hidden size {hidden_size} >= {BF16_MIN_HIDDEN}"
    if "amx_bf16" in feats["flags"]:
        return torch.float32, (f"auto: CPU with AMX ({have}) but hidden size {hidden_size} < {BF16_MIN_HIDDEN}, "
                               "where fp32 steps were measured faster")
    return torch.float32, f"auto: CPU without AMX ({have}), where fp32 steps were measured faster than bf16"


# torch's bf16 matmuls on CPUs go through oneDNN, and two caches keep what each matmul shape built, 1,024 shapes
# each by default: oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep's computation cache, torch's
# C++ wrapper around oneDNN (LRU_CACHE_CAPACITY). Padded micro-batches bring a new length, so new shapes, every
# step: a 30m-parameter bf16 run with padded batches held ~11 MiB more after each micro-batch, and its live peak was
# 1.22x a peft loop's fp32 peak after 4 steps, growing with every step. Capping either cache alone leaves the other
# growing (`tests/test_cpu_paths.py` measures both). Both at 64: 0.92x the peft loop's live peak at the same speed
# as 128 and 32 (705 / 702 / 707 tokens/s, BENCHMARKS.md section 6), with room for models with more shapes than
# that run's. A value the environment sets is kept.
ONEDNN_CACHE = "64"
ONEDNN_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_onednn_cache() -> None:
    """Cap oneDNN's primitive cache and ideep's computation cache (`ONEDNN_CACHE_VARS`) unless the environment sets
    them; both are read when the first bf16 matmul builds its primitive, so call before it."""
    import os

    for name in ONEDNN_CACHE_VARS:
        os.environ.setdefault(name, ONEDNN_CACHE)
