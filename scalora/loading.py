"""Low-memory loading: the base read one decoder layer at a time and sharded at once (ZeRO-3, FSDP).

transformers loads the whole (quantized) base into every process before accelerate hands it to DeepSpeed or FSDP;
for a 4-bit Llama 3 70B that is ~35 GB per process, whatever the number of processes. Here every process instead:

1. builds the model's skeleton on the meta device with the steps of transformers' `from_pretrained` before it
   reads weights (its quantizer's `Linear4bit` modules, dtypes, tied weights), and LoRA on it: the adapters are
   created on the CPU at once, from the same random stream as on a loaded base, so a seed gives the same adapter;
2. for each decoder layer in turn: reads that layer's tensors from the safetensors files, quantizes them as
   transformers does (`Params4bit(...).to(device)`, or `Params4bit.from_prequantized` for a checkpoint saved in
   4-bit), and hands the layer to `shard_layer` (FSDP2's `fully_shard`, DeepSpeed's `zero.Init(module=...)`), which
   keeps this process's part and frees the rest;
3. fills what is left (embeddings, final norm, head) whole; accelerate shards it when the model is prepared.

A process's loading peak is then its shard of the base plus one layer (plus the embeddings and head), not the whole
model; every process reads and quantizes every layer (the quantization is cheap next to reading). The model is the
one the plain path builds, tensor for tensor (tests/test_loading.py), and trains to the same adapter.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import nn

from . import malloc
from .core.adapter_io import checkpoint_index, read_copies as read
from .core import quant
from .core.errors import UserError


def checkpoint_files(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the index of a sharded checkpoint or the single file."""
    files = checkpoint_index(folder)
    if files is None:
        raise UserError(f"{folder} has no model.safetensors (or its index): low-memory loading reads safetensors "
                        "checkpoints only; convert the checkpoint with save_pretrained, or set "
                        "dist.low_memory_loading=false")
    return files


def local_folder(cfg, path: str) -> str:
    """The folder a model's files are in: `path` itself, or the hub cache's snapshot of a hub id."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=cfg.model.revision, allow_patterns=["*.safetensors", "*.json"])


def skeleton(cfg, path: str, dtype: torch.dtype) -> nn.Module:
    """The base as transformers builds it before loading weights into it (its quantizer's `Linear4bit` modules, the
    dtypes, tied weights), parameters on the meta device; buffers computed at construction (rotary frequencies)
    are real. The steps are from_pretrained's own, without the loading."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import get_hf_quantizer

    from .model import attention_kwargs, load_hf_config, quantization_config

    config = load_hf_config(cfg, path)
    quantizer, config, _ = get_hf_quantizer(config, quantization_config(cfg, dtype), {"": "cpu"}, True, {})
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, **attention_kwargs(cfg, dtype))
    try:  # from_pretrained's flag for a quantized model: no DeepSpeed zero.Init around the skeleton
        from transformers.modeling_utils import set_quantized_state
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as set_quantized_state
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained: the quantizer's new modules are made in the compute dtype
    try:
        with init_empty_weights(include_buffers=False), set_quantized_state():
            model = AutoModelForCausalLM.from_config(config, **kwargs)
            if quantizer is not None:
                quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                           use_kernels=False)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()  # as from_pretrained does after loading (GPT-2's head is its embedding matrix)
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.config.name_or_path = path
    return model.eval()


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute, full name) holding it (a tied tensor has several)."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = defaultdict(list)
    for mname, module in model.named_modules(remove_duplicate=False):
        for kind in (module._parameters, module._buffers):
            for attr, t in kind.items():
                if t is not None:
                    owners[id(t)].append((module, attr, f"{mname}.{attr}" if mname else attr))
    return owners


