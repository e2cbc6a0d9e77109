"""The run config: YAML sections that mirror frozen dataclasses, validated all at once.

    model / quant / lora / data / train / log / dist

Unknown keys are an error naming the nearest valid key; every problem (types, ranges, combinations) is collected
and reported together; `section.key=value` overrides come from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .core.errors import UserError
from .core.lora_config import LoraConfig, adapter_problems, weight_init_kind

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:topics"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _f(BUILTIN_MODEL, "local folder or hub id of a causal LM; 'builtin:tiny-llama' is built here")
    gguf_file: Optional[str] = _f(None, "a GGUF file in the name_or_path folder or hub repository (a .gguf path in "
                                  "name_or_path needs none): de-quantized once into a plain fp32 folder in scalora's "
                                  "cache, then quantized by bitsandbytes like any checkpoint")
    revision: Optional[str] = _f(None, "hub revision")
    trust_remote_code: bool = _f(False, "run the model repository's own code (only for repositories you trust)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "compute dtype; auto: bf16 on GPUs that have it, fp16 on other GPUs; on CPUs bf16 with AMX or with "
        "AMD's AVX512-BF16 for hidden size >= 512, else fp32 (measured: scalora/hardware.py)")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward (non-reentrant)")
    keep_base_outputs: bool = _f(False, "4-bit bases with gradient checkpointing: keep each LoRA layer's base "
                                 "output from the forward instead of recomputing it in "
                                 "backward; one 4-bit matmul per wrapped layer and micro-batch fewer, for tokens x "
                                 "out_features values per wrapped layer held until backward (`scalora plan` counts "
                                 "them); not under ZeRO-3 or FSDP")
    attn_implementation: Optional[str] = _f(
        None, "transformers attention kernel (sdpa, eager, sdpa_segments, flash_attention_2, flex_attention on "
        "GPUs); unset: sdpa_segments on CPUs in fp32 (each example its own causal SDPA call, no T x T mask; sdpa in "
        "bf16 or with model.compile), transformers' default on GPUs; with data.packing, flash and flex attention split the "
        "examples by position ids with no T x T mask")
    compile: bool = _f(False, "torch.compile each decoder layer (fuses the elementwise work; the first steps "
                       "compile, ~10-30 s per shape seen)")
    liger_kernel: bool = _f(False, "CUDA: liger-kernel's fused RMSNorm, RoPE and SwiGLU in the model (pip install "
                            "liger-kernel); train.chunked_loss=liger for its fused linear cross-entropy")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = _f(4, "4 (QLoRA), 8 (LLM.int8) or 16 (no quantization, plain LoRA)")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type")
    double_quant: bool = _f(True, "quantize the 4-bit block scales too (about 0.4 bit per weight saved)")
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = _f(
        "auto", "dtype the packed 4-bit weights are stored in; auto: the compute dtype, so FSDP can shard them")


# The `lora` section is peft's LoraConfig: its field names, types and help, with a QLoRA run's defaults. The fields
# the orchestrator sets itself (the task, the base model, inference mode, ...) are left out.
LORA_RUN_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
_LORA_SET_BY_RUN = ("fan_in_fan_out", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                    "peft_type")


def _lora_section() -> type:
    hints = typing.get_type_hints(LoraConfig)
    fields = []
    for f in dataclasses.fields(LoraConfig):
        if f.name not in _LORA_SET_BY_RUN:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            fields.append((f.name, hints[f.name], _f(LORA_RUN_DEFAULTS.get(f.name, default), f.metadata["help"])))
    return dataclasses.make_dataclass("LoraSection", fields, frozen=True, namespace={"__module__": __name__})


LoraSection = _lora_section()


@dataclass(frozen=True)
class DataConfig:
    train_file: str = _f(BUILTIN_DATA, "jsonl / json / parquet / csv file, a saved datasets folder, or builtin:topics")
    validation_file: Optional[str] = _f(None, "held-out file; without it validation_fraction is split off")
    validation_fraction: float = _f(0.1, "share of train_file held out (fixed seed) when there is no validation_file")
    format: Literal["auto", "text", "instruction", "chat"] = _f("auto", "record format; auto: from the fields")
    text_field: str = _f("text", "field of plain-text records")
    instruction_field: str = _f("instruction", "instruction records: the instruction")
    input_field: str = _f("input", "instruction records: the optional input")
    output_field: str = _f("output", "instruction records: the completion")
    messages_field: str = _f("messages", "chat records: list of {role, content}")
    instruction_template: Literal["alpaca", "chat"] = _f(
        "alpaca", "how instruction records become a prompt: alpaca's template, or chat: the tokenizer's chat template "
        "with the instruction (and input on the next line) as the user's turn and the output as the assistant's "
        "(for instruct models)")
    train_on_prompt: bool = _f(False, "also compute the loss on prompt tokens")
    max_length: int = _f(512, "tokens per example (or per packed row)")
    too_long: Literal["truncate", "drop"] = _f("truncate", "what to do with longer examples (counted and reported)")
    packing: bool = _f(False, "pack examples into rows of max_length (no attention across examples)")
    max_eval_examples: int = _f(0, "validation examples kept (the first N of the validation split, for the loss "
                                   "and exact match; 0: all)")
    max_eval_generate: int = _f(64, "validation examples scored by exact match of the generated answer (0: off)")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = _f("runs/tiny", "where checkpoints, the final adapter, metrics and plots go")
    seed: int = _f(42, "seed for initialisation, shuffling and dropout")
    global_batch_size: int = _f(16, "examples per optimizer step, whatever the number of processes")
    micro_batch_size: int = _f(4, "examples per forward pass on one process")
    epochs: float = _f(1.0, "passes over the training set (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0: from epochs")
    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: lora_B's learning rate (and 1-D parameters') = this x train.lr, as "
                                  "peft's create_loraplus_optimizer groups them (the paper suggests 16); 0: off")
    warmup_ratio: float = _f(0.03, "share of steps spent warming up")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "learning-rate schedule after warmup")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _f("adamw", "torch AdamW or bitsandbytes 8-bit")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    chunked_loss: Union[bool, Literal["auto", "liger"]] = _f(
        "auto", "compute the output head and the loss chunk by chunk, never the whole micro-batch's logits; auto: "
        "where those would pass 256 MiB (large vocabularies; measured faster there too, BENCHMARKS.md); liger: "
        "liger-kernel's fused linear cross-entropy (CUDA)")
    fast_dropout: bool = _f(True, "CPU: LoRA dropout masks drawn as 16-bit random integers (below p = 0.15 as "
                            "the dropped positions), torch's dropout's distribution with p resolved to 2^-16, at "
                            "~0.6x its cost; false: torch's dropout (peft's masks from the same seed)")
    fused_lora: bool = _f(True, "LoRA's scalars on lora_A's r columns, lora_B's matmul adding into the base "
                          "output (in place where nothing else holds it), and with shared_dropout q/k/v's "
                          "(gate/up's) lora_A as one matmul: the same sum in fewer passes, rounded differently; "
                          "false: peft's order (peft's numbers to the last bit)")
    shared_dropout: bool = _f(True, "one LoRA dropout mask for the projections that read the same input (q/k/v, "
                              "gate/up): each keeps its distribution, 3 of a Llama layer's 7 draws saved; false: a "
                              "mask per projection, as peft")
    log_every: int = _f(10, "steps between metric lines")
    eval_every: int = _f(50, "steps between validations (0: only at the end)")
    save_every: int = _f(100, "steps between checkpoints (0: only at the end)")
    save_total_limit: int = _f(2, "checkpoints kept (newest first)")
    keep_best: bool = _f(False, "also keep the checkpoint with the lowest validation loss")
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "a non-finite loss or gradient: stop (nothing written after the last good checkpoint) or skip the "
        "optimizer step (not with DeepSpeed, which steps inside backward)")
    resume: Literal["auto", "never"] = _f("auto", "auto: continue from the newest checkpoint in output_dir")
    overwrite: bool = _f(False, "allow output_dir to hold a different run")


@dataclass(frozen=True)
class LogConfig:
    report_to: Literal["wandb", "tensorboard", "none"] = _f("wandb", "experiment tracker")
    project: str = _f("scalora", "wandb project")
    run_name: Optional[str] = _f(None, "run name (default: output_dir's name)")
    tags: list[str] = _f([], "wandb tags")
    group: Optional[str] = _f(None, "wandb group")
    wandb_mode: Literal["auto", "online", "offline"] = _f("auto", "auto: online with an API key, else offline")


@dataclass(frozen=True)
class DistConfig:
    launch_config: Optional[str] = _f(None, "accelerate launch file (launch/*.yaml) used by `scalora train`")
    num_processes: int = _f(1, "processes to start when launch_config is set")
    threads_per_process: int = _f(0, "CPU threads per process; 0: cores / local processes")
    low_memory_loading: bool = _f(True, "under ZeRO-3 and FSDP, load the base one decoder layer at a time and shard "
                                        "it at once (each process holds its shard plus one layer); in one process "
                                        "on a CPU, copy each layer out of the checkpoint file and close it (no file "
                                        "pages left resident); false: transformers' from_pretrained, whole")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore


class ConfigError(UserError):
    """Every problem found in a run config, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def _nearest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                               for k, v in value.items())
    if tp is type(None):
        return value is None
    if tp is float:  # a finite number: YAML's .inf / .nan are no learning rate, dropout or ratio
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _accepts_float(tp: Any) -> bool:
    return tp is float or (typing.get_origin(tp) is Union and float in typing.get_args(tp))


