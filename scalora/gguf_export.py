"""A merged model as one GGUF file, for llama.cpp, Ollama and LM Studio (`scalora export ADAPTER --gguf OUT.gguf`).

Written with the `gguf` package (ggml's own Python reader and writer: no compiler, nothing cloned), with the tensor
names, the Q / K row order and the metadata keys that llama.cpp's converter (convert_hf_to_gguf.py) writes for the
architecture, so that llama.cpp reads the file as it reads its own. Tensors are converted and written one at a time
into a file opened beside the target and renamed onto it at the end: no half-written OUT.gguf is ever left.

Supported here (others are refused by name, with what to do):
- architectures: Llama and Mistral (written as llama.cpp's `llama`), Qwen2 (`qwen2`); rope without scaling, with
  linear scaling, or Llama 3.1's `llama3` scaling (llama.cpp's `rope_freqs` tensor); others refused;
- tokenizers: byte-level BPE (GPT-2's, SmolLM's, Llama-3's, Qwen2's pre-tokenizers) and SentencePiece BPE with byte
  fallback (Llama 2's, Mistral v0.1's), from what `tokenizer.json` holds;
- types: f32, f16, bf16 (2-D weights; norms stay f32, as llama.cpp's converter keeps 1-D tensors), q8_0 (2-D weights
  whose rows are a multiple of its 32-element block; others f16, as llama.cpp's converter falls back).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Iterable

import numpy as np
import torch

from .core.errors import UserError

# transformers class -> (llama.cpp architecture, whether Q and K rows are permuted as llama.cpp's converter does for
# its `llama` architecture: rotary halves interleaved; Qwen2's converter leaves them)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
TYPES = ("f32", "f16", "bf16", "q8_0")

# The pre-tokenizers llama.cpp knows by name (tokenizer.ggml.pre), recognised by their tokenizer.json structure.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def _pre_tokenizer(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) is not one llama.cpp names that scalora "
                    "knows (GPT-2's, SmolLM's, Llama-3's, Qwen2's byte-level ones): a GGUF file with a guessed one "
                    "would split text differently in llama.cpp. Export the merged model with `scalora merge` and "
                    "convert it with llama.cpp's convert_hf_to_gguf.py")


def _special_ids(writer, tokenizer) -> None:
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _space_prefix(tok_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix), from
    the two forms it takes: a Metaspace pre-tokenizer (prepend_scheme "first" / "always": yes, "never": no), or
    the older normalizer Prepend("▁") + Replace(" ", "▁") (Llama 2's and Mistral v0.1's files)."""
    pre = tok_json.get("pre_tokenizer") or {}
    norm = tok_json.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split", True) \
            and not norm:
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [(s.get("type"), s.get("prepend") or s.get("content")) for s in steps]
    if not pre and kinds in ([("Prepend", "▁"), ("Replace", "▁")], [("Replace", "▁")]):
        return kinds[0][0] == "Prepend"
    raise UserError(f"the SentencePiece-style tokenizer splits text in a way scalora does not write to GGUF "
                    f"(pre-tokenizer {json.dumps(pre)[:200]}, normalizer {json.dumps(norm)[:200]}); export the merged "
                    "model with `scalora merge` and convert it with llama.cpp's convert_hf_to_gguf.py")


