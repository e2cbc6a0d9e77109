"""GGUF export (`scalora export --gguf`, scalora/gguf_export.py), read back by a reader scalora did not write:
transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`, which de-quantizes to fp32).

Tiny models with a byte-level BPE tokenizer trained here on the builtin corpus (the builtin model's word-level
tokenizer has no GGUF form and is refused by name), a random LoRA adapter merged in. For each type the file must give:
- the logits of the merged model with its weights rounded the way the type rounds them (torch's f16 / bf16
  round-to-nearest-even, ggml's Q8_0 blocks through the gguf package's reference quantizer), to fp32 rounding
  (tests/tolerance.py's logits_rtol); the base alone (an export that lost the adapter) lies far outside;
- against the merged model itself, the type's own bound: f16 / bf16 one rounding (u) of every weight, a stage's
  rounding per sum in a row, adding in quadrature (operand_rtol); Q8_0 the same with u its rounding's size: steps of
  max|block| / 127 per 32 weights, errors uniform within a step (rms step / sqrt(12)), relative to the weights' norm;
- the same token ids for the same text, the chat template, the special tokens; greedy generation the same tokens in
  f32 and f16.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import scalora
from scalora.core.errors import UserError

from conftest import randomize_lora
from helpers import bpe_tokenizer
from tolerance import LAMBDA, assert_rounding_close, logits_rtol, model_shape, operand_rtol

gguf = pytest.importorskip("gguf")  # a runtime dependency (pyproject.toml); the skip names it if an install lacks it

TEXTS = ["Instruction: name the topic of this sentence.\nInput: the river flooded the valley",
         "it is about words, 12345 and  two  spaces"]


def _merged(arch: str, tokenizer, tied: bool):
    """A tiny base of `arch` with a random LoRA adapter on every linear layer, merged: (merged, the base alone)."""
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=50000.0,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that misplacing them shows
        for name, p in base.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    bare = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    bare.load_state_dict(base.state_dict())
    model = scalora.get_peft_model(base, scalora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(model)
    return model.merge_and_unload().eval(), bare


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(arch, type): (folder, file name)} plus the merged models and the tokenizer."""
    from scalora.gguf_export import write_gguf

    tokenizer = bpe_tokenizer()
    root = tmp_path_factory.mktemp("gguf")
    models, files = {}, {}
    for arch, tied in (("llama", True), ("mistral", False), ("qwen2", False)):
        models[arch] = _merged(arch, tokenizer, tied)
        for kind in ("f32", "f16", "bf16", "q8_0"):
            write_gguf(models[arch][0], tokenizer, str(root / f"{arch}-{kind}.gguf"), kind)
            files[arch, kind] = (str(root), f"{arch}-{kind}.gguf")
    return files, models, tokenizer


def _read(files, arch, kind):
    folder, name = files[arch, kind]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _ids(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rounded_like(model, kind):
    """A copy of `model` whose 2-D weights went through the type's rounding (1-D tensors stay fp32, as exported)."""
    from gguf import GGMLQuantizationType as Q, quants

    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            if p.dim() < 2 or kind == "f32":
                continue
            if kind in ("f16", "bf16"):
                p.copy_(p.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[kind])).float())
            else:  # ggml's Q8_0 through the gguf package's reference quantizer and de-quantizer
                q = quants.quantize(p.numpy(), Q.Q8_0)
                p.copy_(torch.from_numpy(quants.dequantize(q, Q.Q8_0)).reshape(p.shape))
    return copy


