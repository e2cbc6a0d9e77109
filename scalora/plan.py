"""`scalora plan`: the per-device memory of a run, predicted from the model's config alone (no weights loaded).

The model is built on the meta device from its `config.json`, so every count below is exact for the architecture:
which linear layers bitsandbytes quantizes (all but the output head), which ones LoRA wraps (the same target
matching as a real run), the embeddings and norms kept in higher precision. Memory per device is then the sum of

    base weights      packed 4-bit (+ block constants, with or without double quantization), int8 (+ row scales),
                      or 16/32-bit; embeddings and head in the compute dtype; norms in fp32 (k-bit preparation)
    LoRA weights      fp32 (scalora keeps adapters in full precision)
    gradients         fp32, one per LoRA weight (DDP keeps a second copy in its reduction buckets)
    optimizer         AdamW: two fp32 moments; 8-bit AdamW: two uint8 moments + block scales
    activations       saved tensors of every decoder layer (or only the layer inputs with gradient checkpointing,
                      plus one layer recomputed in backward), the logits and the loss, for the micro-batch
    working set       the largest quantized weight dequantized for its matmul; under ZeRO-3 / FSDP the gathered
                      decoder layers (current + prefetched)
    overhead          GPU: CUDA context, cuBLAS / NCCL workspaces and allocator slack; CPU: the runtime measured here

sharded by strategy over all devices (ZeRO-2: gradients + optimizer; ZeRO-3 / FSDP: also the weights; offload: moved
to CPU memory). The activation terms count the tensors autograd saves in a Llama-style decoder layer (RMSNorm,
rotary attention through SDPA, gated MLP); `tests/test_plan.py` checks the sum against measured peaks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

GiB = 2**30
STRATEGIES = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp", "fsdp_offload")
LAUNCH_FILES = {"single": "launch/single.yaml", "ddp": "launch/ddp.yaml", "zero2": "launch/zero2.yaml",
                "zero3": "launch/zero3.yaml", "zero3_offload": "launch/zero3_offload.yaml",
                "fsdp": "launch/fsdp.yaml", "fsdp_offload": "launch/fsdp.yaml + fsdp_offload_params: true",
                "zero2_offload": "launch/zero2.yaml + offload_optimizer_device: cpu"}
GPU_OVERHEAD = 1.0 * GiB  # CUDA context (~0.5 GiB), cuBLAS / NCCL workspaces, caching-allocator reserve
GPU_SLACK = 0.05  # fragmentation of the caching allocator, as a share of what it holds
CPU_EXTRA = 0.1 * GiB  # on CPU, beyond the imported runtime: data pipeline, autograd and thread-pool buffers


@dataclass
class Shape:
    """What memory depends on, read off the model built on the meta device."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    quantized_numel: int = 0      # weights of the linear layers bitsandbytes replaces
    quantized_rows: int = 0       # their output features (one int8 row scale each)
    quantized_layers: int = 0
    largest_quantized: int = 0    # numel of the largest one (dequantized for its matmul)
    dense_params: int = 0         # embeddings, head and other non-norm parameters, compute dtype
    norm_params: int = 0          # fp32 after k-bit preparation
    lora_params: int = 0
    lora_layers: int = 0
    lora_in_features: int = 0     # sum over wrapped layers of in_features (their saved inputs)
    lora_shared_in_features: int = 0  # of those, inputs a sibling shares (train.shared_dropout: q/k/v, gate/up)
    lora_out_features: int = 0    # sum over wrapped layers of out_features (DoRA: magnitudes, saved outputs)
    lora_numel: int = 0           # sum over wrapped layers of their weights' numel (DoRA: W's transposes)
    lora_r: int = 0
    use_dora: bool = False        # lora_params then include the magnitudes

    @property
    def total_params(self) -> int:
        return self.quantized_numel + self.dense_params + self.norm_params


