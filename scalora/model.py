"""Loading the base: any Hugging Face causal LM, quantized by bitsandbytes, frozen, with LoRA on top."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import attention
from .config import BUILTIN_MODEL, RunConfig
from .core.errors import UserError
from .core.init_weights import changes_base
from .core.lora import share_dropout_masks, use_fast_dropout, use_fused_lora
from .core.lora_config import LoraConfig
from .core.peft_model import PeftModel, get_peft_model
from .core.quant import pin_vector_width
from .hardware import compute_dtype, limit_onednn_cache


# config.json of real models (no weights), for planning offline: "meta-llama/Llama-3.1-70B" is stored as
# "meta-llama--Llama-3.1-70B".
MODEL_CONFIGS = Path(__file__).parent / "assets" / "model_configs"


def shipped_configs() -> list[str]:
    return sorted(p.name.replace("--", "/") for p in MODEL_CONFIGS.iterdir() if (p / "config.json").is_file())


def resolve_model_path(name_or_path: str, config_only: bool = False, gguf_file: Optional[str] = None,
                       revision: Optional[str] = None) -> str:
    """Where a model loads from: the builtin model's folder (built on first use), a local folder, a hub id, or the
    plain folder a GGUF file (a `.gguf` path, or `gguf_file` in a folder or hub repository) is converted into once
    (scalora/gguf_base.py). With `config_only` (planning needs config.json alone), also the config shipped in
    scalora/assets/model_configs."""
    from . import gguf_base

    source = gguf_base.gguf_source(name_or_path, gguf_file)
    if source is not None:
        return gguf_base.plain_folder(*source, revision=revision, config_only=config_only)
    if name_or_path == BUILTIN_MODEL:
        from .builtin import tiny_llama_path

        return tiny_llama_path()
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local) and (not config_only or os.path.isfile(os.path.join(local, "config.json"))):
        return local
    shipped = MODEL_CONFIGS / name_or_path.replace("/", "--")
    if config_only and (shipped / "config.json").is_file():
        return str(shipped)
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        hint = f", or one of the shipped configs: {', '.join(shipped_configs())}" if config_only else ""
        raise UserError(f"model.name_or_path={name_or_path!r} could not be loaded: no such folder. Give a folder "
                         f"written by save_pretrained, a hub id such as 'Qwen/Qwen2.5-7B', or {BUILTIN_MODEL}{hint}")
    return name_or_path  # a hub id


def base_folder(cfg: RunConfig, config_only: bool = False) -> str:
    """`resolve_model_path` for the run's `model` section."""
    return resolve_model_path(cfg.model.name_or_path, config_only, cfg.model.gguf_file, cfg.model.revision)


def quantization_config(cfg: RunConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    if q.bits == 4:
        # Packed 4-bit weights stored in the compute dtype can be sharded by FSDP with the rest of the model
        # (FSDP flattens parameters of one dtype); uint8 storage cannot.
        storage = dtype if q.storage_dtype == "auto" else getattr(torch, q.storage_dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=storage)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(cfg: RunConfig, path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels mask padding, so sharing eos is safe
    return tok


def load_hf_config(cfg: RunConfig, path: str):
    """The model's transformers config (config.json), with an error that says what to give instead."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        hint = " (it is not a local folder; offline, only local folders load)" if not os.path.isdir(path) else ""
        raise UserError(f"model.name_or_path={path!r} could not be loaded{hint}: {e}") from None


def prequantized_storage(cfg: RunConfig, path: str) -> Optional[torch.dtype]:
    """The dtype a checkpoint saved already quantized stores its packed weights in (None: saved unquantized)."""
    q = getattr(load_hf_config(cfg, path), "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("load_in_8bit"):
        return torch.int8
    name = str(q.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    return getattr(torch, name, torch.uint8)


def run_compute_dtype(cfg: RunConfig, path: str) -> tuple[torch.dtype, str]:
    """`model.dtype` resolved for this model on this hardware: (dtype, why)."""
    hf_config = load_hf_config(cfg, path)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return compute_dtype(cfg.model.dtype, getattr(text, "hidden_size", None))


def attention_implementation(cfg: RunConfig, dtype: torch.dtype, on_cpu: Optional[bool] = None) -> Optional[str]:
    """The attention kernel a run with compute `dtype` uses: the run config's, else on CPUs (this machine's unless
    `on_cpu` says) in fp32 scalora's example-by-example SDPA (`scalora.attention`; measured 1.05x the step at 4m,
    BENCHMARKS.md section 6; not in bf16, where it measured slower at 30m, nor inside compiled layers, which keep
    SDPA and the block mask), else transformers' default (None)."""
    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    return attention.NAME if on_cpu and dtype == torch.float32 and not cfg.model.compile else None