def _q8_0_u(model) -> float:
    """The relative size of Q8_0's rounding of the 2-D weights (the largest over tensors): each block of 32 rounds
    to steps of max|block| / 127, the error uniform within a step (rms step / sqrt(12)), relative to the weights'
    norm. From the weights alone, not from the quantized result."""
    worst = 0.0
    for p in model.parameters():
        if p.dim() < 2:
            continue
        blocks = p.detach().double().reshape(-1, 32)
        step = blocks.abs().amax(dim=1) / 127
        err = math.sqrt((32 * step.square() / 12).sum().item())
        worst = max(worst, err / p.detach().double().norm().item())
    return worst


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_exported_file_gives_the_merged_models_logits(exported, arch, kind):
    files, models, tokenizer = exported
    merged, bare = models[arch]
    ids = _ids(tokenizer)
    got = _logits(_read(files, arch, kind), ids)
    expected = _logits(_rounded_like(merged, kind), ids)
    # the read-back model is the merged one with the type's rounding applied to it: fp32 rounding apart
    assert_rounding_close(got, expected, logits_rtol(merged), wrong=_logits(bare, ids),
                          what=f"{arch} {kind} GGUF against the merged model rounded as {kind} (wrong: the base alone)")
    if kind != "f32":  # and against the merged model itself, the bound the type implies
        depth = model_shape(merged)[1]
        if kind == "q8_0":
            rtol = LAMBDA * _q8_0_u(merged) * math.sqrt(depth)  # one side rounded
        else:
            rtol = operand_rtol(depth, {"f16": torch.float16, "bf16": torch.bfloat16}[kind])
        assert_rounding_close(got, _logits(merged, ids), rtol, what=f"{arch} {kind} GGUF against the merged model")


def test_unpermuted_q_and_k_would_be_caught(exported, tmp_path):
    """Without llama.cpp's Q / K row order the reader's un-permutation scrambles the rotary halves: the logits move
    far outside fp32 rounding (so the f32 comparison above shows the order is right)."""
    from scalora import gguf_export

    files, models, tokenizer = exported
    merged, _ = models["llama"]
    ids = _ids(tokenizer)
    saved = gguf_export.ARCHITECTURES["LlamaForCausalLM"]
    gguf_export.ARCHITECTURES["LlamaForCausalLM"] = ("llama", False)
    try:
        gguf_export.write_gguf(merged, tokenizer, str(tmp_path / "wrong.gguf"), "f32")
    finally:
        gguf_export.ARCHITECTURES["LlamaForCausalLM"] = saved
    wrong = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="wrong.gguf", dtype=torch.float32).eval()
    right = _logits(_read(files, "llama", "f32"), ids)
    assert_rounding_close(right, _logits(merged, ids), logits_rtol(merged), wrong=_logits(wrong, ids),
                          what="llama f32 GGUF (wrong: Q / K rows in transformers' order)")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_and_chat_template_come_back(exported, arch):
    files, _, tokenizer = exported
    folder, name = files[arch, "f16"]
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "name the topic: the river flooded the valley"}]
    assert theirs.chat_template == tokenizer.chat_template
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == \
        (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)


SPM_TEXTS = TEXTS + ["caf\u00e9 \u00fcber na\u00efve \u4e2d\u6587 \U0001f600", "  two leading spaces\tand a tab\n\nlines"]


@pytest.mark.parametrize("arch,form", [("llama", "metaspace"), ("mistral", "normalizer")])
def test_sentencepiece_tokenizer_comes_back(tmp_path, arch, form):
    """A SentencePiece-style tokenizer (Llama 2's, Mistral v0.1's form: "▁", byte fallback) written as llama.cpp's
    `llama` tokenizer model: transformers' GGUF reader rebuilds it from the tokens and scores alone (no merges in
    the file, as llama.cpp's converter writes none) and gives the same ids for the same text, byte-fallback
    characters, leading spaces and tabs included; the special tokens and chat template come back; the file's logits
    are the merged model's (fp32 to rounding). The scores carry the merge order: with llama.cpp's placeholder
    score for every piece (its converter's -1000 when it has no tokenizer.model), the rebuilt tokenizer splits some
    of the same texts differently. Both forms tokenizer.json takes ("▁" from a Metaspace pre-tokenizer or from a
    Prepend + Replace normalizer, Llama 2's); transformers' reader rebuilds the Metaspace form, which puts no "▁"
    before text that already starts with a space, so text starting with spaces is compared for that form only
    (llama.cpp follows SentencePiece, the normalizer form: bench/llama_cpp_check.py)."""
    from gguf import GGUFReader
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from helpers import sentencepiece_tokenizer
    from scalora.gguf_export import write_gguf

    tokenizer = sentencepiece_tokenizer(form=form)
    merged, bare = _merged(arch, tokenizer, tied=arch == "llama")
    write_gguf(merged, tokenizer, str(tmp_path / "m.gguf"), "f32")
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.merges" not in fields
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in SPM_TEXTS if form == "metaspace" else [t for t in SPM_TEXTS if not t[0].isspace()]:
        assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert (theirs.bos_token, theirs.eos_token, theirs.unk_token) == ("<s>", "</s>", "<unk>")
    assert theirs.chat_template == tokenizer.chat_template
    ids = tokenizer(SPM_TEXTS[2], return_tensors="pt")["input_ids"]
    got = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32), ids)
    assert_rounding_close(got, _logits(merged, ids), logits_rtol(merged), wrong=_logits(bare, ids),
                          what="f32 file against the merged model (wrong: the base alone)")
    vocab = tokenizer.get_vocab()
    flat = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, {t: -1000.0 for t in vocab}), add_bos_token=True)
    assert any(flat(t)["input_ids"] != tokenizer(t)["input_ids"] for t in SPM_TEXTS)  # measured: 2 of the 4