@dataclass
class Settings:
    """The run settings memory depends on (from a RunConfig, or given directly)."""

    bits: int = 4
    double_quant: bool = True
    compute_bytes: int = 2              # bf16 / fp16 on GPUs, 4 (fp32) on CPUs
    lora_bytes: int = 4                 # scalora's adapters are fp32
    lora_dropout: float = 0.05
    use_dora: bool = False              # lora.use_dora
    optimizer: str = "adamw"            # adamw | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit
    micro_batch: int = 4
    seq_len: int = 512
    gradient_checkpointing: bool = True
    packed_mask: bool = False           # packing with SDPA / eager: a (B, 1, T, T) block-diagonal mask
    chunked_loss: Any = "auto"          # train.chunked_loss: True, False or "auto"
    device: str = "gpu"                 # gpu | cpu
    cpu_overhead: float = 0.0           # bytes of the CPU runtime (measured), device == "cpu"
    low_memory_loading: bool = True     # dist.low_memory_loading: ZeRO-3 / FSDP load the base layer by layer
    shared_dropout: bool = True         # train.shared_dropout: q/k/v and gate/up keep one dropout output
    fast_dropout: bool = True           # train.fast_dropout: on CPUs the dropout keeps a boolean mask only
    keep_base_outputs: bool = False     # model.keep_base_outputs: 4-bit base outputs kept through checkpointing


@dataclass
class Estimate:
    strategy: str
    devices: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes per device, training
    cpu_parts: dict[str, float] = field(default_factory=dict)  # bytes moved to host memory per device
    loading: float = 0.0  # bytes per device while the base loads, before sharding

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def binds(self) -> str:
        """Which peak is the higher one: "training" or "loading"."""
        return "loading" if self.loading > self.total else "training"

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_parts.values())

    def fits(self, memory: float, paged: bool = False, loading: bool = True) -> str:
        """'yes', 'paged' (only with the paged optimizer's state evicted to host memory, as QLoRA relies on) or 'no';
        `loading=False`: the training peak alone (a stack that loads the base sharded)."""
        if loading and self.loading > memory:
            return "no"
        if self.total <= memory:
            return "yes"
        if paged and self.total - self.parts.get("optimizer", 0.0) <= memory:
            return "paged"
        return "no"


