"""Initialisations computed from the base weight: PiSSA, OLoRA and LoftQ (`init_lora_weights`), as peft computes
them, and the conversion of a PiSSA / OLoRA adapter into plain LoRA on save.

- PiSSA (arXiv 2404.02948): B A = the top-r singular part of W (`"pissa"`: a full SVD; `"pissa_niter_<n>"`: torch's
  randomized `svd_lowrank` with n subspace iterations), the base becomes the residual W - scaling * B A.
- OLoRA (arXiv 2406.01775): B, A = the first r columns of Q and rows of R of W's QR decomposition, the base the
  residual as for PiSSA.
- LoftQ (arXiv 2310.08659), for a 4-bit or 8-bit base: B A = the top-r singular part of the quantization error
  W - dequant(Q(W)), so that Q(W) + scaling * B A is nearer W than Q(W) is; the base is left as it is (peft's
  `replace_lora_weights_loftq`, one iteration).

On a quantized base the original weight W comes from the checkpoint (`CheckpointWeights`), not from de-quantizing:
PiSSA and OLoRA then quantize their residual once (peft de-quantizes and re-quantizes OLoRA's base, and refuses
PiSSA there), and LoftQ needs W itself. Each factor is divided by sqrt(scaling) in LoftQ as PiSSA does, so that
the model at initialisation is the intended one whatever lora_alpha / r is (peft leaves LoftQ's scaling out,
peft#1982; the two agree when lora_alpha == r). `pissa_niter_<n>` draws its random matrices from a fixed seed, so
that the same weights give the same adapter (and base) in every process and on every load.

PiSSA and OLoRA change the base, so their adapter only fits the residual base. `convert_to_lora` turns it into
plain LoRA on the original base: with W = W_res + s B0 A0, W_res + s B A = W + s [B | -B0] [A ; A0], a rank-2r
adapter with lora_alpha doubled (sqrt(2)x with rsLoRA) so the scaling stays s (peft's
`path_initial_model_for_weight_conversion`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import quant
from .errors import UserError
from .lora_config import PISSA_NITER, weight_init_kind as kind

_NITER_SEED = 0  # pissa_niter's random draws: one fixed stream, so that every process and every load agree


def changes_base(init: Any) -> bool:
    """Whether the initialisation leaves the residual in the base (PiSSA, OLoRA): its adapter fits that base only."""
    return kind(init) in ("pissa", "olora")


@torch.no_grad()
def factors(init: str, w: torch.Tensor, r: int, scaling: float, quantized: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of initialisation `init` for the fp32 (out, in) weight `w` (`quantized`: LoftQ's de-quantized base),
    in peft's order of operations."""
    which = kind(init)
    if which == "pissa":
        niter = PISSA_NITER.fullmatch(init)
        if niter is None:
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
        else:
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(_NITER_SEED)
                vr, sr, ur = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
            sr, uhr = sr / scaling, ur.t()
        return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))
    if which == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if which == "loftq":
        u, s, vh = torch.linalg.svd(w - quantized, full_matrices=False)
        sr = s[:r] / scaling
        return torch.diag(torch.sqrt(sr)) @ vh[:r], u[:, :r] @ torch.diag(torch.sqrt(sr))
    raise ValueError(f"not an initialisation from the weight: {init!r}")


@torch.no_grad()
def apply(layer: nn.Module, name: str, init: str, original: Optional[torch.Tensor], set_adapter: bool = True) -> None:
    """Initialise adapter `name` of LoRA layer `layer` by `init` from the base weight: `original` is the (out, in)
    weight before quantization (required for a quantized base), None for a full-precision base (its own weight).
    With `set_adapter=False` only the base is changed (an adapter loaded from a file onto the original base: its
    trained A and B stay, the residual is derived again)."""
    base = layer.base_layer
    which = kind(init)
    if original is None:
        if quant.is_quantized(base):
            raise UserError(f"init_lora_weights={init!r} on a {8 if quant.is_8bit(base) else 4}-bit base needs the "
                            "original weights: load the base from a local safetensors checkpoint (its folder or a "
                            "hub id in model.config.name_or_path), as from_pretrained does")
        if which == "loftq":
            raise UserError(f"init_lora_weights='loftq' takes a 4-bit or 8-bit base's quantization error into A and "
                            f"B; this base ({type(base).__name__}, {base.weight.dtype}) is not quantized. Load it "
                            "with a BitsAndBytesConfig (scalora train: quant.bits=4 or 8), or use 'pissa' / 'olora'")
        w = layer.dense_weight()
    else:
        w = original.float()
    a, b = factors(init, w, layer.r[name], layer.scaling[name],
                   layer.dense_weight() if which == "loftq" else None)
    if set_adapter:
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)
    if which in ("pissa", "olora"):
        residual = w - layer.scaling[name] * b @ a
        quant.set_dense_weight(base, residual.T if layer.fan_in_fan_out else residual, what="residual",
                               warn=False)


