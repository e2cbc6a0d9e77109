"""`LoraConfig`, `PeftType`, `TaskType`: PEFT's names, fields and `adapter_config.json` format."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .errors import UserError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class PeftType(str, enum.Enum):
    LORA = "LORA"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Fields that peft writes into adapter_config.json and that scalora does not implement. The value beside each is the
# one under which the field changes nothing: a file carrying it loads; a file asking for the feature is refused.
_PEFT_FEATURES_OFF: dict[str, Any] = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "eva_config": None,
    "corda_config": None,
    "arrow_config": None,
}
# Fields that are pure bookkeeping in peft's files; read and ignored.
_PEFT_BOOKKEEPING = {
    "auto_mapping", "revision", "megatron_core", "runtime_config", "qalora_group_size", "peft_version",
    "ensure_weight_tying", "lora_ga_config", "use_bdlora", "bdlora_config",
}


PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # init_lora_weights="pissa_niter_<n>": n subspace iterations


def weight_init_kind(init: Any) -> Optional[str]:
    """"pissa", "olora" or "loftq" for the initialisations computed from the base weight
    (scalora/core/init_weights.py), else None."""
    if not isinstance(init, str):
        return None
    if init == "pissa" or PISSA_NITER.fullmatch(init):
        return "pissa"
    return init if init in ("olora", "loftq") else None


def adapter_problems(c: Any) -> list[str]:
    """Every invalid value among the adapter's own fields (those a run config's `lora` section holds too), each with
    what to write instead. `c` is a LoraConfig or anything with the same attributes."""
    p: list[str] = []
    if isinstance(c.r, bool) or not isinstance(c.r, int) or c.r <= 0:
        p.append(f"r={c.r!r}: the rank must be a positive integer, e.g. r=8")
    if isinstance(c.lora_alpha, bool) or not isinstance(c.lora_alpha, (int, float)) or not 0 < c.lora_alpha < math.inf:
        p.append(f"lora_alpha={c.lora_alpha!r}: must be a positive number, e.g. lora_alpha=16 (often 2*r)")
    if not isinstance(c.lora_dropout, (int, float)) or not 0 <= c.lora_dropout < 1:
        p.append(f"lora_dropout={c.lora_dropout!r}: must be in [0, 1), e.g. 0.05; 0 turns it off")
    if c.bias not in ("none", "all", "lora_only"):
        p.append(f"bias={c.bias!r}: must be 'none', 'all' or 'lora_only'")
    init = c.init_lora_weights
    if not (init is True or init is False or init == "gaussian" or weight_init_kind(init)):
        p.append(f"init_lora_weights={init!r}: scalora supports True (Kaiming A, zero B), 'gaussian', False, "
                 "'pissa', 'pissa_niter_<n>' (e.g. pissa_niter_4), 'olora' or 'loftq'")
    loftq = c.loftq_config
    if not isinstance(loftq, dict):
        p.append(f"loftq_config={loftq!r}: must be a mapping, e.g. {{loftq_bits: 4, loftq_iter: 1}}, or empty")
    else:
        if loftq and init != "loftq":
            p.append(f"loftq_config={loftq!r} is only read with init_lora_weights='loftq': drop it or set that")
        unknown = sorted(set(loftq) - {"loftq_bits", "loftq_iter"})
        if unknown:
            p.append(f"loftq_config: unknown keys {unknown}; it takes loftq_bits (4 or 8) and loftq_iter (1)")
        if loftq.get("loftq_bits", 4) not in (4, 8):
            p.append(f"loftq_config.loftq_bits={loftq['loftq_bits']!r}: must be 4 or 8, the base's quantization")
        if loftq.get("loftq_iter", 1) != 1:
            p.append(f"loftq_config.loftq_iter={loftq['loftq_iter']!r}: scalora runs LoftQ's one iteration, which "
                     "keeps the base as the checkpoint quantizes it (more iterations quantize W - B A instead, a "
                     "base only the initialising run has); set 1")
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        v = getattr(c, name)
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(s, str) for s in v)):
            p.append(f"{name}={v!r}: must be a list of module-name suffixes or one regex string")
    if c.modules_to_save is not None and not (
            isinstance(c.modules_to_save, list) and all(isinstance(s, str) for s in c.modules_to_save)):
        p.append(f"modules_to_save={c.modules_to_save!r}: must be a list of module names, e.g. ['lm_head']")
    ltt = c.layers_to_transform
    if ltt is not None:
        idx = [ltt] if isinstance(ltt, int) else ltt
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in idx):
            p.append(f"layers_to_transform={ltt!r}: must be a layer index or a list of them, e.g. [0, 1]")
        if isinstance(c.target_modules, str):
            p.append("layers_to_transform cannot be combined with a regex target_modules: "
                     "put the layer indices in the regex, or give target_modules as a list")
    if c.layers_pattern and ltt is None:
        p.append("layers_pattern is only used with layers_to_transform: set layers_to_transform or drop it")
    for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        d = getattr(c, name)
        if not isinstance(d, dict):
            p.append(f"{name}={d!r}: must be a mapping from module-name regex to a value")
            continue
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
                p.append(f"{name}[{k!r}]={v!r}: must be a positive {'integer' if kind is int else 'number'}")
    return p


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter, field for field as `peft.LoraConfig`.

    `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora=True`.
    """

    r: int = field(default=8, metadata={"help": "rank of the update B @ A"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "module-name suffixes, a regex (full match) or 'all-linear'; None: the model family's default"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "suffixes or regex to skip"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling numerator: scaling = lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input, in [0, 1)"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "weights stored (in, out), as GPT-2's Conv1D"})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "which biases train"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling = lora_alpha / sqrt(r)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "modules trained in full and saved"})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: each output's weight split into a trained magnitude and the direction of W + scaling * B A "
                "(the norm taken as a constant in backward, as the DoRA paper and peft do)"})
    init_lora_weights: Union[bool, str] = field(
        default=True, metadata={"help": "True: Kaiming A, zero B; 'gaussian': N(0, 1/r) A, zero B; False: random; "
                                        "'pissa' / 'pissa_niter_<n>' / 'olora': from W's SVD / QR, the base becomes "
                                        "the residual; 'loftq': A, B take a 4-/8-bit base's quantization error"}
    )
    loftq_config: dict[str, int] = field(default_factory=dict, metadata={
        "help": "init_lora_weights='loftq' only: {loftq_bits: 4 or 8 (the base's), loftq_iter: 1}"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "name of the layer list"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "per-module r, by regex"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "per-module alpha, by regex"})
    task_type: Optional[Union[TaskType, str]] = field(default=None, metadata={"help": "e.g. CAUSAL_LM"})
    inference_mode: bool = field(default=False, metadata={"help": "load frozen (no trainable adapter)"})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "the base the adapter was trained on"})
    revision: Optional[str] = field(default=None, metadata={"help": "the base's hub revision"})
    peft_type: Union[PeftType, str] = field(default=PeftType.LORA, metadata={"help": "LORA (the only one)"})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        problems = self._problems()
        if problems:
            raise UserError("Invalid LoraConfig:\n" + "\n".join(f"  - {p}" for p in problems))
        self.peft_type = PeftType(self.peft_type)
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type)

    def _problems(self) -> list[str]:
        """Every invalid value, each with what to write instead."""
        p = adapter_problems(self)
        try:
            PeftType(self.peft_type)
        except ValueError:
            p.append(f"peft_type={self.peft_type!r}: scalora implements LoRA only; use PeftType.LORA")
        if self.task_type is not None:
            try:
                TaskType(self.task_type)
            except ValueError:
                p.append(f"task_type={self.task_type!r}: must be one of {[t.value for t in TaskType]} or None")
        return p

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # --- PEFT's adapter_config.json ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peft_type"] = PeftType(self.peft_type).value
        d["task_type"] = TaskType(self.task_type).value if self.task_type is not None else None
        # Written explicitly so that readers that do not default them (vLLM, TGI) see plain LoRA.
        d.update({k: v for k, v in _PEFT_FEATURES_OFF.items() if k not in d})
        return d

    def save_pretrained(self, save_directory: str) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the config") -> "LoraConfig":
        if not isinstance(d, dict) or "peft_type" not in d:
            what = "it has no peft_type" if isinstance(d, dict) else "not a JSON object"
            raise UserError(f"{source} is not an adapter config ({what}); expected the adapter_config.json that "
                            "scalora's or peft's save_pretrained writes")
        d = dict(d)
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UserError(f"{source} is a {peft_type} adapter; scalora loads LoRA adapters only")
        unsupported = [f"{k}={d[k]!r}" for k, off in _PEFT_FEATURES_OFF.items() if k in d and d[k] not in (off, None)
                       and not (off == {} and not d[k])]
        if unsupported:
            raise UserError(f"{source} uses peft features scalora does not implement: {', '.join(unsupported)}. "
                             "Train or convert the adapter as plain LoRA.")
        known = {f.name for f in dataclasses.fields(cls)}
        # Newer peft versions add fields for other methods; left empty they turn nothing on.
        unknown = [k for k in d if k not in known and k not in _PEFT_FEATURES_OFF and k not in _PEFT_BOOKKEEPING
                   and d[k] not in (None, False, {}, [])]
        if unknown:
            warnings.warn(f"{source}: ignoring fields scalora does not know: {sorted(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "LoraConfig":
        """Read `adapter_config.json` from a local folder or a hub id."""
        file = resolve_adapter_file(path, CONFIG_NAME, **kwargs)
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{file} is not valid JSON ({e}); it should be an adapter_config.json") from e
        return cls.from_dict(d, source=file)


def resolve_adapter_file(path: str, filename: str, **hub_kwargs: Any) -> str:
    """Local path of `filename` inside a folder, or fetched from a hub repository id."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no {filename}: is it a folder written by save_pretrained?")
        return file
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
        raise FileNotFoundError(f"adapter folder {path!r} does not exist; give the folder save_pretrained wrote "
                                "(e.g. runs/NAME/final) or a hub id")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename, **hub_kwargs)