def _sentencepiece_metadata(writer, tokenizer, tok_json: dict, vocab_size: int) -> None:
    """llama.cpp's `llama` tokenizer model (SentencePiece BPE with byte fallback: Llama 2, Mistral v0.1) from the
    tokenizer.json transformers converted it into. llama.cpp merges, among adjacent pieces, the pair whose joined
    piece has the highest score, and transformers' GGUF reader rebuilds its merges the same way; a SentencePiece BPE
    vocabulary's scores rank pieces by the merge that makes them. tokenizer.json keeps that order as its merge list,
    so a piece's score here is minus the rank of the first merge that makes it (single characters, bytes and
    special tokens, which no merge makes: 0). Byte pieces <0xXX> are llama.cpp's BYTE tokens."""
    import gguf

    model = tok_json["model"]
    space_prefix = _space_prefix(tok_json)
    rank: dict[str, int] = {}
    for k, (a, b) in enumerate(_merge_pairs(model)):
        rank.setdefault(a + b, k)
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif i == unk:
            kind = gguf.TokenType.UNKNOWN
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
        if t in rank:
            scores.append(-float(rank[t]))
        elif kind == gguf.TokenType.NORMAL and len(t) != 1:  # a piece no merge makes (unreachable by the BPE):
            scores.append(-float(len(rank) + i))  # ranked after every merge
        else:
            scores.append(0.0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)
    _special_ids(writer, tokenizer)


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*, as llama.cpp's converter writes them: its `gpt2` model for byte-level BPE, its `llama` model
    for SentencePiece BPE with byte fallback."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_json = json.loads(backend.to_str()) if backend is not None else {}
    model = tok_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_metadata(writer, tokenizer, tok_json, vocab_size)
    if model.get("type") != "BPE":
        kind = model.get("type") or type(tokenizer).__name__
        raise UserError(f"the tokenizer is {kind}: scalora writes GGUF tokenizers for byte-level BPE (Llama-3, "
                        "Qwen2, SmolLM, GPT-2 style) and SentencePiece BPE with byte fallback (Llama 2, Mistral "
                        "v0.1). Export the merged model with `scalora merge` and convert it with llama.cpp's "
                        "convert_hf_to_gguf.py")
    pre = _pre_tokenizer(tok_json)
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding's rows; rows past the tokenizer's vocabulary are padding
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) for m in _merge_pairs(model)])
    _special_ids(writer, tokenizer)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Q and K (convert_hf_to_gguf.py's LlamaModel.permute): within each head, the two
    rotary halves interleaved. transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_rows(key: str, t: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """`t` (the weight named `key`, or its LoRA B: the same rows) in llama.cpp's row order: Q and K permuted."""
    if key.endswith("q_proj.weight"):
        return _permute(t, n_head)
    if key.endswith("k_proj.weight"):
        return _permute(t, n_kv)
    return t


def _qtype(kind: str, shape: tuple[int, ...]):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) == 1 or kind == "f32":
        return Q.F32
    if kind == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16  # llama.cpp's converter's fallback for rows that are not whole blocks
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[kind]


_CHUNK = 1 << 22  # elements converted at once: a tensor's fp32 copy and the quantizer's temporaries stay ~16 MB each


def _convert(t: torch.Tensor, qtype) -> np.ndarray:
    """`t` (any float dtype) as the bytes of GGML type `qtype`, converted a block of rows at a time, so that beside
    the result only one block's fp32 copy and conversion temporaries exist (the gguf package's Q8_0 quantizer makes
    several full-size temporaries: measured 1.20 GiB peak for SmolLM2's export in one piece)."""
    from gguf import GGMLQuantizationType as Q, quants

    t = t.detach()
    if t.dim() < 2 or t.numel() <= _CHUNK:
        return _convert_rows(t, qtype, quants, Q)
    step = max(1, _CHUNK // t.shape[-1] // int(np.prod(t.shape[1:-1]) or 1))
    out = None
    for start in range(0, t.shape[0], step):
        part = _convert_rows(t[start:start + step], qtype, quants, Q)
        if out is None:
            out = np.empty((t.shape[0], *part.shape[1:]), dtype=part.dtype)
        out[start:start + step] = part
    return out


def _convert_rows(t: torch.Tensor, qtype, quants, Q) -> np.ndarray:
    data = t.to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)  # bf16 and q8_0: bytes, as ggml lays them out


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


@contextlib.contextmanager
def _file_beside(path: str):
    """A temporary file in `path`'s folder, renamed onto `path` when the block completes and removed if it fails:
    no half-written GGUF is ever left under the target's name."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".scalora-", suffix=".gguf.partial", dir=d)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rope(cfg) -> dict:
    """The rotary embedding's settings: transformers 5's `rope_parameters` (rope_theta and rope_type inside it), or
    the older `rope_theta` / `rope_scaling` attributes. SmolLM2's theta is 100,000: a file that fell back to
    llama.cpp's default 10,000 gave logits 25% away from the merged model's (tests/test_real_model.py)."""
    rope = {**(getattr(cfg, "rope_scaling", None) or {}), **(getattr(cfg, "rope_parameters", None) or {})}
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    return rope


def _rope_freq_factors(cfg, rope: dict, head_dim: int) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor for Llama 3.1's rope scaling: per frequency, the factor llama.cpp divides
    the rotation angle by, i.e. the unscaled inverse frequency over the scaled one. The scaled ones are
    transformers' own (its "llama3" rope function, what the model trained with), so the file rotates as the model
    did; llama.cpp's converter computes the same ratio from the config's formula."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = float(rope.get("rope_theta") or 10000.0)
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # as transformers
    return plain / ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].float()  # 1 where unscaled, the factor where scaled


def write_gguf(model: torch.nn.Module, tokenizer, path: str, kind: str = "f16", name: str | None = None) -> dict:
    """Write `model` (a transformers causal LM held whole, e.g. a merged one) and `tokenizer` to `path` as GGUF of
    type `kind`. Returns {gguf tensor name: GGML type name}."""
    state = model.state_dict()
    return write_gguf_tensors(model.config, type(model).__name__, tokenizer, path, kind,
                              [(k, tuple(t.shape)) for k, t in state.items()],
                              lambda wanted: ((k, t) for k, t in state.items() if k in wanted), name)


def write_gguf_tensors(cfg, cls: str, tokenizer, path: str, kind: str, keys: list[tuple[str, tuple[int, ...]]],
                       tensors: Callable[[set[str]], Iterable[tuple[str, torch.Tensor]]],
                       name: str | None = None) -> dict:
    """Write a model of transformers class `cls` given as its config, its (state-dict key, shape) list and
    `tensors(wanted)`, which yields (key, tensor) for the wanted keys in `keys`' order, one at a time (a streamed
    merge, scalora/streamed.py, holds one layer). The header and tensor table are written from the shapes first,
    then each tensor converted and written as it comes. Returns {gguf tensor name: GGML type name}."""
    import gguf

    if kind not in TYPES:
        raise UserError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    if cls not in ARCHITECTURES:
        raise UserError(f"{cls} cannot be exported to GGUF by scalora (it writes {', '.join(ARCHITECTURES)}); export "
                        "the merged model with `scalora merge` and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch, permute = ARCHITECTURES[cls]
    rope = _rope(cfg)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"{cls} with {rope_type} rope scaling ({rope}): scalora's GGUF export writes none, linear "
                        "and llama3 (Llama 3.1's) scaling; use `scalora merge` and llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope_freqs = _rope_freq_factors(cfg, rope, head_dim) if rope_type == "llama3" else None
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    plan = []  # (gguf name, hf name, shape, qtype); hf name None: a tensor computed here
    if rope_freqs is not None:  # first, as llama.cpp's converter writes it
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, tuple(rope_freqs.shape),
                     _qtype("f32", tuple(rope_freqs.shape))))
    for key, shape in keys:
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads a tied head from token_embd
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"{key} of {cls} has no GGUF name in llama.cpp's {arch} architecture")
        plan.append((target, key, shape, _qtype(kind, shape)))

    with _file_beside(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or getattr(cfg, "_name_or_path", "") or cls)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(float(rope.get("rope_theta") or 10000.0))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        _tokenizer_metadata(w, tokenizer, cfg.vocab_size)
        for target, _, shape, qtype in plan:
            w.add_tensor_info(target, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        stream = iter(tensors({key for _, key, _, _ in plan if key is not None}))
        for target, key, shape, qtype in plan:  # one tensor converted at a time, in the table's order
            if key is None:
                w.write_tensor_data(_convert(rope_freqs, qtype))
                continue
            got, t = next(stream, (None, None))
            if got != key or tuple(t.shape) != shape:
                raise RuntimeError(f"GGUF export: expected {key} {shape} next, got {got}")
            if permute:
                t = _llama_rows(key, t, n_head, n_kv)
            w.write_tensor_data(_convert(t, qtype))
            del t
        w.close()
    return {target: qtype.name for target, _, _, qtype in plan}


def describe(types: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))



def write_gguf_adapter(model: torch.nn.Module, path: str, kind: str = "f32", adapter_name: str = "default") -> dict:
    """The LoRA adapter of `model` (scalora's PeftModel on its base) alone as a GGUF LoRA file, what llama.cpp's
    `--lora` and Ollama's `ADAPTER` read (the layout of llama.cpp's convert_lora_to_gguf.py): `general.type`
    adapter, `adapter.type` lora, `adapter.lora.alpha`, and per adapted weight `<GGUF name>.lora_a` (r x in) and
    `.lora_b` (out x r). llama.cpp applies W + alpha / r * B A with one alpha for the file and r read from each A;
    the adapter's own scale (rank_pattern, alpha_pattern, rsLoRA) is folded into B so that every layer gets exactly
    its own. For a llama-architecture base, B's rows take llama.cpp's Q / K order. Returns {tensor: type}."""
    import gguf

    from .core.lora import LoraLayer

    if kind not in ("f32", "f16", "bf16"):
        raise UserError(f"--type {kind} for an adapter file: choose f32, f16 or bf16")
    base = model.get_base_model()
    cls = type(base).__name__
    if cls not in ARCHITECTURES:
        raise UserError(f"{cls} cannot be exported to GGUF by scalora (it writes {', '.join(ARCHITECTURES)})")
    arch, permute = ARCHITECTURES[cls]
    cfg = base.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    modules_to_save = getattr(model.peft_config[adapter_name], "modules_to_save", None)
    if modules_to_save:
        raise UserError(f"the adapter also trains whole modules ({modules_to_save}), which a GGUF LoRA file cannot "
                        "hold: export the merged model (`scalora export ADAPTER --gguf OUT.gguf`)")
    if getattr(model.peft_config[adapter_name], "use_dora", False):
        raise UserError("a DoRA adapter rescales each output of the merged weight, which a GGUF LoRA file (W + "
                        "alpha / r * B A) cannot hold: export the merged model (`scalora export ADAPTER --gguf "
                        "OUT.gguf`)")
    alpha = float(model.peft_config[adapter_name].lora_alpha)
    plan = []  # (gguf name, tensor)
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        key = module_name + ".weight"
        target = names.get_name(key, try_suffixes=(".weight",))
        if target is None:
            raise UserError(f"{key} of {cls} has no GGUF name in llama.cpp's {arch} architecture")
        a = module.lora_A[adapter_name].weight.detach().float()
        b = module.lora_B[adapter_name].weight.detach().float()
        r = a.shape[0]
        b = b * (module.scaling[adapter_name] * r / alpha)  # llama.cpp's alpha / r becomes this layer's scale
        if permute:
            b = _llama_rows(key, b, n_head, n_kv)
        plan += [(target + ".lora_a", a), (target + ".lora_b", b)]
    if not plan:
        raise UserError("the model holds no LoRA layers to export")
    with _file_beside(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        types = {}
        for target, t in plan:
            qtype = _qtype(kind, tuple(t.shape))
            types[target] = qtype.name
            w.add_tensor(target, _convert(t, qtype), raw_dtype=qtype if qtype.name == "BF16" else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return types
