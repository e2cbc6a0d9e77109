"""Low-memory loading (scalora/loading.py) builds the model the plain path builds, tensor for tensor.

The layer-by-layer path is what ZeRO-3 and FSDP runs take (tests/test_dist.py checks they train to the single
process's adapter and that each process loads a fraction of the base); here it runs in one process with a recording
`shard_layer`, against `from_pretrained` + LoRA: every tensor of the state dict (packed 4-bit bytes, quantization
statistics, norms, adapters initialized from the seed) byte for byte, the buffers, the logits, the 4-bit state the
layers compute with, and the order in which layers are handed over.
"""

from __future__ import annotations

import pytest
import torch

from scalora import loading
from scalora.config import load_config
from scalora.core.errors import UserError
from scalora.model import build_peft_model, decoder_layers, load_base


def _build(cfg, path, dtype, layerwise: bool):
    handed: list[int] = []
    shard = (lambda layer: handed.append(id(layer))) if layerwise else None
    torch.manual_seed(0)
    model = build_peft_model(cfg, path, dtype=dtype, shard_layer=shard)
    if layerwise:
        assert handed == [id(layer) for layer in decoder_layers(model.base_model.model)]  # each layer once, in order
    return model.eval()


def _assert_same_model(a, b, dtype):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8)), k  # NaN bytes too
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb) and all(torch.equal(ba[k], bb[k]) and ba[k].dtype == bb[k].dtype for k in ba)
    assert not any(t.is_meta for t in [*b.parameters(), *b.buffers()])
    states = [(getattr(m, "quant_state", None), getattr(n, "quant_state", None)) for m, n in zip(a.modules(),
                                                                                                   b.modules())]
    states = [(x, y) for x, y in states if x is not None]
    for x, y in states:  # the state the 4-bit layers dequantize with, not only what the state dict shows
        assert y is not None and torch.equal(x.absmax, y.absmax) and x.shape == y.shape and x.dtype == y.dtype
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
    return len(states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_layerwise_loading_builds_the_same_model(saved_tiny_models, arch, dtype):
    """Quantized while loading (an fp32 checkpoint): Llama, Qwen2 (q/k/v biases), GPT-2 (Conv1D weights stored
    (in, out), tied embeddings); in fp32 and bf16 compute."""
    cfg = load_config(None, [f"model.dtype={str(dtype).removeprefix('torch.')}", "lora.lora_dropout=0",
                             "lora.target_modules=all-linear"])
    path = saved_tiny_models[arch]
    a, b = _build(cfg, path, dtype, False), _build(cfg, path, dtype, True)
    assert _assert_same_model(a, b, dtype) > 0
    if arch == "gpt2":  # the head is still the embedding matrix
        inner = b.base_model.model
        assert inner.lm_head.weight is inner.transformer.wte.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layerwise_loading_of_a_checkpoint_saved_in_4bit(saved_tiny_models, tmp_path, dtype):
    """A checkpoint saved already quantized: packed weights and their statistics read back with bitsandbytes'
    `Params4bit.from_prequantized`, as transformers does."""
    name = str(dtype).removeprefix("torch.")
    cfg = load_config(None, [f"model.dtype={name}", "lora.lora_dropout=0"])
    load_base(cfg, saved_tiny_models["llama"], dtype=dtype).save_pretrained(tmp_path / "nf4")
    path = str(tmp_path / "nf4")
    a, b = _build(cfg, path, dtype, False), _build(cfg, path, dtype, True)
    assert _assert_same_model(a, b, dtype) > 0


def test_a_checkpoint_with_other_names_is_refused_with_the_way_out(saved_tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil

    shutil.copytree(saved_tiny_models["llama"], tmp_path / "renamed")
    file = tmp_path / "renamed" / "model.safetensors"
    tensors = load_file(file)
    save_file({k.replace("model.layers.", "model.decoder.layers."): v for k, v in tensors.items()}, file,
              metadata={"format": "pt"})
    cfg = load_config(None, [])
    with pytest.raises(UserError, match="dist.low_memory_loading=false"):
        build_peft_model(cfg, str(tmp_path / "renamed"), dtype=torch.float32, shard_layer=lambda layer: None)


def test_only_safetensors_checkpoints_load_layer_by_layer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        loading.checkpoint_files(str(tmp_path))


def test_layerwise_loading_of_an_unquantized_base(saved_tiny_models):
    """quant.bits=16 (LoRA on a bf16 / fp32 base) under ZeRO-3 or FSDP loads layer by layer too."""
    cfg = load_config(None, ["quant.bits=16", "model.dtype=bfloat16", "lora.lora_dropout=0"])
    path = saved_tiny_models["qwen2"]
    a, b = _build(cfg, path, torch.bfloat16, False), _build(cfg, path, torch.bfloat16, True)
    assert _assert_same_model(a, b, torch.bfloat16) == 0


def _mapped(folder) -> bool:
    """Whether this process still maps a file of the checkpoint folder (its resident pages count as ours)."""
    import os

    folder = os.path.realpath(folder)
    with open("/proc/self/maps") as f:
        return any(folder in line for line in f)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the one-process layer-by-layer path is the CPU's")
def test_one_process_on_a_cpu_loads_layer_by_layer_and_keeps_no_file_mapped(saved_tiny_models):
    """In one process on a CPU the base loads through the layer-by-layer loader (the same model: the tests above),
    which leaves none of the checkpoint mapped; transformers' from_pretrained (dist.low_memory_loading=false) keeps
    an fp32 checkpoint mapped through the tensors it did not convert, every page it read resident with them. 8-bit
    bases keep from_pretrained."""
    import gc

    from scalora.model import _layerwise_folder

    path = saved_tiny_models["llama"]
    for overrides, layerwise in (([], True), (["dist.low_memory_loading=false"], False), (["quant.bits=8"], False),
                                 (["quant.bits=16"], True)):
        cfg = load_config(None, ["model.dtype=float32", *overrides])
        assert (_layerwise_folder(cfg, path, None, None) == path) is layerwise, overrides
    for overrides, mapped in (([], False), (["dist.low_memory_loading=false"], True)):
        cfg = load_config(None, ["model.dtype=float32", *overrides])
        model = build_peft_model(cfg, path, dtype=torch.float32)
        gc.collect()
        assert _mapped(path) is mapped, overrides
        del model
        gc.collect()