# --- the model, from its config ---------------------------------------------------------------------------------
def model_shape(name_or_path: str, target_modules: Any = "all-linear", exclude_modules: Any = None,
                r: int = 16, trust_remote_code: bool = False, gguf_file: Optional[str] = None,
                use_dora: bool = False) -> Shape:
    """Count the model's parameters by kind, building it on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .core import targets as T
    from .core.lora import SAME_INPUT
    from .core.lora_config import LoraConfig
    from .model import is_norm, resolve_model_path, shipped_configs

    folder = resolve_model_path(name_or_path, config_only=True, gguf_file=gguf_file)
    try:
        hf = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"no config.json for {name_or_path!r} ({e.__class__.__name__}). Give a folder with the model's "
                         f"config.json, or one of the shipped configs: {', '.join(shipped_configs())}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    heads = text.num_attention_heads
    shape = Shape(name=name_or_path, model_type=hf.model_type, n_layers=text.num_hidden_layers,
                  hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                  heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                  vocab=text.vocab_size, lora_r=r, use_dora=use_dora)
    head = model.get_output_embeddings()
    lcfg = LoraConfig(r=r, target_modules=target_modules, exclude_modules=exclude_modules)
    wanted = T.resolve_targets(lcfg, model)
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            n = module.weight.numel()
            shape.quantized_numel += n
            shape.quantized_rows += module.out_features
            shape.quantized_layers += 1
            shape.largest_quantized = max(shape.largest_quantized, n)
            seen.add(id(module.weight))
            if module.bias is not None:
                shape.dense_params += module.bias.numel()
                seen.add(id(module.bias))
            if T.is_target(name, lcfg, wanted):
                shape.lora_layers += 1
                shape.lora_params += r * (module.in_features + module.out_features) + (
                    module.out_features if use_dora else 0)  # DoRA: one magnitude per output
                shape.lora_in_features += module.in_features
                shape.lora_out_features += module.out_features
                shape.lora_numel += n
                parent, _, attr = name.rpartition(".")
                group = next((g for g in SAME_INPUT if attr in g), None)
                if group is not None and any(T.is_target(f"{parent}.{a}", lcfg, wanted) and
                                             isinstance(getattr(model.get_submodule(parent), a, None),
                                                        torch.nn.Linear) for a in group[:group.index(attr)]):
                    shape.lora_shared_in_features += module.in_features  # an earlier sibling's input, shared
        elif is_norm(module):
            for p in module.parameters(recurse=False):
                shape.norm_params += p.numel()
                seen.add(id(p))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))  # tied embeddings count once
            shape.dense_params += p.numel()
    if shape.lora_layers == 0:
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer of {name_or_path}")
    return shape


# --- memory -----------------------------------------------------------------------------------------------------
def base_weight_bytes(s: Shape, st: Settings) -> tuple[float, float]:
    """(shardable bytes, replicated bytes): packed weights shard with FSDP / ZeRO-3, quantization constants do not."""
    n = s.quantized_numel
    if st.bits == 4:
        blocks = n / 64  # bitsandbytes' 4-bit block size
        constants = blocks * 1 + blocks / 256 * 4 if st.double_quant else blocks * 4
        constants += s.quantized_layers * (16 + (256 if st.double_quant else 0)) * 4  # the 4-bit code (+ the 8-bit)
        packed = n / 2
    elif st.bits == 8:
        packed, constants = n, s.quantized_rows * 4
    else:
        packed, constants = n * st.compute_bytes, 0
    dense = s.dense_params * st.compute_bytes + s.norm_params * 4
    return packed + dense, constants


def optimizer_bytes(params: int, optimizer: str, param_bytes: int = 4) -> float:
    if optimizer == "adamw":  # torch keeps the moments in the parameters' dtype
        return params * 2.0 * param_bytes
    if optimizer == "paged_adamw_32bit":
        return params * 8.0
    return params * 2.0 + 2 * params / 256 * 4  # two uint8 moments, one fp32 scale per 256-element block


def layer_activation_bytes_per_token(s: Shape, st: Settings) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing), Llama-style block.

    norms: the fp32 input each RMSNorm keeps (x2); attention: rotated q, k and v as SDPA sees them (the kv heads
    repeated to all heads), its output and the contiguous copy that feeds o_proj; MLP: gate, SiLU(gate), up and their
    product; the normalized inputs of q/k/v and gate/up; LoRA: per wrapped layer the dropout output (fp32) and its
    mask (one for siblings that share it: train.shared_dropout), and the rank-r intermediate. DoRA: per wrapped
    layer also the base's output (compute dtype), which the magnitude's gradient needs (scalora/core/lora.py
    `_dora`), and with dropout the dropped positions its sparse product keeps for backward (two int64 per dropped
    element per mask, and the row offsets, one int64 per token, counted per wrapped layer though siblings share
    them; not on 8-bit bases, which take the dense product).
    """
    e, h, inter = st.compute_bytes, s.hidden, s.intermediate
    norms = 2 * 4 * h
    attention = (h + 2 * h + h + h) * e
    normalized = 2 * h * e
    mlp = 4 * inter * e
    r_part = s.lora_layers / s.n_layers * s.lora_r * st.lora_bytes
    lora_in = s.lora_in_features / s.n_layers
    if st.lora_dropout > 0 and st.shared_dropout:  # siblings keep one dropout output and mask
        lora_in -= s.lora_shared_in_features / s.n_layers
    if st.lora_dropout > 0:
        lora = lora_in * (st.lora_bytes + 1) + r_part
    else:  # the LoRA input is the layer input itself, unless it is cast to the adapter's dtype
        lora = (lora_in * st.lora_bytes if st.lora_bytes != e else 0) + r_part
    inputs = 0.0
    if st.lora_dropout > 0 and st.fast_dropout and st.device == "cpu":
        # FastDropout keeps only its boolean mask; torch's CPU dropout multiplies the input by a noise tensor and so
        # keeps the input as well: the normalized inputs (q/k/v, gate/up), the attention output's copy (o) and the
        # SiLU product (down), which nothing else keeps (the frozen base's matmuls keep no input). Measured with
        # autograd's saved tensors (tests/test_plan.py): 60.4 MB against 73.0 on the builtin model.
        inputs = (2 * h + h + inter) * e
    dora = s.lora_out_features / s.n_layers * e if st.use_dora else 0.0
    if st.use_dora and st.lora_dropout > 0 and st.bits != 8:
        dora += lora_in * 16 * st.lora_dropout + 8 * s.lora_layers / s.n_layers
    return norms + attention + normalized + mlp + lora + dora - inputs


