"""Crash-safe, topology-free checkpoints.

    OUTPUT/checkpoints/step-000100/
        adapter/adapter_config.json, adapter/adapter_model.safetensors   the adapter, whole, in PEFT format
        optimizer.safetensors    the adapter's optimizer state, whole, keyed "<parameter name>::<state key>"
        trainer_state.json       step, run id, world size, validation loss, non-tensor optimizer state
        config.yaml              the run config
        manifest.json            every file above with its size and sha256; written last

A checkpoint is written into `step-XXXXXX.tmp`, each file fsynced, the manifest last, then renamed into place: a
folder without a manifest that matches its files is never taken for a checkpoint, so a kill or a full disk at any
moment leaves the previous checkpoint as the newest valid one. Everything is stored whole (gathered from ZeRO/FSDP
shards), so a run saved on N processes resumes on M. The frozen base is never written. Nothing is pickled: tensors
are safetensors, the rest JSON/YAML. Dropout randomness is seeded from the data position (see train.py), so no RNG
state needs saving.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any, Optional

import torch

from . import faults, sharding
from .config import ConfigError, RunConfig, build_config
from .core.errors import UserError
from .core.peft_model import PeftModel

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None if `path` is a complete checkpoint; otherwise what is wrong with it."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return (f"a manifest of checkpoint format {found!r}, expected {FORMAT} (written by another version of scalora, "
                "or not a scalora checkpoint)")
    for rel, meta in manifest.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != meta["size"]:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {meta['size']}"
        if checksums and _sha256(full) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Checkpoint folders with a manifest whose files are all there (sizes checked), oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_DIR.match(name)
            if m and verify(os.path.join(root, name), checksums=False) is None:
                found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest(out_dir: str) -> Optional[str]:
    """The newest checkpoint that passes the full checksum check; a damaged one is skipped with a warning for the one
    before. A checkpoint of another format, or checkpoints that are all damaged, are refused: starting the run
    again from step 0 would throw its history away."""
    root = os.path.join(out_dir, "checkpoints")
    folders = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n)) if os.path.isdir(root) else []
    damaged = []
    for name in reversed(folders):
        path = os.path.join(root, name)
        problem = verify(path)
        if problem is None:
            return path
        if "checkpoint format" in problem:
            raise CheckpointError(f"checkpoint {path} has {problem}; resume it with the scalora that wrote it, or "
                                  "pass train.overwrite=true to start a new run here")
        if problem.startswith("no manifest.json"):
            continue  # a write that did not finish: never was a checkpoint
        warnings.warn(f"skipping checkpoint {path}: {problem}")
        damaged.append(f"{name}: {problem}")
    if damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged ({'; '.join(damaged)}): delete them to start the "
                              "run again from step 0, or pass train.overwrite=true")
    return None


def _write_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def save(accelerator, model, optimizer, step: int, state: dict[str, Any], config_yaml: str, out_dir: str,
         keep: int, keep_best: bool = False) -> Optional[str]:
    """Write the checkpoint of `step` (collective: every rank calls it). Returns its folder."""
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    params = sharding.gather_params(unwrapped)
    opt_tensors, opt_scalars = sharding.gather_optimizer_state(unwrapped, optimizer)
    final = os.path.join(out_dir, "checkpoints", f"step-{step:06d}")
    error: Optional[BaseException] = None
    if accelerator.is_main_process:
        try:
            _write(unwrapped, params, opt_tensors, opt_scalars, step, state, config_yaml, final,
                   accelerator.num_processes)
            _prune(out_dir, keep, keep_best)
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC:
            raise CheckpointError(f"the disk is full: checkpoint {final} was not written (the previous checkpoint "
                                  "is intact); free space and resume with train.resume=auto") from error
        raise error
    return final


def _refuse_nonfinite(params: dict[str, torch.Tensor], where: str) -> None:
    bad = [n for n, t in params.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to write a non-finite adapter to {where} ({bad[0]} and {len(bad) - 1} "
                              "more); resume from the last checkpoint")


def _write(unwrapped: PeftModel, params, opt_tensors, opt_scalars, step, state, config_yaml, final, world) -> None:
    _refuse_nonfinite(params, final)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        unwrapped.save_pretrained(os.path.join(tmp, "adapter"), state_dict=params)
        faults.maybe_kill("ckpt-adapter", step)
        faults.maybe_disk_full(step)
        _write_tensors(opt_tensors, os.path.join(tmp, OPTIMIZER_FILE))
        faults.maybe_kill("ckpt-optimizer", step)
        shutil.copyfile(config_yaml, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "world_size": world, "optimizer_scalars": opt_scalars, **state}, f, indent=2)
        files = {}
        for rel in _files(tmp):
            full = os.path.join(tmp, rel)
            with open(full, "rb+") as f:
                os.fsync(f.fileno())
            files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
        faults.maybe_kill("ckpt-manifest", step)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        faults.maybe_kill("ckpt-rename", step)
        if os.path.exists(final):  # a re-run of the same step: keep the old one until the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(os.path.dirname(final))
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(out_dir: str, keep: int, keep_best: bool) -> None:
    """Keep the newest `keep` checkpoints (and the best by validation loss), drop the rest and stale .tmp folders."""
    root = os.path.join(out_dir, "checkpoints")
    found = checkpoints(out_dir)
    keepers = {p for _, p in found[-keep:]} if keep > 0 else {p for _, p in found}
    if keep_best:
        scored = [(read_state(p).get("eval_loss"), p) for _, p in found]
        scored = [(loss, p) for loss, p in scored if loss is not None]
        if scored:
            keepers.add(min(scored)[1])
    for _, p in found:
        if p not in keepers:
            shutil.rmtree(p, ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load(accelerator, model, optimizer, path: str) -> dict[str, Any]:
    """Restore the adapter and its optimizer state (any world size); returns the loop state."""
    from .core.adapter_io import adapter_key_map, read_tensors

    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; delete it to resume from the one before")
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    state = read_state(path)
    weights = os.path.join(path, "adapter", "adapter_model.safetensors")
    file_tensors = read_tensors(weights, "the adapter of a scalora checkpoint")
    names = {name for name, _ in sharding.trainable(unwrapped)}
    key_map = {m: f for f, m in adapter_key_map(unwrapped, "default", unwrapped.peft_config["default"]).items()}
    missing = sorted(n for n in names if key_map.get(n) not in file_tensors)
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit this model: no weights for {missing[:3]}; it was "
                              "written by a run with another lora or model config")
    params = {n: file_tensors[key_map[n]] for n in names}
    for n, p in sharding.trainable(unwrapped):
        shape = sharding.full_shape(p)
        if tuple(params[n].shape) != shape:
            raise CheckpointError(f"checkpoint {path}: {n} has shape {tuple(params[n].shape)}, the model {shape}")
    sharding.scatter_params(unwrapped, params)
    optimizer_state = read_tensors(os.path.join(path, OPTIMIZER_FILE), "a scalora checkpoint's optimizer state")
    sharding.scatter_optimizer_state(unwrapped, optimizer, optimizer_state,
                                     state.get("optimizer_scalars", {}))
    return state


def save_final_adapter(accelerator, model, path: str, initial: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The adapter in PEFT format, gathered whole from any sharding and written once by the main process; with
    `initial` (a PiSSA / OLoRA adapter as initialised) converted to plain LoRA on the original base."""
    unwrapped: PeftModel = accelerator.unwrap_model(model)
    params = sharding.gather_params(unwrapped)
    if accelerator.is_main_process:
        _refuse_nonfinite(params, path)
        unwrapped.save_pretrained(path, state_dict=params, initial_state_dict=initial)
    accelerator.wait_for_everyone()


