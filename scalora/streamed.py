"""The adapter merged into its base one decoder layer at a time: what `scalora export --gguf` writes, without the
merged model ever held whole.

The whole-model path (`scalora merge`) loads the base, de-quantizes all of it to fp32 and merges: 4 bytes per
parameter at once (28 GB for a 7B model), beside the loaded base. Here the base is built on the meta device
(scalora/loading.py's skeleton, quantized as the run trained it, norms in fp32 as training keeps them), the adapter
is put on it, and each decoder layer in turn is read from the checkpoint, quantized as in training, de-quantized to
fp32, merged (W + scaling * B @ A for each active adapter), handed to the writer and put back on the meta device;
then the rest (embeddings, final norm, head) likewise. The tensors are the whole-model path's, bit for bit
(tests/test_gguf.py), and the memory held is one decoder layer (plus the embeddings and head, and the adapter).

Streamed: a 4-bit or unquantized base in local safetensors files, an adapter without `modules_to_save`.
Everything else (8-bit bases, .bin checkpoints, trained whole modules) takes the whole-model path, and
`whole_model_reason` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .core import quant
from .core.errors import UserError
from .core.lora import LoraLayer


def whole_model_reason(cfg, path: str, adapter_dir: str) -> Optional[str]:
    """Why the merged model must be built whole (None: it can be streamed)."""
    from . import loading
    from .core.lora_config import LoraConfig

    if cfg.quant.bits not in (4, 16):
        return f"{cfg.quant.bits}-bit base (the layer-by-layer reader quantizes 4-bit only)"
    if getattr(LoraConfig.from_pretrained(adapter_dir), "modules_to_save", None):
        return "the adapter trains whole modules (modules_to_save)"
    try:
        loading.checkpoint_files(path)
    except UserError:
        return f"{path} is not a local folder of safetensors files"
    return None


def _entries(module: nn.Module, prefix: str, skip: Optional[nn.Module] = None):
    """(state-dict key, holder, attribute) of `module`'s tensors under their names in the plain (unwrapped) model:
    a LoRA layer stands for its base layer (its adapters are not the model's), non-persistent buffers are left out
    as state_dict leaves them. The holder of `<lora layer>.weight` is the LoRA layer itself."""
    if module is skip:
        return
    if isinstance(module, LoraLayer):
        base = module.base_layer
        yield f"{prefix}weight", module, "weight"
        if getattr(base, "bias", None) is not None:
            yield f"{prefix}bias", base, "bias"
        return
    for attr, p in module._parameters.items():
        if p is not None:
            yield f"{prefix}{attr}", module, attr
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            yield f"{prefix}{attr}", module, attr
    for name, child in module._modules.items():
        if child is not None:
            yield from _entries(child, f"{prefix}{name}.", skip)


def _shape(holder: nn.Module, attr: str) -> tuple[int, ...]:
    if isinstance(holder, LoraLayer):
        return (holder.in_features, holder.out_features) if holder.fan_in_fan_out \
            else (holder.out_features, holder.in_features)
    if attr == "weight" and quant.is_quantized(holder):
        return (holder.out_features, holder.in_features)
    return tuple(getattr(holder, attr).shape)


def _value(holder: nn.Module, attr: str) -> torch.Tensor:
    """The tensor, merged (fp32): a LoRA layer's weight is its de-quantized base weight with each active adapter
    merged in (LoraLayer.merged_weight, what merge computes: LoRA's sum, DoRA's rescaling); a quantized layer without
    LoRA is de-quantized."""
    if isinstance(holder, LoraLayer):
        w = holder.merged_weight(quant.dense_weight(holder.base_layer),
                                 [n for n in holder.active_adapters if n in holder.lora_A])
        quant.require_finite(w, "merged weight")
        return w
    if attr == "weight" and quant.is_quantized(holder):
        return quant.dense_weight(holder)
    return getattr(holder, attr).detach()  # as loaded: the writer converts it a block of rows at a time


@dataclass
class MergedModel:
    """The merged model as a plan (keys and shapes, in the order `tensors()` gives them) and a stream."""

    config: Any
    architecture: str  # the transformers class name, e.g. LlamaForCausalLM
    tokenizer: Any
    how: str
    keys: list[tuple[str, tuple[int, ...]]]
    _units: list[tuple[Optional[int], list[tuple[str, nn.Module, str]]]] = field(repr=False)
    _loader: Any = field(repr=False)
    _finish: Any = field(repr=False)  # unit -> the initialisations a filled unit waits for (init_weights.finish)

    def tensors(self, wanted: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) in the order of `keys` (those in `wanted`, if given), each merged as it is yielded.
        What lies outside the decoder layers (embeddings, final norm, head) is read first and held to the end; each
        decoder layer is read when its first tensor is asked for and released after its last."""
        cpu = torch.device("cpu")
        self._loader.fill(None, cpu)
        self._finish(None)
        try:
            for unit, entries in self._units:
                entries = [e for e in entries if wanted is None or e[0] in wanted]
                if unit is not None and entries:
                    self._loader.fill(unit, cpu)
                    self._finish(unit)
                try:
                    for key, holder, attr in entries:
                        yield key, _value(holder, attr)
                finally:
                    if unit is not None:
                        self._loader.release(unit)
        finally:
            self._loader.release(None)


def open_merged(adapter_dir: str, cfg, path: str, dtype: torch.dtype, how: str) -> MergedModel:
    """The adapter in `adapter_dir` merged into the base at `path` as `cfg` loads it in `dtype` (model.trained_setup's
    answer: as trained, or in full precision), ready to stream. Raises UserError with `whole_model_reason` where it
    cannot be streamed."""
    from . import loading
    from .core.peft_model import PeftModel
    from .model import decoder_layers, freeze_with_fp32_norms, load_tokenizer

    reason = whole_model_reason(cfg, path, adapter_dir)
    if reason is not None:
        raise UserError(f"cannot merge {adapter_dir} one layer at a time: {reason}")
    model = loading.skeleton(cfg, path, dtype)
    layers = decoder_layers(model)
    loader = loading.LayerwiseLoader(model, path, layers)
    freeze_with_fp32_norms(model)  # as training and load_as_trained keep norms (after the loader noted load dtypes)
    PeftModel.from_pretrained(model, adapter_dir).eval()  # LoRA layers put into `model` in place, adapters on the CPU
    prefix = next(n for n, m in model.named_modules() if m is layers)
    rest = list(_entries(model, "", skip=layers))  # in the state dict's order: what precedes the layers first
    order = [key for key, _, _ in _entries(model, "")]
    layers_at = next(j for j, k in enumerate(order) if k.startswith(prefix + "."))
    position = {key: order.index(key) for key, _, _ in rest}
    units = [(None, [e for e in rest if position[e[0]] < layers_at])]
    units += [(i, list(_entries(layer, f"{prefix}.{i}."))) for i, layer in enumerate(layers)]
    units.append((None, [e for e in rest if position[e[0]] > layers_at]))
    keys = [(key, _shape(holder, attr)) for _, entries in units for key, holder, attr in entries]
    initialise = loader.initialiser(model, layers)
    residual = {m: dict(m.residual_pending) for m in model.modules() if isinstance(m, LoraLayer)}

    def finish(unit: Optional[int]) -> None:
        """An adapter trained from PiSSA / OLoRA: its residual base, derived for each layer as it is filled (again
        at each fill: a released layer is read from the checkpoint anew)."""
        for m in (model if unit is None else layers[unit]).modules():
            if m in residual:
                m.residual_pending.update(residual[m])
        initialise(unit)

    return MergedModel(model.config, type(model).__name__, load_tokenizer(cfg, path), how, keys, units, loader,
                       finish)