def sparse_dropped_product(st: Settings, strategy: str = "single") -> bool:
    """Whether DoRA's product on the dropped input is the sparse one (scalora/core/lora.py `_DroppedProduct`, which
    reads W's transposed copy): DoRA with dropout on CPU, not on 8-bit bases nor under ZeRO-3 (`strategy`), whose
    sharded weights take the dense product."""
    return st.use_dora and st.lora_dropout > 0 and st.bits != 8 and st.device == "cpu" \
        and not strategy.startswith("zero3")


def recomputed_weight_bytes(s: Shape, st: Settings, strategy: str = "single") -> float:
    """The sparse dropped product under checkpointing: the de-quantized transposes of one decoder layer's wrapped
    weights (compute dtype), which its recomputation hands to its backward (`sparse_dropped_product`)."""
    if not (sparse_dropped_product(st, strategy) and st.gradient_checkpointing):
        return 0.0
    return s.lora_numel / s.n_layers * st.compute_bytes


def logits_bytes_per_token(s: Shape, st: Settings) -> float:
    """At the loss's backward: the log-softmax (fp32, saved), its gradient and the logits' fp32 gradient, plus the
    head's own output and gradient in the compute dtype when that is not fp32 (the loss upcasts a copy)."""
    return s.vocab * (12 + (2 * st.compute_bytes if st.compute_bytes != 4 else 0))


def loss_bytes(s: Shape, st: Settings) -> float:
    """The head and the loss: the whole logits with their log-softmax and gradients, or, chunked (scalora's default
    where those pass 256 MiB), one chunk's logits, softmax and gradient beside the saved last hidden states
    (bench/loss.py measured 0.80 GiB at 4,096 tokens x 128,256 words against 0.77 predicted; 5.91 unchunked)."""
    from .loss import CHUNK_BYTES

    tokens = st.micro_batch * st.seq_len
    whole = tokens * s.vocab * 4
    if st.chunked_loss is True or (st.chunked_loss == "auto" and whole > CHUNK_BYTES):
        return tokens * s.hidden * st.compute_bytes + 3 * min(whole, CHUNK_BYTES)
    return tokens * logits_bytes_per_token(s, st)


def loading_bytes(s: Shape, st: Settings, strategy: str, devices: int) -> float:
    """Device memory while the base loads, before training starts, with the adapters (made whole, then sharded).

    ZeRO-3 and FSDP with low-memory loading (scalora/loading.py): each process keeps its shard of the decoder
    layers (in host memory with parameter offload), the embeddings and head whole (accelerate shards them at
    prepare), and one layer in flight: its weights in the compute dtype while they are quantized, beside the packed
    result. Otherwise every process loads the whole quantized base onto its device (ZeRO-3 into host memory,
    partitioned onto the GPU when the engine starts; on a CPU, host memory is the device's), a weight being quantized
    held once in the compute dtype beside it."""
    shardable, replicated = base_weight_bytes(s, st)
    lora = s.lora_params * st.lora_bytes
    sharded = strategy.startswith(("zero3", "fsdp")) and devices > 1
    if sharded and st.low_memory_loading:
        dense = s.dense_params * st.compute_bytes + s.norm_params * 4
        packed = {4: 0.5, 8: 1.0}.get(st.bits, 0.0)
        layer = s.quantized_numel / s.n_layers * (st.compute_bytes + packed)
        layers = 0.0 if strategy.endswith("_offload") else (shardable - dense) / devices  # offload: host memory
        return layers + dense + replicated + layer + lora
    transient = s.largest_quantized * st.compute_bytes if st.bits in (4, 8) else 0.0
    if sharded and strategy.startswith("zero3") and st.device == "gpu":
        return shardable / devices + replicated + lora
    return shardable + replicated + transient + lora