# --- the run folder ---------------------------------------------------------------------------------------------
# Keys that may change between a run and its continuation: how long to train and how to start.
_CONTINUATION_KEYS = ("resume", "overwrite", "max_steps", "epochs", "output_dir")  # a run folder may be moved
_RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "summary.json", "loss.png", "config.yaml")
_RENAMED_LORA_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def same_run(saved_config: str, cfg: RunConfig) -> bool:
    """Whether the config saved in `saved_config` describes the same run as `cfg` (the log and dist sections may
    differ, and so may how long to train and how to start)."""
    import yaml

    with open(saved_config) as f:
        previous = yaml.safe_load(f) or {}
    lora = previous.get("lora") or {}
    for old, new in _RENAMED_LORA_KEYS.items():  # written by scalora 0.1.0 before the section took peft's names
        if old in lora:
            lora[new] = lora.pop(old)
    try:  # with today's defaults filled in, so that a key added since does not make the same run look different
        previous = build_config(previous, saved_config).to_dict()
    except ConfigError:
        return False
    mine = cfg.to_dict()
    if any(previous.get(s) != mine[s] for s in ("model", "quant", "lora", "data")):
        return False
    strip = lambda d: {k: v for k, v in (d or {}).items() if k not in _CONTINUATION_KEYS}  # noqa: E731
    return strip(previous.get("train")) == strip(mine["train"])


def prepare_output_dir(cfg: RunConfig, out: str) -> tuple[Optional[str], bool]:
    """Refuse a folder that holds another run. Returns (checkpoint to resume from, whether to clear the old run).

    Clearing (train.overwrite=true) is left to the caller, after the model and data have loaded, so that a bad
    input never costs the previous run.
    """
    saved = os.path.join(out, "config.yaml")
    if not os.path.exists(saved):
        return None, False
    if cfg.train.overwrite:
        return None, True
    if not same_run(saved, cfg):
        raise UserError(f"{out} holds a run with a different config ({saved}); choose another train.output_dir, "
                         "or pass train.overwrite=true to replace it")
    if cfg.train.resume != "auto":
        raise UserError(f"{out} already holds this run; pass train.resume=auto to continue it or "
                         "train.overwrite=true to start again")
    path = latest(out)
    if path and not same_run(os.path.join(path, "config.yaml"), cfg):
        raise UserError(f"checkpoint {path} was written by a run with a different config ({path}/config.yaml); "
                         "resume with that config, or pass train.overwrite=true to start a new run here")
    return path, False


def clear_previous_run(out: str) -> None:
    for name in _RUN_FILES:
        p = os.path.join(out, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
