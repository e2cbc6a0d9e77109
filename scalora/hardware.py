"""What the hardware runs fast: the CPU's features and the compute dtype `model.dtype: auto` resolves to.

On GPUs: bf16 where the GPU has it, else fp16. On CPUs a fixed rule per CPU kind and model size, resting on whole
QLoRA steps measured side by side in both dtypes (bench/dtype.py; BENCHMARKS.md section 4), never on a timing at
start-up: every start of a run on the same machine makes the same choice, and a resumed run keeps the dtype its
checkpoint was computed in (scalora.train.kept_compute_dtype). The kinds (`cpu_kind`), what was measured on each
(`MEASURED`) and the rule:

- AMX (Intel Xeon): bf16 from hidden size 512. A 2048 x 2048 bf16 matmul runs 6.2-6.5x fp32, but a step gains only
  where the matmuls outweigh bf16's casts and the size-independent work.
- AVX512-BF16 without AMX on AMD EPYC: bf16 from hidden size 512 (a Zen 5: 1.18x at 256, 1.52x at 512; a Zen 4:
  1.42x at 576, smaller sizes not measured there).
- AVX512-BF16 without AMX on Intel: fp32 (measured only on a Xeon with AMX turned off in oneDNN: bf16 slower).
- AVX2 without AVX512-BF16: fp32 (bf16 about 25x slower).
- AVX-512 without AVX512-BF16, no AVX2, or AVX512-BF16 of an unknown vendor: fp32, and the reason says that bf16
  was never measured on that kind.
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
    """{"model": CPU name, "vendor": "GenuineIntel" / "AuthenticAMD" / "" where unknown, "flags": the FEATURES this
    CPU has}."""
    model, flags, vendor = platform.processor() or platform.machine(), None, ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags is None:
        flags = _torch_flags()
    return {"model": model, "vendor": vendor, "flags": [f for f in FEATURES if f in flags]}


def cpu_kind(features: dict[str, Any]) -> str:
    """The CPU kind the dtype rule and the benchmarks are keyed by, from the best bf16 / vector feature the CPU has:
    "amx", "avx512_bf16-amd" / "avx512_bf16-intel" / "avx512_bf16" (vendor unknown), "avx512", "avx2" or
    "baseline". AVX512-BF16 without AMX is split by vendor: the same instructions ran at other speeds (bf16 / fp32
    matmul 2.2x on an AMD EPYC, 0.61x on an Intel Xeon with AMX turned off in oneDNN)."""
    flags = features["flags"]
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        vendor = {"AuthenticAMD": "-amd", "GenuineIntel": "-intel"}.get(features.get("vendor", ""), "")
        return "avx512_bf16" + vendor
    for kind, flag in (("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "baseline"


# Per CPU kind: the smallest hidden size from which `auto` picks bf16 (None: fp32 at every size), and what that rests
# on: bf16 / fp32 useful tokens/s of whole QLoRA steps (4-bit NF4 base, LoRA r=16 on all linear layers, gradient
# checkpointing, 2 threads, bench/dtype.py), with the CPU each was measured on. A kind absent here was never
# measured: fp32, and the reason says so.
BF16_MIN_HIDDEN = {"amx": 512, "avx512_bf16-amd": 512, "avx512_bf16-intel": None, "avx2": None}
MEASURED = {
    "amx": "bf16 / fp32 steps 0.88x at hidden 256, 1.18x at 512, 1.21x at 768 (Intel Xeon with AMX, 2026-11-25)",
    # from 512 (not 256, where the AMX kind lost): a Zen 5 measured faster from 256, a Zen 4 only at 576
    "avx512_bf16-amd": "bf16 / fp32 steps 1.42x on SmolLM2-135M, hidden 576 (AMD EPYC with AVX512-BF16, no AMX, "
                       "a Zen 4, 2026-12-02); 1.18x at hidden 256 and 1.52x at 512 (a Zen 5, 2026-12-04); hidden "
                       "512 not measured on a Zen 4",
    "avx512_bf16-intel": "bf16 / fp32 steps 0.46x at hidden 256, 0.63x at 512, 0.72x at 576 (an Intel Xeon with AMX "
                         "turned off in oneDNN, ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, standing in for this kind, "
                         "2026-12-02)",
    "avx2": "bf16 steps about 25x slower than fp32 (AMD EPYC with AVX2 only, 2026-11-23): no bf16 arithmetic in "
            "hardware",
}


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
    kind = cpu_kind(feats)
    cpu = f"CPU of kind {kind} ({', '.join(feats['flags']) or 'no AVX2'})"
    if kind not in MEASURED:
        return torch.float32, f"auto: {cpu}: bf16 not measured on this CPU kind, so fp32"
    threshold = BF16_MIN_HIDDEN[kind]
    if threshold is None:
        return torch.float32, f"auto: {cpu}: fp32, as measured: {MEASURED[kind]}"
    if (hidden_size or 0) >= threshold:  # measured faster in bf16 from this size on
        return torch.bfloat16, f"auto: {cpu}, hidden size {hidden_size} >= {threshold}: bf16, measured faster: " \
                               f"{MEASURED[kind]}"
    return torch.float32, (f"auto: {cpu}, hidden size {hidden_size} < {threshold}: fp32, bf16 measured faster only "
                           f"from {threshold}: {MEASURED[kind]}")


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