class CheckpointWeights:
    """The original (out, in) weight of each wrapped layer, read one tensor at a time from the base's safetensors
    checkpoint (a local folder, or a hub id fetched as from_pretrained does), by the layer's name in the model."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files  # tensor name -> safetensors file (adapter_io.checkpoint_index; the loader's own map)

    @classmethod
    def in_folder(cls, folder: str) -> "CheckpointWeights":
        from .adapter_io import checkpoint_index

        files = checkpoint_index(folder)
        if files is None:
            raise UserError(f"{folder} has no model.safetensors (or its index): PiSSA / OLoRA / LoftQ on a "
                            "quantized base read the original weights from a safetensors checkpoint; save the base "
                            "with save_pretrained")
        return cls(files)

    @classmethod
    def of(cls, model: nn.Module) -> "CheckpointWeights":
        """The checkpoint `model` was loaded from (`config.name_or_path`)."""
        path = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
        if not path:
            raise UserError("PiSSA / OLoRA / LoftQ initialisation on a quantized base needs its original weights, "
                            "and the model names no checkpoint (config.name_or_path): load it with from_pretrained "
                            "from a folder or hub id (replace_lora_weights_loftq: or pass model_path=FOLDER)")
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
        return cls.in_folder(path)

    def __call__(self, module_name: str, layer: nn.Module) -> torch.Tensor:
        from .adapter_io import read_copies

        key = module_name + ".weight"
        if key not in self.files:
            raise UserError(f"the base's checkpoint has no tensor {key!r}, which init_lora_weights needs (its names "
                            "differ from the model's: an older format transformers renames while loading); save "
                            "the base again with save_pretrained")
        w = read_copies(self.files, [key])[key]
        if not w.is_floating_point():
            raise UserError(f"the base's checkpoint holds {key} quantized ({w.dtype}): PiSSA / OLoRA / LoftQ need "
                            "the original weights; train from the full-precision checkpoint")
        if quant.is_conv1d(layer.base_layer) or quant.is_conv1d_source(layer.base_layer):
            w = w.T  # GPT-2's Conv1D stores (in, out), also when bitsandbytes holds it as (out, in)
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise UserError(f"the base's checkpoint holds {key} as {tuple(w.shape)}, the model's layer is "
                            f"{(layer.out_features, layer.in_features)} (out, in): not the checkpoint it was loaded "
                            "from")
        return w


def finish(model: nn.Module, weights: Optional[Callable[[str, nn.Module], torch.Tensor]] = None,
           prefix: str = "") -> int:
    """Run the initialisations left pending in `model`'s LoRA layers (`init_pending`; `residual_pending`, the
    residual base of an adapter loaded from a file; then DoRA's magnitudes, taken from the initialised adapter),
    with `weights(name, layer)` giving a quantized layer's original weight. Called by LoraModel once the adapter is
    added to a loaded base, and by the layer-by-layer loader (scalora/loading.py) for each decoder layer once its
    weights are in, before it is sharded: no process ever holds more than one layer de-quantized. `prefix`: `model`'s
    name in the model the names are relative to."""
    from .lora import LoraLayer

    n = 0
    for mname, m in model.named_modules():
        if not isinstance(m, LoraLayer) or quant.linear_weight_is_meta(m.base_layer):
            continue
        full = f"{prefix}.{mname}" if prefix and mname else prefix or mname
        original = weights is not None and quant.is_quantized(m.base_layer)
        for pending, set_adapter in ((m.init_pending, True), (m.residual_pending, False)):
            for name, init in list(pending.items()):
                apply(m, name, init, weights(full, m) if original else None, set_adapter)
                del pending[name]
                n += 1
        for name in list(m.dora_pending):
            m.init_dora_magnitude(name)
            n += 1
    return n


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: Optional[str] = None,
                               adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None) -> None:
    """peft's function of that name: LoftQ's A and B for adapter `adapter_name` of every LoRA layer on a 4-bit or
    8-bit base, the original weights read from the safetensors checkpoint in folder `model_path` (default: the one
    the base was loaded from). `callback(model, name)` returning False rolls a layer back (e.g. when its logits
    against the full-precision model got worse), as in peft. scaling is divided out, as in `factors`."""
    from .lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    weights = CheckpointWeights.in_folder(model_path) if model_path else CheckpointWeights.of(base)
    done = 0
    for name, m in base.named_modules():
        if not (isinstance(m, LoraLayer) and adapter_name in m.lora_A
                and quant.is_quantized(m.base_layer)):
            continue
        before = (m.lora_A[adapter_name].weight.clone(), m.lora_B[adapter_name].weight.clone())
        apply(m, adapter_name, "loftq", weights(name, m))
        if callback is not None and not callback(peft_model, name):
            m.lora_A[adapter_name].weight.copy_(before[0])
            m.lora_B[adapter_name].weight.copy_(before[1])
        done += 1
    if not done:
        raise UserError("replace_lora_weights_loftq: no LoRA layer on a 4-bit or 8-bit base found; load the base "
                        "with a BitsAndBytesConfig")


def convert_to_lora(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: Any
                    ) -> tuple[dict[str, torch.Tensor], Any]:
    """A PiSSA / OLoRA adapter's file tensors and config as the plain-LoRA adapter of the same model on the original
    base: lora_A rows [A ; A0], lora_B columns [B | -B0] (`initial`: the adapter's tensors at initialisation), r and
    lora_alpha doubled (alpha x sqrt(2) with rsLoRA), `init_lora_weights` True. Other tensors (DoRA's magnitude,
    modules_to_save) are kept: the converted adapter's W + scaling * B' A' is the same matrix, so its norms too."""
    import dataclasses

    missing = [k for k in tensors if ("lora_A" in k or "lora_B" in k) and k not in initial]
    if missing:
        raise UserError(f"the initial adapter lacks {missing[0]} (and {len(missing) - 1} more): it was not saved "
                        "from this model before training")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise UserError("converting a PiSSA / OLoRA adapter with use_rslora and a rank_pattern / alpha_pattern is "
                        "not supported (as in peft): drop one of them")
    out = {}
    for k, v in tensors.items():
        if "lora_A" in k:
            out[k] = torch.cat([v, initial[k].to(v.dtype)], dim=0)
        elif "lora_B" in k:
            out[k] = torch.cat([v, -initial[k].to(v.dtype)], dim=1)
        else:
            out[k] = v
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    new = dataclasses.replace(
        config, r=config.r * 2, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return out, new