def kept_bytes_per_token(s: Shape, st: Settings) -> float:
    """model.keep_base_outputs (4-bit bases, with checkpointing): every wrapped layer's base output in the compute
    dtype, held from the forward to its layer's backward (DoRA with dropout too: its product on the dropped input
    is computed from that output and a sparse product, scalora/core/lora.py `_DroppedProduct`)."""
    if not (st.keep_base_outputs and st.bits == 4):
        return 0.0
    return s.lora_out_features * st.compute_bytes


def activation_bytes(s: Shape, st: Settings, gradient_checkpointing: Optional[bool] = None) -> float:
    gc = st.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    tokens = st.micro_batch * st.seq_len
    layer = layer_activation_bytes_per_token(s, st)
    if gc:  # layer inputs kept; one layer recomputed at a time, with its gradients in flight
        body = s.n_layers * s.hidden * st.compute_bytes + layer + 2 * max(s.hidden, s.intermediate) * st.compute_bytes
        body += kept_bytes_per_token(s, st)
    else:
        body = s.n_layers * layer
    total = tokens * body + loss_bytes(s, st) + tokens * s.hidden * st.compute_bytes  # + embeddings
    if st.packed_mask:  # the boolean mask, and the additive float mask attention keeps per layer it saves for
        total += st.micro_batch * st.seq_len**2 * (1 + 4 * (1 if gc else s.n_layers))
    return total


