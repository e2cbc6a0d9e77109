"""A GGUF file as the base (`model.name_or_path: X.gguf`, or `model.gguf_file`; scalora/gguf_base.py).

A tiny Llama (GQA, tied embeddings, norms away from 1) with a byte-level BPE tokenizer and a chat template, written
as GGUF by scalora's writer (the `gguf` package's GGUFWriter) and read back by transformers' GGUF reader, the path a
real file takes. The converted folder must hold exactly what transformers de-quantizes from the file (for f32: the
original weights, bit for bit), the same tokenizer and template; a run from the file must train exactly as a run
from the original checkpoint; the low-memory loader, `scalora plan`, several processes converting at once and a
changed file must all come out right.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from scalora import gguf_base
from scalora.config import load_config
from scalora.core.errors import UserError
from scalora.model import resolve_model_path

from helpers import bpe_tokenizer, run

gguf = pytest.importorskip("gguf")

TEXTS = ["Instruction: name the topic of this sentence.\nInput: the river flooded the valley", "12345 and  two  spaces"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the original model, its tokenizer, its save_pretrained folder, {type: .gguf path})."""
    from scalora.gguf_export import write_gguf

    tokenizer = bpe_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read as another tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("gguf-base")
    model.save_pretrained(root / "original")
    tokenizer.save_pretrained(root / "original")
    files = {}
    for kind in ("f32", "q8_0"):
        files[kind] = str(root / f"tiny-{kind}.gguf")
        write_gguf(model, tokenizer, files[kind], kind)
    return model, tokenizer, str(root / "original"), files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _state(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_the_folder_holds_what_the_file_holds(source, cache, monkeypatch):
    import gguf

    model, tokenizer, _, files = source
    parses = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or reader(*a, **k))
    counting = gguf.GGUFReader
    folder = resolve_model_path(files["f32"])
    assert len(parses) == 1 and gguf.GGUFReader is counting  # config, tokenizer, weights: one parse; put back
    assert os.path.dirname(folder) == str(cache) and os.path.isfile(os.path.join(folder, gguf_base.MARKER))
    ours, original = _state(folder), model.state_dict()
    assert list(ours) == list(original)
    for k in original:  # f32 holds the weights themselves: bit for bit, Q/K rows in transformers' order again
        assert torch.equal(ours[k], original[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied, stored once
    theirs = AutoTokenizer.from_pretrained(folder)
    assert theirs(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert theirs.chat_template == tokenizer.chat_template
    assert (theirs.eos_token, theirs.bos_token) == (tokenizer.eos_token, tokenizer.bos_token)

    # Q8_0: what transformers de-quantizes from the file, bit for bit; not the original weights (it was quantized)
    folder = resolve_model_path(files["q8_0"])
    read = AutoModelForCausalLM.from_pretrained(os.path.dirname(files["q8_0"]),
                                                gguf_file=os.path.basename(files["q8_0"]), dtype=torch.float32)
    ours, theirs = _state(folder), read.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_the_file_converts_once_and_again_when_it_changes(source, cache, monkeypatch, tmp_path):
    import shutil

    file = tmp_path / "copy.gguf"
    shutil.copy(source[3]["f32"], file)
    calls = []
    convert = gguf_base._convert

    def slow_convert(*args):
        calls.append(args)
        time.sleep(0.5)  # both threads are waiting on the lock by now
        convert(*args)

    monkeypatch.setattr(gguf_base, "_convert", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(resolve_model_path(str(file)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(got)) == 1 and len(got) == 2  # two ranks at once: one conversion
    assert resolve_model_path(str(file)) == got[0] and len(calls) == 1  # the next run reads the folder
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: converted again, elsewhere
    assert resolve_model_path(str(file)) != got[0] and len(calls) == 2
    # a folder and model.gguf_file name the same file as the path does
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", "model.gguf_file=copy.gguf"])
    from scalora.model import base_folder

    assert base_folder(cfg) == resolve_model_path(str(file)) and len(calls) == 2


def test_planning_reads_the_metadata_without_converting(source, cache):
    from scalora.plan import model_shape

    _, _, original, files = source
    shape = model_shape(files["q8_0"])
    assert shape.total_params == model_shape(original).total_params
    assert not any(p.name.endswith(gguf_base.MARKER) for p in cache.rglob("*"))  # nothing de-quantized


def test_the_low_memory_loader_reads_the_converted_folder(source, cache):
    """ZeRO-3 / FSDP load the base layer by layer from safetensors files: from a converted folder (tied head stored
    once) the same model as the plain path, byte for byte."""
    from test_loading import _assert_same_model, _build

    cfg = load_config(None, ["model.dtype=float32", "lora.lora_dropout=0"])
    folder = resolve_model_path(source[3]["f32"])
    assert _assert_same_model(_build(cfg, folder, torch.float32, False), _build(cfg, folder, torch.float32, True),
                              torch.float32) > 0


@pytest.mark.slow  # two CLI runs, and the session's tiny base built first (~30 s of the fast tier's 63 s)
def test_a_run_from_the_file_trains_as_a_run_from_the_checkpoint(source, env):
    """`scalora train` with the .gguf path: 4-bit NF4 base, the same adapter, bit for bit, as the same run from the
    original save_pretrained folder (the f32 file holds the same weights), and the banner names the file."""
    _, _, original, files = source
    root = env["root"] / "gguf-base"
    args = ["train", "configs/tiny.yaml", "train.max_steps=2", "train.eval_every=0", "data.max_eval_generate=0",
            "train.save_every=0", "log.report_to=none", "data.max_length=1024", "train.schedule=constant", "train.warmup_ratio=0"]
    p = run(env, *args, f"model.name_or_path={files['f32']}", f"train.output_dir={root / 'gguf'}")
    run(env, *args, f"model.name_or_path={original}", f"train.output_dir={root / 'folder'}")
    assert "scalora: tiny-f32.gguf | 4-bit base" in p.stdout + p.stderr
    a = load_file(root / "gguf" / "final" / "adapter_model.safetensors")
    b = load_file(root / "folder" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained


def test_missing_files_are_named_with_the_way_out(source, cache, tmp_path):
    with pytest.raises(UserError, match="no such GGUF file.*model.gguf_file"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="model.gguf_file='nope.gguf': no such file"):
        resolve_model_path(str(tmp_path), gguf_file="nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match="junk.gguf"):
        resolve_model_path(str(tmp_path / "junk.gguf"))
    assert not list(cache.glob("junk-*/")) or not any((p / gguf_base.MARKER).exists() for p in cache.glob("junk-*"))