def test_greedy_generation_is_the_same_in_f32_and_f16(exported):
    files, models, tokenizer = exported
    ids = tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    outs = []
    for kind in ("f32", "f16"):
        model = _read(files, "llama", kind)
        outs.append(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        merged = models["llama"][0].generate(ids, max_new_tokens=12, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(outs[0], merged) and torch.equal(outs[1], merged)


def test_what_cannot_be_exported_is_refused_by_name(exported, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from scalora.builtin import build_tokenizer
    from scalora.gguf_export import write_gguf

    files, models, tokenizer = exported
    merged, _ = models["llama"]
    with pytest.raises(UserError, match="WordLevel"):  # the builtin model's tokenizer
        write_gguf(merged, build_tokenizer(), str(tmp_path / "a.gguf"), "f16")
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        write_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))), tokenizer,
                   str(tmp_path / "b.gguf"), "f16")
    with pytest.raises(UserError, match="q4_k"):
        write_gguf(merged, tokenizer, str(tmp_path / "c.gguf"), "q4_k")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_scalora_export_writes_the_adapted_model(tmp_path):
    """`scalora export ADAPTER --gguf OUT --base FOLDER` (the entry point, in this process): the base folder and a
    saved adapter in, the adapted model's logits out of the file (the unmerged PeftModel's, to fp32 rounding);
    `--gguf-adapter` writes the adapter file (its content: the test below); neither option is refused."""
    import contextlib
    import io

    from scalora import cli

    tokenizer = bpe_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    ids = _ids(tokenizer)
    bare = _logits(base, ids)
    model = scalora.get_peft_model(base, scalora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model.eval(), ids)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["export", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "out" / "m.gguf"),
                           "--type", "f32", "--base", str(tmp_path / "base")])
    assert status == 0 and "GGUF written" in out.getvalue()
    got = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf",
                                                       dtype=torch.float32).eval(), ids)
    assert_rounding_close(got, expected, logits_rtol(base), wrong=bare,
                          what="scalora export f32 against base + adapter (wrong: the base alone)")
    from gguf import GGUFReader

    with contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(["export", str(tmp_path / "adapter"), "--gguf-adapter", str(tmp_path / "lora.gguf"),
                           "--base", str(tmp_path / "base")])
    reader = GGUFReader(str(tmp_path / "lora.gguf"))
    assert status == 0 and reader.fields["general.type"].contents() == "adapter"
    assert len(reader.tensors) == 2 * 7 * 2  # lora_a and lora_b of 7 linear layers in 2 blocks
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")])
    assert status == 2 and "--gguf-adapter" in err.getvalue()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_file_applied_as_llama_cpp_applies_it_gives_the_merged_weights(tmp_path, arch):
    """The GGUF LoRA file (`--gguf-adapter`), read with the gguf package's reader and applied as llama.cpp applies
    one (W + alpha / r * B A per named weight, alpha from the file, r from A's shape) to the exported base: the
    exported merged model's weights, tensor by tensor, to the rounding of the r-term sum (tests/tolerance.py's
    rounding_rtol). Per-layer ranks and alphas (rank_pattern, alpha_pattern) and rsLoRA's scale included; the file's
    B without that folding (each layer at the file's alpha / r) lies far outside."""
    from gguf import GGUFReader

    from scalora.gguf_export import write_gguf, write_gguf_adapter
    from tolerance import assert_rounding_close as close, rounding_rtol

    tokenizer = bpe_tokenizer()
    config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    write_gguf(base, tokenizer, str(tmp_path / "base.gguf"), "f32")
    model = scalora.get_peft_model(base, scalora.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, rank_pattern={"down_proj": 4},
        alpha_pattern={"q_proj": 40}))
    randomize_lora(model)
    write_gguf_adapter(model, str(tmp_path / "adapter.gguf"))
    write_gguf(model.merge_and_unload(), tokenizer, str(tmp_path / "merged.gguf"), "f32")

    def tensors(name):
        reader = GGUFReader(str(tmp_path / name))
        return reader, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}

    reader, lora = tensors("adapter.gguf")
    _, plain = tensors("base.gguf")
    _, merged = tensors("merged.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    targets = sorted({k.rsplit(".", 1)[0] for k in lora})
    assert len(targets) == 7 * 2 and all(t in plain for t in targets)  # every linear layer of both blocks
    for t in targets:
        a, b = lora[t + ".lora_a"], lora[t + ".lora_b"]
        r = a.shape[0]
        applied = plain[t] + alpha / r * (b.double() @ a.double()).float()
        scale = (40 if "attn_q" in t else 16) / math.sqrt(r)  # the config's: alpha_pattern, rsLoRA
        raw = b.double() * alpha / (scale * r)  # the adapter's own B, as an export without the folding writes it
        unfolded = plain[t] + alpha / r * (raw @ a.double()).float()
        close(applied, merged[t], rounding_rtol(r, 2), wrong=unfolded,
              what=f"{arch} {t}: base + adapter file as llama.cpp applies it (wrong: B unscaled, alpha / r)")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_export_equals_the_whole_model_merge_and_holds_one_layer(tmp_path, dtype):
    """`scalora export --gguf` merges one decoder layer at a time (scalora/streamed.py). On a 4-bit NF4 base as
    trained (its run config: quantization, compute dtype) with a tied head and LoRA on every linear layer: every
    tensor of the file equals, bit for bit, what the whole-model path writes (load as trained, de-quantize all,
    merge_and_unload, write_gguf), and while the stream runs at most one decoder layer of the base is on a real
    device (the others on the meta device), none after it. The whole-model file against the base alone shows the
    comparison sees the adapter."""
    import argparse
    import contextlib
    import io

    import numpy as np
    from gguf import GGUFReader

    from scalora import cli, gguf_export, streamed
    from scalora.core.lora import LoraLayer
    from scalora.model import trained_setup

    tokenizer = bpe_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                  max_position_embeddings=256, tie_word_embeddings=True, rope_theta=50000.0,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = scalora.get_peft_model(base, scalora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "run.yaml").write_text(f"model:\n  name_or_path: {tmp_path / 'base'}\n  dtype: {dtype}\n"
                                       "quant:\n  bits: 4\n")
    args = argparse.Namespace(adapter=str(tmp_path / "adapter"), base=None, config=str(tmp_path / "run.yaml"),
                              full_precision=False, trust_remote_code=False)

    setup = trained_setup(args.adapter, None, args.config)
    assert streamed.whole_model_reason(setup[0], setup[1], args.adapter) is None
    merged = streamed.open_merged(args.adapter, *setup)
    held = []

    def filled_layers():
        count = 0
        for unit, entries in merged._units:
            tensors = [(h.base_layer.weight if isinstance(h, LoraLayer) else getattr(h, a)) for _, h, a in entries]
            count += unit is not None and any(not t.is_meta for t in tensors)
        return count

    def watched(wanted):
        for item in merged.tensors(wanted):
            held.append(filled_layers())
            yield item
        held.append(filled_layers())

    gguf_export.write_gguf_tensors(merged.config, merged.architecture, merged.tokenizer, str(tmp_path / "s.gguf"),
                                   "f32", merged.keys, watched)
    assert max(held) == 1 and held[-1] == 0 and len(held) > 3 * 9
    whole, tok, _ = cli._merged(args, torch.float32)
    gguf_export.write_gguf(whole, tok, str(tmp_path / "w.gguf"), "f32")
    gguf_export.write_gguf(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tok, str(tmp_path / "b.gguf"), "f32")
    ours, ref, bare = (GGUFReader(str(tmp_path / f)) for f in ("s.gguf", "w.gguf", "b.gguf"))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    differs = set()
    for a, b, c in zip(ours.tensors, ref.tensors, bare.tensors):
        assert np.array_equal(a.data, b.data), a.name
        if not np.array_equal(b.data, c.data):
            differs.add(a.name)
    adapted = {t.name for t in ref.tensors if len(t.shape) == 2 and t.name.startswith("blk.")}
    assert len(adapted) == 3 * 7 and adapted <= differs  # (bf16: the norms' and embedding's rounding differs too)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["export", args.adapter, "--gguf", str(tmp_path / "cli.gguf"), "--type", "f32",
                         "--config", args.config]) == 0
    assert "one layer at a time" in out.getvalue()
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "s.gguf").read_bytes()


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_conversion_by_blocks_of_rows_gives_the_same_bytes(monkeypatch, kind):
    """The writer converts a large tensor a block of rows at a time (bounded temporaries); with blocks of 3 rows
    (uneven: the last block is short) the bytes equal those of the tensor converted in one piece, from a bf16
    tensor (the dtype an embedding is loaded in) as from fp32."""
    from scalora import gguf_export

    t = torch.randn(10, 64)
    qtype = gguf_export._qtype(kind, tuple(t.shape))
    for source in (t, t.bfloat16()):
        whole = gguf_export._convert(source, qtype)
        monkeypatch.setattr(gguf_export, "_CHUNK", 3 * 64)
        blocks = gguf_export._convert(source, qtype)
        monkeypatch.setattr(gguf_export, "_CHUNK", 1 << 22)
        assert blocks.dtype == whole.dtype and blocks.shape == whole.shape
        assert blocks.tobytes() == whole.tobytes()