def estimate(s: Shape, st: Settings, strategy: str, devices: int = 1) -> Estimate:
    """Per-device bytes of one strategy over `devices` processes (all nodes together)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    n = 1 if strategy == "single" else devices
    shardable, replicated = base_weight_bytes(s, st)
    lora = s.lora_params * st.lora_bytes
    grads = s.lora_params * float(st.lora_bytes)
    optim = optimizer_bytes(s.lora_params, st.optimizer, st.lora_bytes)
    e = Estimate(strategy, n)
    cpu = e.cpu_parts
    shard_weights = strategy.startswith(("zero3", "fsdp"))
    shard_states = strategy != "single" and strategy != "ddp"
    offload = strategy.endswith("_offload")
    e.parts["base weights"] = (shardable / n if shard_weights else shardable) + replicated
    e.parts["LoRA weights"] = lora / n if shard_weights else lora
    e.parts["gradients"] = grads / n if shard_states else grads * (2 if strategy == "ddp" else 1)
    e.parts["optimizer"] = optim / n if shard_states else optim
    if offload:
        cpu["optimizer"] = e.parts["optimizer"]
        e.parts["optimizer"] = 0.0
        if strategy in ("zero3_offload", "fsdp_offload"):  # parameters (and FSDP's gradients) live on the host
            cpu["base weights"] = e.parts["base weights"] - replicated
            e.parts["base weights"] = replicated
            cpu["LoRA weights"] = e.parts["LoRA weights"]
            e.parts["LoRA weights"] = 0.0
            if strategy == "fsdp_offload":
                cpu["gradients"] = e.parts["gradients"]
                e.parts["gradients"] = 0.0
    # keep_base_outputs is refused where the weights are sharded (scalora/dist.py)
    run = replace(st, keep_base_outputs=False) if shard_weights else st
    e.parts["activations"] = activation_bytes(s, run) - loss_bytes(s, st)
    e.parts["loss"] = loss_bytes(s, st)
    working = s.largest_quantized * st.compute_bytes if st.bits in (4, 8) else 0.0
    if st.use_dora:  # the norm ||W + s B A||: the largest layer de-quantized to fp32 (a 4-bit base's through its own
        # dtype) for a moment; the rest is out x r (LoraLayer.dora_norm; B A and W + s B A are no longer made)
        staged = st.compute_bytes if st.bits == 4 and st.compute_bytes < 4 else 0  # bitsandbytes' own-dtype copy
        working = max(working, s.largest_quantized * (4 + staged))
        if sparse_dropped_product(st, strategy) and not st.gradient_checkpointing:
            # the product on the dropped input (`_DroppedProduct`): W de-quantized and its transposed copy, both in
            # the compute dtype, through the layer's forward (a plain base's W is its weight: the copy only; under
            # checkpointing the recomputed transposes below count the copy)
            working = max(working, s.largest_quantized * st.compute_bytes * (2 if st.bits == 4 else 1))
    working += recomputed_weight_bytes(s, run, strategy)
    if shard_weights and n > 1:  # the gathered decoder layers: the one computing and the one prefetched
        per_layer = (shardable - s.dense_params * st.compute_bytes) / s.n_layers
        working += 2 * per_layer + 2 * s.lora_params / s.n_layers * st.lora_bytes
    e.parts["working set"] = working
    if st.device == "gpu":
        e.parts["overhead"] = GPU_OVERHEAD + GPU_SLACK * sum(e.parts.values())
        e.loading = loading_bytes(s, st, strategy, n) * (1 + GPU_SLACK) + GPU_OVERHEAD
    else:
        e.parts["overhead"] = st.cpu_overhead + CPU_EXTRA
        e.loading = loading_bytes(s, st, strategy, n) + st.cpu_overhead  # no data pipeline or autograd yet
    return e


# --- from a run config ------------------------------------------------------------------------------------------
def settings_from_config(cfg, device: str = "gpu", cpu_overhead: float = 0.0,
                         hidden_size: Optional[int] = None) -> Settings:
    import torch

    from .data import needs_block_mask
    from .model import attention_implementation

    if cfg.model.dtype == "auto" and device == "gpu":
        compute = 2
    else:  # a named dtype, or what `auto` resolves to on this machine's CPU for this model
        from .hardware import compute_dtype

        compute = compute_dtype(cfg.model.dtype, hidden_size)[0].itemsize
    return Settings(bits=cfg.quant.bits, double_quant=cfg.quant.double_quant, compute_bytes=compute,
                    lora_dropout=cfg.lora.lora_dropout, use_dora=cfg.lora.use_dora, optimizer=cfg.train.optimizer,
                    micro_batch=cfg.train.micro_batch_size,
                    seq_len=cfg.data.max_length, gradient_checkpointing=cfg.model.gradient_checkpointing,
                    packed_mask=cfg.data.packing and needs_block_mask(attention_implementation(
                        cfg, torch.float32 if compute == 4 else torch.bfloat16, device == "cpu")),
                    chunked_loss=cfg.train.chunked_loss,
                    device=device, cpu_overhead=cpu_overhead, low_memory_loading=cfg.dist.low_memory_loading,
                    shared_dropout=cfg.train.shared_dropout, fast_dropout=cfg.train.fast_dropout,
                    keep_base_outputs=cfg.model.keep_base_outputs)


def cpu_runtime_bytes(deepspeed: bool = False, env: Optional[dict[str, str]] = None) -> float:
    """Resident memory of a fresh Python process with scalora's training stack imported (what a CPU run starts at),
    in `env` (default: this process's environment; SCALORA_MALLOC=system: the C library's malloc)."""
    import subprocess
    import sys

    from . import malloc

    # as a run imports and allocates: scalora first (its core imports bitsandbytes without the compilers that
    # bitsandbytes' own import loads: scalora/core/quant.py), under the allocator the `scalora` command preloads.
    # Measured on an AVX2-only AMD EPYC: 489.6 MB (bitsandbytes first, glibc), 446.1 (scalora first, glibc), 487.4
    # (scalora first, tbbmalloc).
    mods = "torch, transformers, bitsandbytes, accelerate, safetensors, datasets" + (", deepspeed" if deepspeed else "")
    code = (f"import scalora.train\nimport {mods}\n"
            "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024)")
    env = malloc.preload_env(dict(os.environ if env is None else env, DS_ACCELERATOR="cpu"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text, re.I)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}: write it like 24GiB, 80GB or 40960MiB")
    unit = (m.group(2) or "GiB").lower()
    scale = {"gib": GiB, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40, "tb": 1e12}[unit]
    return float(m.group(1)) * scale


def render(shape: Shape, st: Settings, rows: list[Estimate], gpu_memory: float, devices: int, nodes: int) -> str:
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    n = shape.total_params
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    lines = [f"model: {shape.name} ({shape.model_type}, {count} parameters, "
             f"{shape.n_layers} layers, hidden {shape.hidden})",
             f"base: {st.bits}-bit{' NF4 + double quant' if st.bits == 4 and st.double_quant else ''} | LoRA r="
             f"{shape.lora_r} on {shape.lora_layers} layers: {shape.lora_params / 1e6:,.1f} M trainable | "
             f"{st.optimizer} | micro-batch {st.micro_batch} x {st.seq_len} tokens | gradient checkpointing "
             f"{'on' if st.gradient_checkpointing else 'off'} | {devices} device(s) on {nodes} node(s), "
             f"{gpu_memory / GiB:.1f} GiB each ({st.device})", ""]
    keys = list(rows[0].parts)
    head = (f"{'strategy':<14}" + "".join(f"{k:>13}" for k in keys)
            + f"{'training':>10}{'loading':>9}{'host':>8}  binds     fits")
    lines += [head + "   (GiB per device)", "-" * len(head)]
    paged = st.optimizer.startswith("paged")
    for e in rows:
        fits = e.fits(gpu_memory, paged)
        fits = f"no (+{(max(e.total, e.loading) - gpu_memory) / GiB:.1f})" if fits == "no" else fits
        lines.append(f"{e.strategy:<14}" + "".join(f"{g(e.parts[k]):>13}" for k in keys)
                     + f"{g(e.total):>10}{g(e.loading):>9}{e.cpu_total / GiB:8.2f}  {e.binds:<9} {fits}")
    other = activation_bytes(shape, st, not st.gradient_checkpointing)
    lines += ["", f"activations with gradient checkpointing {'off' if st.gradient_checkpointing else 'on'}: "
              f"{other / GiB:.2f} GiB per device (instead of {activation_bytes(shape, st) / GiB:.2f})"]
    fitting = [e.strategy for e in rows if e.fits(gpu_memory, paged) != "no"]
    if fitting:
        lines.append("fits: " + ", ".join(f"{k} ({LAUNCH_FILES[k]})" for k in fitting))
    else:
        lines.append("nothing fits: lower train.micro_batch_size or data.max_length, turn on gradient checkpointing, "
                     "or add devices")
    if any(e.fits(gpu_memory, paged) == "paged" for e in rows):
        lines.append("paged: fits only with the paged optimizer's state evicted to host memory (slower steps)")
    lines.append("loading: under ZeRO-3 / FSDP each process loads its shard of the decoder layers, one layer at a "
                 "time (dist.low_memory_loading), with the embeddings and head whole; elsewhere every process loads "
                 "the whole quantized base")
    return "\n".join(lines)


def plan(cfg, gpus: int = 1, nodes: int = 1, gpu_memory: float = 24 * GiB, device: str = "gpu") -> tuple[str, list]:
    shape = model_shape(cfg.model.name_or_path, cfg.lora.target_modules, cfg.lora.exclude_modules, cfg.lora.r,
                        cfg.model.trust_remote_code, cfg.model.gguf_file, cfg.lora.use_dora)
    overhead = cpu_runtime_bytes() if device == "cpu" else 0.0
    st = settings_from_config(cfg, device, overhead, shape.hidden)
    devices = gpus * nodes
    names = ["single"] if devices == 1 else [s for s in STRATEGIES if s != "single"]
    if devices == 1:
        names += ["zero2_offload", "zero3_offload", "fsdp_offload"]
    rows = [estimate(shape, st, s, devices) for s in names]
    return render(shape, st, rows, gpu_memory, devices, nodes), rows


def main(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    text, rows = plan(cfg, args.gpus, args.nodes, parse_size(args.gpu_memory), args.device)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"strategy": e.strategy, "devices": e.devices, "parts": e.parts, "host": e.cpu_parts,
                        "total": e.total, "loading": e.loading, "binds": e.binds} for e in rows], f, indent=2)
    return 0
