"""What can be checked about a run before any process starts, all at once.

`scalora train` runs this before it trains or starts a launcher: the launch file and everything that depends on the
number of processes (batch divisibility, what the topology cannot shard, the launcher's precision), the model's
config, the data files (readable, a known format) and the output folder. A bad input is then one message from one
process, not one per worker after a minute of start-up. Nothing here writes anything.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import yaml

from . import dist
from .config import RunConfig
from .core.errors import UserError


def launch_settings(path: str) -> dict[str, Any]:
    """The parts of an accelerate launch file that matter here: topology kind, processes, mixed precision."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"launch file {path} could not be read ({e}); give an accelerate launch file, e.g. "
                        f"{dist.LAUNCH_DIR / 'ddp.yaml'}") from None
    if not isinstance(raw, dict):
        raise UserError(f"launch file {path} is not an accelerate launch file (a YAML mapping was expected)")
    kind = str(raw.get("distributed_type", "NO")).upper()
    ds = raw.get("deepspeed_config") or {}
    ds_json: dict[str, Any] = {}
    if kind == "DEEPSPEED":
        stage = ds.get("zero_stage")
        if ds.get("deepspeed_config_file"):
            try:
                with open(ds["deepspeed_config_file"]) as f:
                    ds_json = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"launch file {path}: its deepspeed_config_file {ds['deepspeed_config_file']!r} "
                                f"could not be read ({e}); the path is relative to the folder you launch from")
            stage = (ds_json.get("zero_optimization") or {}).get("stage", stage)
        name = f"zero{stage if stage is not None else 2}"
    else:
        name = {"FSDP": "fsdp", "NO": "single"}.get(kind, "ddp")
    return {"kind": name, "num_processes": raw.get("num_processes"), "mixed_precision": raw.get("mixed_precision"),
            "gradient_accumulation_steps": ds.get("gradient_accumulation_steps"), "deepspeed": ds_json}


def launched_settings() -> dict[str, Any]:
    """`launch_settings` for a process `accelerate launch` started: read from the environment the launcher hands its
    processes (the launch file and the command line's options, merged). The launcher's gradient accumulation is left
    to `dist.accumulation_steps`, which reads it there (or from the launcher's command line) itself."""
    env = os.environ
    world = dist.world_size()
    ds_json: dict[str, Any] = {}
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        ds_json = dist.deepspeed_asked()
        stage = (ds_json.get("zero_optimization") or {}).get("stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
        kind = f"zero{stage if stage is not None else 2}"
    elif env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        kind = "fsdp"
    else:
        kind = "ddp" if world > 1 else "single"
    return {"kind": kind, "num_processes": world, "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION"),
            "gradient_accumulation_steps": None, "deepspeed": ds_json}


def check(cfg: RunConfig, world: int = 1, launch: Optional[dict[str, Any]] = None, inputs: bool = True) -> None:
    """Raise one UserError listing every problem found (each with its fix); return quietly otherwise. `inputs`
    False: only what depends on the launcher and the model's config, as every launched process checks it (the same
    message from each, printed once); the data and the output folder are `check_inputs`'."""
    problems: list[str] = []
    launch = launch or {"kind": "single" if world == 1 else "ddp"}
    collect = _collector(problems)
    t = cfg.train
    alone = dist.launcher_processes_problem()
    if alone:
        problems.append(alone)
    collect(dist.accumulation_steps, t.global_batch_size, t.micro_batch_size, world)
    asked = launch.get("gradient_accumulation_steps")
    if asked not in (None, "auto") and world and t.global_batch_size % (t.micro_batch_size * world) == 0 and \
            int(asked) != t.global_batch_size // (t.micro_batch_size * world):
        problems.append(f"the launch file sets gradient_accumulation_steps={asked}, but scalora takes "
                        f"{t.global_batch_size // (t.micro_batch_size * world)} from train.global_batch_size / "
                        "(train.micro_batch_size x processes): remove it from the launch file")
    storage, dtype = collect(_storage_and_dtype, cfg) or (None, None)
    problems += [f"under {launch['kind']}: {p}" for p in dist.topology_problems(launch["kind"], cfg, storage, dtype)]
    if launch.get("deepspeed") and t.global_batch_size % (t.micro_batch_size * world) == 0:
        accum = t.global_batch_size // (t.micro_batch_size * world)
        ds_problems = dist.deepspeed_problems(launch["deepspeed"], cfg, accum, world, None)
        if ds_problems:
            problems.append(str(dist.deepspeed_error(ds_problems)))
    _check_model(cfg, launch, collect)
    if inputs:
        _check_data(cfg, collect)
        _check_output(cfg, collect)
    _raise_all(problems)


def check_inputs(cfg: RunConfig) -> None:
    """The data files and the output folder alone (`check`'s `inputs`), every problem in one UserError."""
    problems: list[str] = []
    collect = _collector(problems)
    _check_data(cfg, collect)
    _check_output(cfg, collect)
    _raise_all(problems)


def _collector(problems: list[str]) -> Callable[..., Any]:
    """`collect(fn, *args)`: fn's result, or None with its UserError's message added to `problems`."""
    def collect(fn, *args) -> Any:
        try:
            return fn(*args)
        except UserError as e:
            problems.append(str(e))
        return None

    return collect


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _storage_and_dtype(cfg: RunConfig) -> tuple[Optional[Any], Any]:
    from .model import base_folder, prequantized_storage, run_compute_dtype

    path = base_folder(cfg)
    storage = prequantized_storage(cfg, path)
    return storage, (run_compute_dtype(cfg, path)[0] if storage is not None else None)


def _check_model(cfg: RunConfig, launch: dict[str, Any], collect) -> None:
    from .model import base_folder, run_compute_dtype

    path = collect(base_folder, cfg)
    if path is None:
        return
    resolved = collect(run_compute_dtype, cfg, path)
    if resolved is not None and launch.get("mixed_precision") is not None:
        collect(dist.launcher_precision, cfg.model.dtype, *resolved, launch["mixed_precision"])


def _check_data(cfg: RunConfig, collect) -> None:
    import datasets

    from .data import check_fields, detect_format, read_records

    d = cfg.data
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a check, not the run: no "Generating train split" bars
    try:
        for name in [d.train_file] + ([d.validation_file] if d.validation_file else []):
            records = collect(read_records, name)
            fmt = collect(detect_format, list(records.column_names), d, name) if records is not None else None
            if fmt is not None:
                collect(check_fields, records, fmt, d, name)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _check_output(cfg: RunConfig, collect) -> None:
    from .checkpoint import prepare_output_dir

    out = cfg.train.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        collect(_raise, f"train.output_dir={out!r} is a file; give a folder (it is created if missing)")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        collect(_raise, f"train.output_dir={out!r} cannot be created: {parent} is not a writable folder")
        return
    if os.path.isdir(out) and not os.access(out, os.W_OK):
        collect(_raise, f"train.output_dir={out!r} is not writable; choose another folder")
        return
    collect(prepare_output_dir, cfg, out)


def _raise(message: str) -> None:
    raise UserError(message)