def attention_kwargs(cfg: RunConfig, dtype: torch.dtype) -> dict[str, Any]:
    """`attn_implementation` for transformers (refused where it cannot train)."""
    name = attention_implementation(cfg, dtype)
    if not name:
        return {}
    if name == attention.NAME:
        attention.register()
    if name.startswith("flex") and not torch.cuda.is_available():
        raise UserError(f"model.attn_implementation={name}: torch's flex attention has no backward pass on CPUs; use "
                        "sdpa (the default) there")
    return {"attn_implementation": name}


def load_base(cfg: RunConfig, path: str, device_map: Any = None, dtype: Optional[torch.dtype] = None):
    """The frozen base, quantized as configured, in the compute dtype (resolved here unless given)."""
    from transformers import AutoModelForCausalLM

    hf_config = load_hf_config(cfg, path)
    if dtype is None:
        dtype = run_compute_dtype(cfg, path)[0]
    kwargs: dict[str, Any] = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                                  dtype=dtype, quantization_config=quantization_config(cfg, dtype))
    if device_map is not None:
        kwargs["device_map"] = device_map
    kwargs.update(attention_kwargs(cfg, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(f"{path} is a {type(hf_config).__name__} model, not a causal language model: "
                             "scalora fine-tunes causal LMs (AutoModelForCausalLM)") from None
        raise
    return model


def is_norm(module: torch.nn.Module) -> bool:
    """Layer / RMS norms of any architecture (LlamaRMSNorm, LayerNorm, Qwen2RMSNorm, ...): kept in fp32."""
    return "norm" in type(module).__name__.lower()


def freeze_with_fp32_norms(model) -> None:
    model.requires_grad_(False)
    for module in model.modules():
        if is_norm(module):
            module.to(torch.float32)


def prepare_for_training(model, cfg: RunConfig) -> None:
    """k-bit training preparation, as QLoRA does it: frozen base, norms in fp32, checkpointing, no KV cache."""
    freeze_with_fp32_norms(model)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model, cfg.model.keep_base_outputs, marked=not cfg.model.compile)


def enable_checkpointing(model, keep_base_outputs: bool = False, marked: bool = True) -> None:
    """transformers' gradient checkpointing of each decoder layer, non-reentrant, its calls marked for the LoRA layers
    (`marked`: scalora.core.lora.checkpoint_contexts; not for compiled layers, where torch.compile takes only
    dispatch modes as contexts and the LoRA layers read none); `keep_base_outputs`: the LoRA layers' base outputs
    kept from the forward for the recomputation (scalora.core.lora.keep_base_outputs_contexts; refused with
    model.compile)."""
    from .core.lora import checkpoint_contexts, keep_base_outputs_contexts

    kwargs: dict[str, Any] = {"use_reentrant": False}
    if keep_base_outputs or marked:
        kwargs["context_fn"] = keep_base_outputs_contexts if keep_base_outputs else checkpoint_contexts
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers turns on a gradient for the embeddings' output with checkpointing, which only reentrant
    # checkpointing needs (peft's prepare_model_for_kbit_training skips it for use_reentrant=False, but calls
    # transformers, which adds it anyway): backward then computed the first layer's q/k/v matmuls for their input
    # and its input norm's backward, for frozen embeddings.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def lora_config(cfg: RunConfig, base_path: str) -> LoraConfig:
    """The run's `lora` section as peft's LoraConfig, with what the orchestrator knows: task and base model."""
    import dataclasses

    base = cfg.model.name_or_path if cfg.model.name_or_path != BUILTIN_MODEL else base_path
    return LoraConfig(**dataclasses.asdict(cfg.lora), task_type="CAUSAL_LM", base_model_name_or_path=base)


def build_model(cfg: RunConfig, device_map: Any = None, dtype: Optional[torch.dtype] = None,
                shard_layer: Optional[Callable[[torch.nn.Module], None]] = None,
                device: Optional[torch.device] = None) -> tuple[PeftModel, Any, str]:
    """(LoRA-wrapped model, tokenizer, resolved base path); the arguments as for `build_peft_model`."""
    path = base_folder(cfg)
    tokenizer = load_tokenizer(cfg, path)
    return build_peft_model(cfg, path, device_map, dtype, shard_layer, device), tokenizer, path


def build_peft_model(cfg: RunConfig, path: str, device_map: Any = None, dtype: Optional[torch.dtype] = None,
                     shard_layer: Optional[Callable[[torch.nn.Module], None]] = None,
                     device: Optional[torch.device] = None) -> PeftModel:
    """The base at `path`, prepared for k-bit training, with the run's LoRA. With `shard_layer` (ZeRO-3, FSDP:
    dist.layer_sharder), the base is loaded one decoder layer at a time onto `device`, each layer handed to
    `shard_layer` as soon as it is filled (scalora/loading.py): the same model, a fraction of the memory."""
    from . import loading

    folder = _layerwise_folder(cfg, path, device_map, shard_layer)
    if folder is None:
        model = load_base(cfg, path, device_map, dtype)
    else:
        model = loading.skeleton(cfg, folder, dtype if dtype is not None else run_compute_dtype(cfg, path)[0])
        loader = loading.LayerwiseLoader(model, folder, decoder_layers(model))
    prepare_for_training(model, cfg)
    if cfg.model.liger_kernel:
        apply_liger_kernel(model)
    peft_model = get_peft_model(model, lora_config(cfg, path))
    if cfg.train.fast_dropout:
        use_fast_dropout(peft_model)
    if cfg.train.shared_dropout:
        share_dropout_masks(peft_model)
    if cfg.train.fused_lora:
        use_fused_lora(peft_model)
    if folder is not None:
        layers = decoder_layers(model)
        loader.load(device or torch.device("cpu"), (lambda i: shard_layer(layers[i])) if shard_layer else None,
                    filled=loader.initialiser(model, layers))
    if cfg.model.compile:
        compile_layers(model, dynamic=None if cfg.data.packing else True)
    return peft_model


def _layerwise_folder(cfg: RunConfig, path: str, device_map: Any, shard_layer) -> Optional[str]:
    """The checkpoint folder to load layer by layer (scalora/loading.py), or None for transformers' from_pretrained.

    Sharded runs (ZeRO-3, FSDP: `shard_layer`) always. One process on a CPU too, from a local safetensors
    checkpoint with a 4-bit or unquantized base: from_pretrained maps the checkpoint files and every page it reads
    stays resident while any tensor still views the mapping (an fp32 checkpoint's unconverted tensors: its norms,
    an fp32 embedding), while the layer-by-layer loader copies each layer's tensors out and closes the file.
    Measured on SmolLM2-135M-Instruct (538 MB fp32 checkpoint; Intel Xeon with AMX): the loading peak 1.20 -> 0.83
    GiB in bf16, 0.89 -> 0.78 GiB in fp32, resident after loading 0.89 -> 0.67 GiB in fp32 (bench/real.py, README).
    8-bit bases (the loader fills 4-bit and plain tensors only) and GPUs keep from_pretrained."""
    from . import loading

    if shard_layer is not None:
        return loading.local_folder(cfg, path)
    on_cpu = not torch.cuda.is_available() and all(str(d) == "cpu" for d in (device_map or {}).values())
    if not (cfg.dist.low_memory_loading and on_cpu and cfg.quant.bits in (4, 16) and os.path.isdir(path)):
        return None
    try:
        loading.checkpoint_files(path)
    except UserError:  # no safetensors here (a .bin checkpoint): from_pretrained reads it
        return None
    return path


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as config.num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"model.compile: no stack of {n} decoder layers found in {type(model).__name__}; set "
                    "model.compile=false")