def _is_number(text: str) -> bool:
    """A finite number written as text (YAML 1.1 leaves `1e-4` a string); not "inf" or "nan", which float() takes."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if tp is float:
        return "a finite number"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _range_problems(cfg: RunConfig) -> list[str]:
    """Values of the right type that still cannot work, each with the fix."""
    p: list[str] = []
    q, lo, d, t = cfg.quant, cfg.lora, cfg.data, cfg.train
    if q.bits not in (4, 8, 16):
        p.append(f"quant.bits={q.bits}: must be 4, 8 or 16 (16: no quantization)")
    p += [f"lora.{problem}" for problem in adapter_problems(lo)]
    if weight_init_kind(lo.init_lora_weights) == "loftq":
        bits = lo.loftq_config.get("loftq_bits", q.bits) if isinstance(lo.loftq_config, dict) else q.bits
        if q.bits == 16:
            p.append("lora.init_lora_weights=loftq takes a 4-bit or 8-bit base's quantization error into A and B; "
                     "quant.bits=16 has none: set quant.bits=4 (or 8), or use pissa / olora")
        elif bits != q.bits:
            p.append(f"lora.loftq_config.loftq_bits={bits} but quant.bits={q.bits}: LoftQ compensates the base's "
                     "own quantization; make them equal (or drop loftq_bits)")
    if not 0 <= d.validation_fraction < 1:
        p.append(f"data.validation_fraction={d.validation_fraction}: must be in [0, 1)")
    for k in ("max_eval_examples", "max_eval_generate"):
        if getattr(d, k) < 0:
            p.append(f"data.{k}={getattr(d, k)}: must be >= 0 (0: {'all' if k == 'max_eval_examples' else 'off'})")
    if d.max_length < 8:
        p.append(f"data.max_length={d.max_length}: must be at least 8 tokens")
    if t.lr <= 0:
        p.append(f"train.lr={t.lr}: must be positive, e.g. 2e-4")
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        p.append("train.micro_batch_size and train.global_batch_size must be positive")
    elif t.global_batch_size % t.micro_batch_size:
        p.append(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                 f"{t.micro_batch_size}: make it one, e.g. {t.micro_batch_size * max(1, t.global_batch_size // t.micro_batch_size)}")
    if t.max_steps < 0 or t.epochs <= 0 and t.max_steps == 0:
        p.append(f"train.max_steps={t.max_steps}, train.epochs={t.epochs}: set max_steps > 0 or epochs > 0")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    for k in ("log_every", "eval_every", "save_every", "save_total_limit"):
        if getattr(t, k) < 0:
            p.append(f"train.{k}={getattr(t, k)}: must be >= 0")
    if t.loraplus_lr_ratio < 0:
        p.append(f"train.loraplus_lr_ratio={t.loraplus_lr_ratio}: must be >= 0 (0 turns LoRA+ off; the LoRA+ paper "
                 "uses 16)")
    if t.max_grad_norm < 0:
        p.append(f"train.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 turns clipping off)")
    if cfg.model.keep_base_outputs:
        if not cfg.model.gradient_checkpointing:
            p.append("model.keep_base_outputs=true keeps outputs from being recomputed, and model.gradient_"
                     "checkpointing=false recomputes nothing: drop keep_base_outputs, or set "
                     "model.gradient_checkpointing=true")
        if q.bits != 4:
            p.append(f"model.keep_base_outputs=true keeps 4-bit bases' outputs only (a {q.bits}-bit base's matmul "
                     "saves its input for backward, so the recomputation must run it): drop it, or set quant.bits=4")
        if cfg.model.compile:
            p.append("model.keep_base_outputs=true has no effect on compiled layers (model.compile=true): drop one of "
                     "the two")
    if cfg.dist.num_processes < 1:
        p.append(f"dist.num_processes={cfg.dist.num_processes}: must be at least 1")
    if q.bits == 16 and q.storage_dtype not in ("auto",):
        p.append("quant.storage_dtype only applies to 4-bit bases: drop it or set quant.bits=4")
    return p


def build_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping into a `RunConfig`, reporting every problem at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the top level must be a mapping of sections ({', '.join(SECTIONS)}), "
                                   f"not {type(raw).__name__}"])
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            problems.append(f"unknown section '{name}'{_nearest(str(name), list(SECTIONS))}")
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            problems.append(f"section '{name}' must be a mapping of keys, not {type(body).__name__}")
            continue
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in body.items():
            if key not in hints:
                problems.append(f"unknown key '{name}.{key}'{_nearest(str(key), list(hints))}")
            elif isinstance(value, str) and _accepts_float(hints[key]) and _is_number(value):
                values[key] = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            elif not _type_ok(value, hints[key]):
                problems.append(f"{name}.{key}={value!r}: must be {_describe(hints[key])}")
            else:
                values[key] = value
        sections[name] = values
    built = RunConfig(**{n: SECTIONS[n](**sections.get(n, {})) for n in SECTIONS})
    problems += _range_problems(built)
    if problems:
        raise ConfigError(source, problems)
    return built


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings into a nested mapping; values are parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            bad.append(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4")
            continue
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else None
    if bad:
        raise ConfigError("command line", bad)
    return out


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML run config (None: the embedded default), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = path or "defaults"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(path, ["no such file; the shipped configs are in configs/ (e.g. configs/tiny.yaml)"])
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(path, [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(raw, dict):
        return build_config(raw, source)
    for section, values in parse_overrides(overrides or []).items():
        if isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return build_config(raw, source + (" + overrides" if overrides else ""))


def help_text() -> str:
    """Every section and key with its default and help, for `scalora train --help`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            lines.append(f"  {f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