class LayerwiseLoader:
    """The base's tensors, grouped by decoder layer, and how to fill them in (see the module's docstring).

    Built on the bare transformers skeleton (before LoRA or freezing), so that the names are the checkpoint's and
    each tensor's load dtype is what transformers gives it; filled after LoRA and the k-bit preparation, which keep
    the same module objects (a LoRA layer holds the 4-bit layer as its `base_layer`)."""

    def __init__(self, model: nn.Module, folder: str, layers: nn.ModuleList) -> None:
        import bitsandbytes as bnb

        self.files = checkpoint_files(folder)
        self.prequantized = getattr(model, "hf_quantizer", None) is not None and model.hf_quantizer.pre_quantized
        self.stats: dict[str, list[str]] = defaultdict(list)  # packed weight -> its statistics (absmax, ...)
        for k in self.files:
            if ".weight." in k:
                self.stats[k.split(".weight.")[0] + ".weight"].append(k)
        owners = _owners(model)
        layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        # unit (decoder layer index, None: the rest) -> [(holders, checkpoint name, load dtype, quantized)]
        self.units: dict[Optional[int], list[tuple[list[tuple[nn.Module, str]], str, torch.dtype, bool]]] = \
            defaultdict(list)
        missing = []
        for holders in owners.values():
            module, attr, name = holders[0]
            t = getattr(module, attr)
            if not t.is_meta:
                continue  # computed at construction (a non-persistent buffer made on the CPU)
            if name not in self.files:
                tied = [n for _, _, n in holders[1:] if n in self.files]
                if not tied:
                    missing.append(name)
                    continue
                name = tied[0]
            self.units[layer_of.get(id(module))].append(([(m, a) for m, a, _ in holders], name, t.dtype,
                                                         isinstance(t, bnb.nn.Params4bit)))
        if missing:
            raise UserError(f"low-memory loading found no tensor named {missing[0]!r} (and {len(missing) - 1} more) in "
                            f"{folder}: the checkpoint's names differ from the model's (an older format that "
                            "transformers renames while loading); set dist.low_memory_loading=false")
        self.n_layers = len(layers)

    def _fill(self, entries, device: torch.device) -> None:
        import bitsandbytes as bnb

        names = {name for _, name, _, _ in entries}
        if self.prequantized:  # the 4-bit statistics stored beside each packed weight
            names |= {k for n in list(names) for k in self.stats.get(n, ())}
        tensors = read(self.files, names)
        for holders, name, load_dtype, quantized in entries:
            module, attr = holders[0]
            old = getattr(module, attr)
            if quantized and self.prequantized:
                stats = {k: tensors[k] for k in self.stats[name]}
                new = bnb.nn.Params4bit.from_prequantized(data=tensors[name], quantized_stats=stats,
                                                          requires_grad=False, device=device, module=module)
            elif quantized:  # as transformers' Bnb4bitQuantize does it (a GPT-2 Conv1D stores (in, out))
                value = tensors[name].T if quant.is_conv1d_source(module) else tensors[name]
                kwargs = {k: v for k, v in old.__dict__.items() if k != "module"}
                new = bnb.nn.Params4bit(value.to(load_dtype), requires_grad=False, module=module,
                                        **kwargs).to(device)
            else:
                value = tensors[name].to(device=device, dtype=load_dtype).to(old.dtype)
                new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
                    else value
            for m, a in holders:  # tied tensors stay one tensor
                (m._parameters if a in m._parameters else m._buffers)[a] = new
        del tensors

    def fill(self, unit: Optional[int], device: torch.device) -> None:
        """Fill one unit: decoder layer `unit`, or with None what is outside the layers."""
        self._fill(self.units.get(unit, []), device)

    def release(self, unit: Optional[int]) -> None:
        """Put a filled unit's tensors back on the meta device, so that its memory is freed (a streamed merge,
        scalora/streamed.py): the holders are the only references the loader's filling made."""
        for holders, _, _, _ in self.units.get(unit, []):
            module, attr = holders[0]
            old = getattr(module, attr)
            meta = torch.empty(old.shape, dtype=old.dtype, device="meta")
            new = nn.Parameter(meta, requires_grad=False) if isinstance(old, nn.Parameter) else meta
            for m, a in holders:
                (m._parameters if a in m._parameters else m._buffers)[a] = new
        # Freed memory back to the OS: layer after layer of differently sized tensors leaves glibc's heaps
        # fragmented. Measured on SmolLM2-135M's streamed GGUF export (Intel Xeon with AMX), resident memory grew
        # 0.57 -> 0.72 GiB over the 30 layers with 74 MB of live tensors throughout, and stayed at 0.51 GiB with a
        # trim after each layer.
        malloc.release_cached()

    def initialiser(self, model: nn.Module, layers: nn.ModuleList) -> Callable[[Optional[int]], None]:
        """`filled` for `load` (and a streamed merge): what waits for a unit's weights, computed once it is in
        (scalora/core/init_weights.py finish: PiSSA / OLoRA / LoftQ, a loaded adapter's residual base, DoRA's
        magnitudes), a quantized layer's original weight read from these same checkpoint files."""
        from .core import init_weights

        names = {id(m): n for n, m in model.named_modules()}
        weights = init_weights.CheckpointWeights(self.files)

        def filled(unit: Optional[int]) -> None:
            if unit is None:
                init_weights.finish(model, weights)
            else:
                init_weights.finish(layers[unit], weights, prefix=names[id(layers[unit])])

        return filled

    def load(self, device: torch.device, shard_layer: Optional[Callable[[int], None]] = None,
             filled: Optional[Callable[[Optional[int]], None]] = None) -> None:
        """Fill every decoder layer, calling `filled(i)` (the initialisations from the weights, DoRA's magnitudes:
        scalora/core/init_weights.py finish) and then `shard_layer(i)` after layer i, then the rest
        (`filled(None)`)."""
        for i in range(self.n_layers):
            self.fill(i, device)
            if filled is not None:
                filled(i)
            if shard_layer is not None:
                shard_layer(i)
        self.fill(None, device)
        if filled is not None:
            filled(None)