def compile_layers(model: torch.nn.Module, dynamic: Optional[bool] = None) -> None:
    """torch.compile each decoder layer in place (their LoRA layers included): the norms, rotary embedding, SiLU,
    dropout and adds of a layer fuse into a few kernels; the layer boundary keeps gradient checkpointing and
    sharding hooks outside the compiled code. Same loss as eager to fp32 rounding (tests/test_lora_training.py).
    `dynamic=True` (padded batches, a new length each micro-batch): one kernel for every sequence length instead of
    a compile per length; packed rows keep one shape and compile static (None).

    Python floats the layers read (norm epsilons, LoRA scalings, the attention scale) are compiled in as constants
    (dynamo's `specialize_float`, set for the process): under `dynamic=True` torch traced them as symbolic inputs
    that inductor then could not keep, and traced the whole layer a second time (measured [avx2], the builtin
    model, inductor's cache warm, three runs each: the first compile 20.4-23.5 s with the second trace, 10.5-13.9 s
    without). Constant floats cost no recompile.

    The CPU's vector width is pinned in inductor's config first (scalora.core.quant.pin_vector_width)."""
    import torch._dynamo.config

    torch._dynamo.config.specialize_float = True
    pin_vector_width()
    for layer in decoder_layers(model):
        layer.compile(dynamic=dynamic)