def _llama_cpp_rope_factors(rope: dict, head_dim: int) -> list[float]:
    """llama.cpp's converter's formula for Llama 3.1's rope_freqs (convert_hf_to_gguf.py, LlamaModel), written out
    from its published form: a reference independent of transformers' rope function that scalora's export uses."""
    theta = rope["rope_theta"]
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    """Llama 3.1's rope scaling ("llama3") as llama.cpp's `rope_freqs` tensor (angles divided by it): its values are
    the unscaled inverse frequencies over the model's own (transformers' rotary embedding) to fp32 rounding, and
    llama.cpp's converter's formula gives them too; the test's shape covers the three regimes (unscaled, smoothed,
    scaled by the factor), so a missing tensor (all 1) or a plain factor everywhere falls outside. Linear scaling is
    llama.cpp's rope.scaling.type / factor; scaling llama.cpp's llama architecture does not take the same way (yarn,
    dynamic) is refused by name. Checked by llama.cpp itself in bench/llama_cpp_formats.py."""
    from gguf import GGUFReader

    from scalora.gguf_export import write_gguf

    tokenizer = bpe_tokenizer()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 50000.0}
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(tokenizer), max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", rope_scaling=rope, **kw)).eval()
    write_gguf(model, tokenizer, str(tmp_path / "l3.gguf"), "f16")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "l3.gguf")).tensors}
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32" and factors.shape == (8,)
    plain = 1.0 / 50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    ours = plain / factors  # the inverse frequencies llama.cpp rotates with
    theirs = model.model.rotary_emb.inv_freq.float()
    tol = 4 * torch.finfo(torch.float32).eps  # two roundings (the ratio, then the division back) of fp32 values
    assert torch.allclose(ours, theirs, rtol=tol, atol=0)
    assert torch.allclose(factors, torch.tensor(_llama_cpp_rope_factors(rope, 16)), rtol=tol, atol=0)
    assert set(factors.tolist()) >= {1.0, 8.0} and ((factors > 1) & (factors < 8)).any()  # all three regimes
    for wrong in (torch.ones(8), torch.full((8,), 8.0)):
        assert not torch.allclose(plain / wrong, theirs, rtol=1e-3)

    linear = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", rope_scaling={"rope_type": "linear", "factor": 2.0}, **kw)).eval()
    write_gguf(linear, tokenizer, str(tmp_path / "lin.gguf"), "f16")
    fields = GGUFReader(str(tmp_path / "lin.gguf")).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0
    yarn = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}, **kw))
    with pytest.raises(UserError, match="yarn rope scaling"):
        write_gguf(yarn, tokenizer, str(tmp_path / "yarn.gguf"), "f16")
