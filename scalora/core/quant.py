"""The base layers LoRA wraps: plain `nn.Linear`, GPT-2 `Conv1D`, bitsandbytes `Linear4bit` / `Linear8bitLt`.

The LoRA forward never looks at the base kind; only merging does, through `dense_weight` / `set_dense_weight`.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import Optional

import torch
from torch import nn

from .errors import UserError

# On AVX512-BF16 CPUs bitsandbytes warns at import that it cannot fetch a kernel for its packed 4-bit CPU format
# ("Failed to load CPU gemm_4bit_forward from kernels-community"): scalora keeps that format off (see
# keep_4bit_weights_plain), so the warning only misleads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def pin_vector_width() -> None:
    """Set inductor's `cpp.simdlen` to the width of the vector instructions it picked for this process (AVX2 256,
    AVX-512 512; ATEN_CPU_CAPABILITY lowers it), unless already set. Called before scalora's compiles: the decoder
    layers' (model.compile) and bitsandbytes' deferred kernels (`_deferred_compile`).

    Inductor's compiled-graph cache is keyed without that width (torch 2.13): a process at AVX2 took a graph cached
    by an AVX-512 process, whose C++ steps 16 floats a loop, compiled it with 8-float vectors and left half of each
    output unwritten (NaN logits; values of 1e31 in a compiled DoRA layer). That happens wherever one cache serves
    two widths: a cache directory shared by nodes of two CPU kinds, a process run with ATEN_CPU_CAPABILITY. The
    width set is part of the key, and the one the process would pick unset (tests/test_lora_training.py
    `test_compiled_layers_keep_their_vector_width_apart`)."""
    import torch._inductor.config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if torch._inductor.config.cpp.simdlen is None:
        torch._inductor.config.cpp.simdlen = pick_vec_isa().bit_width()


def _deferred_compile(compile_fn):
    """A stand-in for `torch.compile` that compiles on the first call instead of at decoration."""

    def defer(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(dynamic=False)
            return lambda f: defer(f, **kwargs)
        compiled = []

        @functools.wraps(fn)
        def call(*args, **kw):
            if not compiled:
                pin_vector_width()
                compiled.append(compile_fn(fn, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return defer


def _import_bitsandbytes():
    """`import bitsandbytes`, with the `torch.compile` it applies at import deferred to first use.

    bitsandbytes 0.50 wraps four default kernels in `torch.compile` when it is imported (its 4-bit and blockwise
    de-quantization fallbacks, its 32-bit optimizer's steps); that call loads inductor's code generators (550 modules,
    networkx among them) whether or not the kernels ever run. On a CPU they run only for odd shapes or blocks of
    2048 and more. Deferred: 41 MB less resident after `import scalora.train` and SmolLM2-135M's bf16 peak 0.91 ->
    0.86 GiB (3 steps, one pair) [amx_bf16 avx512_bf16]; a kernel that does run is compiled on its first call, as
    `torch.compile` itself would (tests/test_quant_import.py).
    """
    if "bitsandbytes" in sys.modules:  # imported before scalora: nothing left to defer
        return sys.modules["bitsandbytes"]
    real = torch.compile
    torch.compile = _deferred_compile(real)
    try:
        import bitsandbytes
    finally:
        torch.compile = real
    return bitsandbytes


try:  # bitsandbytes is a runtime dependency, but keep the core importable where its native library is broken
    bnb = _import_bitsandbytes()
except Exception:  # pragma: no cover - exercised only on broken installs
    bnb = None


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover
        return None
    return Conv1D


Conv1D = _conv1d_class()


def is_4bit(layer: nn.Module) -> bool:
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def is_8bit(layer: nn.Module) -> bool:
    return bnb is not None and isinstance(layer, bnb.nn.Linear8bitLt)


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit layer."""
    return is_4bit(layer) or is_8bit(layer)


def is_conv1d(layer: nn.Module) -> bool:
    return Conv1D is not None and isinstance(layer, Conv1D)


def keep_4bit_weights_plain(model: nn.Module) -> int:
    """Turn off bitsandbytes' packed CPU inference format on every 4-bit layer of `model`; returns how many.

    bitsandbytes (0.49-0.50 at least) gives `Linear4bit` a flag, `support_avx512bf16_for_cpu`, set at construction
    from the CPU. Where it is true, a forward in eval mode on an input that needs no gradient repacks the weight in
    place for a CPU gemv kernel and keeps it that way. That crashes for in-features that do not fit the kernel's
    blocks and, where they fit, later training forwards run the packed kernel: different outputs and no gradient to
    the layer's input, so every LoRA layer below it stops learning, silently. A validation pass in the middle of a
    run is such a forward. So scalora clears the flag on every 4-bit layer it sees (wrapped or not), and undoes a
    packing that already happened. tests/test_cpu_paths.py checks the flag still exists and still gates packing.
    """
    if bnb is None:
        return 0
    n, repacked = 0, []
    for name, module in model.named_modules():
        if not is_4bit(module):
            continue
        module.support_avx512bf16_for_cpu = False
        w = module.weight
        if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
            module.quant_state = w.quant_state
            repacked.append(name or type(module).__name__)
        n += 1
    if repacked:
        warnings.warn(f"{len(repacked)} 4-bit layer(s) (e.g. {repacked[0]}) had been repacked by bitsandbytes for its "
                      "CPU inference kernel (an eval-mode forward before LoRA was added); scalora unpacked them, but "
                      "bitsandbytes rounded their block scales to bfloat16 on the way (measured: up to 0.6% relative "
                      "error per weight). For the exact base, load the model again and add LoRA before any forward.",
                      UserWarning, stacklevel=3)
    return n


def linear_weight_is_meta(layer: nn.Module) -> bool:
    """Whether the layer's weight is still on the meta device (a skeleton loaded layer by layer later)."""
    w = getattr(layer, "weight", None)
    return w is not None and w.is_meta


def keeps_no_output(layer: nn.Module) -> bool:
    """Whether the layer's backward needs none of its forward output (`nn.Linear` itself, bitsandbytes 4-bit and
    8-bit: their autograd functions keep inputs and weights only), so that a sum may add into that output in place.
    Subclasses of `nn.Linear` from elsewhere are not assumed to."""
    return type(layer) is nn.Linear or is_quantized(layer)


def is_conv1d_source(layer: nn.Module) -> bool:
    """Whether a bitsandbytes layer was made from a GPT-2 `Conv1D` (transformers' quantizer records it as
    `source_cls`): its checkpoint tensor is (in, out) while the layer holds (out, in)."""
    source = getattr(layer, "source_cls", None)
    return Conv1D is not None and isinstance(source, type) and issubclass(source, Conv1D)


def is_wrappable(layer: nn.Module) -> bool:
    """Whether LoRA can wrap this layer (bitsandbytes' layers subclass `nn.Linear`)."""
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of any wrappable layer."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]  # Conv1D stores (in, out)
    return layer.in_features, layer.out_features


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    # bitsandbytes moves the row scales from the parameter to `layer.state` after the first forward.
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def dense_weight(layer: nn.Module, weight: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight in full precision (fp32), in the layer's own layout ((in, out) for Conv1D); `weight`: the
    layer's weight tensor as read earlier (FSDP2 swaps the attribute for a shard outside the layer's forward).
    `dtype`: in that dtype instead, converted from what de-quantization gives (a 4-bit base's own dtype) without
    passing through fp32 (the same values: conversions to bf16 or fp16 round from fp32 either way)."""
    w = layer.weight if weight is None else weight
    if is_4bit(layer):
        # FSDP's unsharded parameter is a plain one without it: the module's (bitsandbytes' forward restores it so)
        state = getattr(w, "quant_state", None)
        return bnb.functional.dequantize_4bit(w.data, layer.quant_state if state is None else state).to(dtype)
    if is_8bit(layer):
        return bnb.functional.int8_vectorwise_dequant(w.data, _int8_scales(layer)).to(dtype)
    return w.data.to(dtype)


def require_finite(w: torch.Tensor, what: str) -> None:
    """Refuse a non-finite merged (or unmerged) weight: `what` names it in the message."""
    if not torch.isfinite(w).all():
        raise UserError(f"refusing to write a non-finite {what}: the adapter holds NaN or inf values (check the "
                        "training run that produced it)")


def set_dense_weight(layer: nn.Module, new: torch.Tensor, what: str = "merged", warn: bool = True) -> None:
    """Write a full-precision weight back into the layer, re-quantizing a 4-bit or 8-bit base (`warn`: say that a
    merge rounds; not for a weight quantized once, as PiSSA's residual)."""
    require_finite(new, f"{what} weight into {type(layer).__name__}")
    w = layer.weight
    if is_4bit(layer):
        if warn:
            _warn_rounding("4-bit")
        layer.weight = bnb.nn.Params4bit(
            new.to(w.quant_state.dtype).cpu(), requires_grad=False, blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage,
            module=layer,
        ).to(w.device)
    elif is_8bit(layer):
        if warn:
            _warn_rounding("8-bit")
        layer.weight = bnb.nn.Int8Params(new.cpu(), requires_grad=False,
                                         has_fp16_weights=w.has_fp16_weights).to(w.device)
        layer.state.reset_grads()
        layer.state.SCB = None
        layer.state.CB = None
    else:
        with torch.no_grad():
            w.data.copy_(new.to(w.dtype))


def _warn_rounding(bits: str) -> None:
    warnings.warn(f"Merging into a {bits} base de-quantizes, adds and re-quantizes the weight: the result differs "
                  "from base + adapter by the quantization rounding. Use merge_and_unload(dequantize=True) for a "
                  "full-precision model without that error.", UserWarning, stacklevel=4)


def to_full_precision(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain `nn.Linear` (or the same Conv1D) with the layer's weight in `dtype`."""
    if not is_quantized(layer):
        return layer
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(dense_weight(layer).to(dtype))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.to(dtype))
    return out