def apply_liger_kernel(model: torch.nn.Module) -> None:
    """liger-kernel's Triton kernels in place of the model's RMSNorm, rotary embedding and SwiGLU MLP (CUDA only;
    parity with the plain model: tests/test_cuda.py)."""
    if not torch.cuda.is_available():
        raise UserError("model.liger_kernel=true needs a CUDA GPU (liger-kernel's kernels are Triton); set "
                        "model.liger_kernel=false on CPUs")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("model.liger_kernel=true needs liger-kernel: pip install liger-kernel") from None
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


# --- the base an adapter was trained on ------------------------------------------------------------------------
def run_config_of(adapter_dir: str) -> Optional[str]:
    """The run config saved beside an adapter scalora wrote: RUN/final/ and RUN/checkpoints/step-N/adapter/ have it
    one folder up (RUN/config.yaml, step-N/config.yaml). None for an adapter from elsewhere."""
    for folder in (adapter_dir, os.path.dirname(os.path.abspath(adapter_dir))):
        path = os.path.join(folder, "config.yaml")
        if os.path.isfile(path):
            return path
    return None


def trained_setup(adapter_dir: str, base: Optional[str] = None, config: Optional[str] = None,
                  full_precision: bool = False, trust_remote_code: bool = False):
    """(run config, base folder, compute dtype, what will be loaded) for the base an adapter was trained on: the
    quantization and compute dtype from the run's config beside the adapter (or `config`); with `full_precision` (or
    no run config to be found) the original weights in fp32. The adapter's files are checked first, so a damaged
    adapter is named before any base is read."""
    from .config import load_config

    from .core.adapter_io import read_tensors
    from .core.lora_config import WEIGHTS_NAME, resolve_adapter_file

    adapter_cfg = LoraConfig.from_pretrained(adapter_dir)
    read_tensors(resolve_adapter_file(adapter_dir, WEIGHTS_NAME))
    run_yaml = config or run_config_of(adapter_dir)
    overrides = [f"model.trust_remote_code={str(trust_remote_code).lower()}"] if trust_remote_code else []
    if full_precision or run_yaml is None:
        cfg = load_config(None, ["quant.bits=16", "model.dtype=float32", *overrides])
        how = "full precision" + ("" if full_precision else
                                  f" (no run config beside {adapter_dir}: pass --config RUN/config.yaml to load "
                                  "the base as it was trained)")
    else:
        cfg = load_config(run_yaml, overrides)
        how = f"as trained ({cfg.quant.bits}-bit base, from {run_yaml})"
        if changes_base(cfg.lora.init_lora_weights) and cfg.quant.bits != 16 and \
                adapter_cfg.init_lora_weights is True:
            # scalora train's final adapter of a PiSSA / OLoRA run, converted to plain LoRA on the original base
            cfg = load_config(run_yaml, [*overrides, "quant.bits=16", "model.dtype=float32"])
            how = (f"full precision: the adapter was trained from {cfg.lora.init_lora_weights} on a quantized "
                   "residual base and saved as plain LoRA on the original base, exact there; on the quantized "
                   "original base it would be another model (BENCHMARKS.md section 11). For the trained model "
                   "itself, give the last checkpoint's adapter (RUN/checkpoints/step-N/adapter)")
    name = base or (cfg.model.name_or_path if run_yaml and not full_precision else None) \
        or adapter_cfg.base_model_name_or_path
    if not name:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model: pass --base PATH")
    gguf_file = cfg.model.gguf_file if name == cfg.model.name_or_path else None
    path = resolve_model_path(name, gguf_file=gguf_file, revision=cfg.model.revision)
    return cfg, path, run_compute_dtype(cfg, path)[0], how


def load_as_trained(adapter_dir: str, base: Optional[str] = None, config: Optional[str] = None,
                    full_precision: bool = False, trust_remote_code: bool = False):
    """(base + adapter for inference, tokenizer, run config, what was loaded): the base as `trained_setup` says,
    so that outputs are the trained model's."""
    limit_onednn_cache()  # prompts of every length: new bf16 matmul shapes, as in training
    cfg, path, dtype, how = trained_setup(adapter_dir, base, config, full_precision, trust_remote_code)
    model = load_base(cfg, path, device_map={"": "cuda:0"} if torch.cuda.is_available() else None, dtype=dtype)
    freeze_with_fp32_norms(model)
    return PeftModel.from_pretrained(model, adapter_dir).eval(), load_tokenizer(cfg, path), cfg, how
