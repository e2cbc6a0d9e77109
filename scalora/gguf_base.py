"""A GGUF file as the base: `model.name_or_path: path/to/model.gguf` (or a folder / hub repository plus
`model.gguf_file`).

transformers reads GGUF (with the `gguf` package), de-quantizing every tensor to fp32, but refuses to quantize such
a model again with bitsandbytes, and marks it so that `save_pretrained` refuses it too. So the file is converted once
into a plain fp32 folder (config.json, safetensors shards, the tokenizer with its chat template, the generation
config) in scalora's cache, and every path a run takes reads that folder as it reads any checkpoint: bitsandbytes
quantization, the low-memory layer-by-layer loader of ZeRO-3 / FSDP, `scalora plan`, merge and export. The folder is
keyed by the file's path, size and modification time (a changed file converts again), written to a temporary name
and renamed when complete, under a lock, so that the processes of a launched run convert it once between them.

The conversion holds the de-quantized model once in fp32: 4 bytes a parameter of memory (0.54 GB for a 135M model,
28 GB for a 7B one) and the same on disk.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .core.errors import UserError

MARKER = "scalora_gguf_source.json"  # written last into a converted folder: where it came from


def gguf_source(name_or_path: str, gguf_file: Optional[str]) -> Optional[tuple[str, str]]:
    """(folder or hub repository, file name) when the base is a GGUF file, else None."""
    if gguf_file:
        return name_or_path, gguf_file
    if not name_or_path.lower().endswith(".gguf"):
        return None
    local = os.path.abspath(os.path.expanduser(name_or_path))
    if not os.path.isfile(local):
        raise UserError(f"model.name_or_path={name_or_path!r}: no such GGUF file. For a file in a hub repository give "
                        "model.name_or_path=OWNER/REPO and model.gguf_file=FILE.gguf")
    return os.path.dirname(local), os.path.basename(local)


def _local_file(source: str, name: str, revision: Optional[str]) -> str:
    path = os.path.join(os.path.expanduser(source), name)
    if os.path.isdir(os.path.expanduser(source)):
        if not os.path.isfile(path):
            raise UserError(f"model.gguf_file={name!r}: no such file in {source}")
        return os.path.abspath(path)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source, name, revision=revision)
    except Exception as e:  # offline, no such repository or file: the hub's own message says which
        raise UserError(f"model.name_or_path={source!r} with model.gguf_file={name!r} could not be fetched "
                        f"({type(e).__name__}: {e}); give a local .gguf file instead") from None


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(file: str) -> str:
    st = os.stat(file)
    return hashlib.sha256(f"{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def plain_folder(source: str, name: str, revision: Optional[str] = None, config_only: bool = False) -> str:
    """The converted folder of the GGUF file `name` in `source` (a local folder or a hub repository), converted on
    first use. With `config_only` (planning needs config.json alone), a folder with config.json only, read from the
    file's metadata, unless the full conversion is already there."""
    file = _local_file(source, name, revision)
    from .builtin import cache_root

    dest = cache_root() / "gguf" / f"{Path(name).stem}-{_key(file)}"
    if (dest / MARKER).is_file():
        return str(dest)
    if config_only:
        folder = dest.with_name(dest.name + ".config")
        if not (folder / "config.json").is_file():
            _config(file).save_pretrained(folder)
        return str(folder)
    with _lock(dest.with_name(dest.name + ".lock")):
        if not (dest / MARKER).is_file():  # another process may have converted it while this one waited
            _convert(file, dest)
    return str(dest)


def _config(file: str):
    from transformers import AutoConfig

    return _unquantized(AutoConfig.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file)))


def _unquantized(config):
    """`config` without the GGUF quantization transformers records: the folder holds plain weights."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


@contextmanager
def parsed_once():
    """While converting: each GGUF file parsed once, and gguf's tensor-name map built once per architecture.
    transformers (5.x) parses the file again for the config, the tokenizer and the weights (a GGUFReader each: the
    49,152-token vocabulary read element by element) and builds the name map anew for each of the model's modules;
    both are pure functions of their arguments and read-only here. Measured [avx2], SmolLM2-135M Q4_1: 24.2-24.3 s
    without, 8.6-11.3 s with, the folder byte for byte the same."""
    try:
        import gguf
    except ImportError:  # transformers names the package it needs when it reads the file
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def parsed(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert(file: str, dest: Path) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    print(f"scalora: converting {file} ({os.path.getsize(file) / 2**20:.1f} MiB, GGUF) into a plain fp32 folder "
          f"{dest} once; later runs read that folder", file=sys.stderr, flush=True)
    folder, name = os.path.dirname(file), os.path.basename(file)
    try:
        with parsed_once():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:  # an architecture or tensor type transformers lacks
        raise UserError(f"{file}: transformers cannot read this GGUF file ({type(e).__name__}: {e}); give the "
                        "model's safetensors checkpoint instead") from None
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unquantized(model.config).save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        state, seen = {}, set()
        for k, t in model.state_dict().items():  # a tied head is the embedding matrix: stored once, as transformers
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                state[k] = t.contiguous()
        save_torch_state_dict(state, tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        st = os.stat(file)
        with open(tmp / MARKER, "w") as f:
            json.dump({"gguf_file": os.path.realpath(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "tensors": len(state)}, f, indent=2)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"scalora: converted in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
