"""Everything that knows about processes and ranks: threads, the Accelerator, printing on rank 0."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .core.errors import UserError


LAUNCH_DIR = Path(__file__).parent / "launch"  # the shipped accelerate launch files


def shipped_launch_files() -> list[str]:
    return sorted(p.stem for p in LAUNCH_DIR.glob("*.yaml"))


def launch_file(name_or_path: str) -> str:
    """A launch file's path: a file that exists, or the name of a shipped one (`fsdp`, `zero3`, ...)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = LAUNCH_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if shipped.is_file() and os.sep not in name_or_path.removeprefix("launch/"):
        return str(shipped)
    raise UserError(f"launch file {name_or_path!r} does not exist; give the path of an accelerate launch file or "
                     f"the name of a shipped one: {', '.join(shipped_launch_files())}")


def configure_threads(requested: int = 0) -> int:
    """Threads per process from the cores and the processes on this node (oversubscription costs ~10x)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = requested or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def make_accelerator(global_batch: int, micro_batch: int, mixed_precision: str, log_with: Any, project_dir: str):
    """An Accelerator whose gradient accumulation keeps the global batch the same for any number of processes.

    The topology comes from `accelerate launch` (its environment); on GPUs accelerate takes it as is. On CPU-only
    machines accelerate needs help, measured with accelerate 1.15: `cpu=True` is required for multi-process data
    parallel (otherwise every process runs alone), but it also disables DeepSpeed and FSDP. So: DeepSpeed runs with
    `cpu=False` on a gloo process group (DeepSpeed's CPU accelerator), and FSDP starts as multi-CPU and is then
    switched on from the same FSDP_* environment accelerate would read on GPUs.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    init_restarted_process_group()
    accum = accumulation_steps(global_batch, micro_batch, world_size())
    kwargs: dict[str, Any] = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=accum,
                                  log_with=log_with, project_config=ProjectConfiguration(project_dir=project_dir))
    if torch.cuda.is_available():
        return Accelerator(**kwargs)
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        skip_inference_shm_op()
        return Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    accelerator = Accelerator(cpu=True, **kwargs)
    if _env_flag("ACCELERATE_USE_FSDP"):
        _fsdp_on_cpu()
    return accelerator


SHM_OP = "deepspeed_shm_comm"


def skip_inference_shm_op() -> bool:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op (`deepspeed_shm_comm`, C++ built by
    ninja when the backend starts), which serves `inference_all_reduce` only (tensor-parallel inference): ZeRO's
    training collectives go through torch.distributed. The build took 33-54 s per new virtual environment on the
    AVX2 kind (ninja's log; it builds again whenever the include paths change: every fresh clone). Marked
    incompatible in DeepSpeed's table of ops, which its backend reads before building (`build_shm_op`); returns
    whether it was, False where this DeepSpeed has no such table or op (left as it is)."""
    try:
        import deepspeed.ops

        ops = deepspeed.ops.__compatible_ops__
    except Exception:  # another DeepSpeed's layout: its backend then does what it does
        return False
    if not isinstance(ops, dict) or SHM_OP not in ops:
        return False
    ops[SHM_OP] = False
    return True


def init_restarted_process_group() -> bool:
    """Join the process group of a job torchrun has restarted, in a namespace of its own; True if it did.

    torchrun's c10d rendezvous shares its agent's TCPStore with the workers and, measured with torch 2.13, gives the
    workers of every restart the same keys as the first attempt: a restarted rank can read a dead peer's gloo/NCCL
    address and fail with "Connection refused" (pytorch/pytorch#135712; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on the
    launcher avoids it too). So from the first restart on, scalora opens the group itself on the same store under
    the prefix `scalora/restart-<n>`; accelerate then finds it initialized and uses it.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    import torch.distributed as tdist
    from torch.distributed.constants import default_pg_timeout as timeout

    if tdist.is_initialized():
        return False
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False,
                           timeout=timeout)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend, store=tdist.PrefixStore(f"scalora/restart-{restart}", store),
                             rank=int(os.environ["RANK"]), world_size=world_size(), timeout=timeout)
    return True


def _fsdp_on_cpu() -> None:
    """Switch a multi-CPU accelerator to FSDP, as accelerate does for GPUs from the same FSDP_* environment.

    Needed with accelerate 1.15: its AcceleratorState turns ACCELERATE_USE_FSDP into DistributedType.FSDP only for
    GPU-like device types, never for MULTI_CPU, and has no option for it. Both states are shared (Borg) objects with
    a copy each of distributed_type, so the public attributes are set on an instance of each. tests/test_dist.py::test_fsdp_on_cpu_needs_the_switch
    fails once accelerate does this itself: then delete this function.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":  # as accelerate does for GPUs: FSDP's own policy casts parameters and inputs
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimizer step on each process, so that every step sees `global_batch` examples. A launcher
    setting (`accelerate launch --gradient_accumulation_steps`) that disagrees is refused, not obeyed in silence."""
    if global_batch % (micro_batch * world):
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                         f"{micro_batch} x {world} processes: change one of them so that it divides")
    accum = global_batch // (micro_batch * world)
    asked = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS") or _launcher_option("--gradient_accumulation_steps")
    if asked not in (None, "", "auto") and asked != str(accum):
        raise UserError(f"the launcher sets gradient_accumulation_steps={asked}, but scalora takes {accum} from "
                         f"train.global_batch_size={global_batch} / (train.micro_batch_size={micro_batch} x {world} "
                         "processes): drop --gradient_accumulation_steps (or the launch file's gradient_accumulation_"
                         "steps) and set train.global_batch_size or train.micro_batch_size instead")
    return accum


def _launcher_option(option: str) -> Optional[str]:
    """The value of `option` on the command line of the `accelerate launch` that started this process (its parent
    process; Linux). accelerate passes --gradient_accumulation_steps on to the processes only under DeepSpeed and
    drops it otherwise, so this is the one place scalora can see that it was asked for."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") or a == "accelerate.commands.launch" for a in argv) or "launch" not in \
            " ".join(argv):
        return None
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def launcher_processes_problem() -> Optional[str]:
    """Why this process is alone where its launcher was asked for several (None where it is not): `accelerate
    launch --num_processes N` without a launch file that sets N processes up, or --multi_gpu, runs its simple
    launcher, one process, and says nothing (accelerate 1.15; with --cpu even --multi_gpu does)."""
    asked = _launcher_option("--num_processes")
    if asked is None or not asked.isdigit() or int(asked) <= 1 or world_size() > 1:
        return None
    return (f"accelerate launch was asked for --num_processes {asked} but started one process (it starts several "
            "only from a launch file that sets them up, or with --multi_gpu and without --cpu): launch with "
            "--config_file $(scalora launch-file ddp) (or zero2, zero3, fsdp), or run `scalora train CONFIG "
            f"dist.launch_config=ddp dist.num_processes={asked}`")


_MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def launcher_precision(model_dtype: str, dtype: torch.dtype, why: str, asked: Optional[str] = None
                       ) -> tuple[torch.dtype, str]:
    """The compute dtype after accelerate's mixed_precision from the launcher (`--mixed_precision`, a launch file's
    `mixed_precision`; `asked`, else the environment the launcher set). 'no' is accelerate's default and says
    nothing; bf16 / fp16 are taken where model.dtype is auto and refused where model.dtype names another dtype."""
    asked = str(asked if asked is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if asked in ("no", ""):
        return dtype, why
    if asked not in _MIXED:
        raise UserError(f"the launcher asks for mixed_precision={asked}: scalora computes in bf16, fp16 or fp32; "
                         "launch with --mixed_precision bf16, fp16 or no, or set model.dtype")
    if model_dtype == "auto":
        return _MIXED[asked], f"auto: the launcher's mixed_precision={asked}"
    if _MIXED[asked] != dtype:
        raise UserError(f"the launcher asks for mixed_precision={asked}, but model.dtype={model_dtype}: set "
                         f"model.dtype={str(_MIXED[asked]).removeprefix('torch.')} (or auto, to take the launcher's), "
                         "or launch with mixed_precision 'no'")
    return dtype, why


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's mixed_precision for a compute dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def device_map(accelerator) -> Any:
    """Where transformers puts the base: this process's device, except under ZeRO-3, where transformers refuses a
    device_map (DeepSpeed places the partitions itself)."""
    return None if topology(accelerator) == "zero3" else {"": accelerator.device}


def layer_sharder(accelerator, cfg, dtype: torch.dtype) -> Optional[Callable[[torch.nn.Module], None]]:
    """How low-memory loading shards a decoder layer as soon as it is filled (scalora/loading.py), with the settings
    accelerate and DeepSpeed use when they shard the whole model later; None where the base loads whole: one
    process, DDP, ZeRO-1/2, `dist.low_memory_loading=false`, or an FSDP wrap policy other than per decoder layer."""
    kind = topology(accelerator)
    if not cfg.dist.low_memory_loading or kind not in ("zero3", "fsdp"):
        return None
    if kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = accelerator.state.fsdp_plugin
        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        if plugin.fsdp_version != 2 or policy not in (transformer_auto_wrap_policy, "transformer_based_wrap"):
            return None
        kwargs: dict[str, Any] = dict(reshard_after_forward=plugin.reshard_after_forward,
                                      offload_policy=plugin.cpu_offload,
                                      mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None:
            kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]

        def shard(layer: torch.nn.Module) -> None:
            fully_shard(layer, **kwargs)
            # fully_shard renames the layer's class (FSDPLlamaDecoderLayer); accelerate looks the layer class up
            # by name when it wraps the rest, and skips what is sharded already
            plugin.transformer_cls_names_to_wrap = [type(layer).__name__]

        return shard

    import deepspeed

    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    offload = zero.get("offload_param") or {}
    remote = offload.get("device") if offload.get("device") not in (None, "none") else None
    # as DeepSpeed's engine converts the parameters it finds unpartitioned (parameter_offload.py); the parts it
    # converts later (embeddings, head) take these settings from the first partitioned parameter.
    init = dict(dtype=dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32, remote_device=remote,
                pin_memory=bool(offload.get("pin_memory", False)))
    return lambda layer: deepspeed.zero.Init(module=layer, **init)


def _status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (VmHWM, VmRSS), in bytes; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split(f"{field}:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return None


def peak_memory_bytes() -> int:
    """Peak memory of this process since it started or since the last `reset_peak_memory` (GPU: allocated by torch;
    CPU: resident set, Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peak


def resident_memory_bytes() -> int:
    """Memory this process holds now (GPU: allocated by torch; CPU: resident set, Linux; 0 where unknown)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return _status_bytes("VmRSS") or 0


def reset_peak_memory() -> int:
    """Start a new peak (training's, after the model has loaded); returns the peak until now."""
    before = peak_memory_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the resident-set high-water mark (Linux >= 4.0)
        except OSError:
            pass
    return before


def topology(accelerator) -> str:
    """A short name of what accelerate set up: single, ddp, zero2, zero3, fsdp (for messages and summaries)."""
    from accelerate.utils import DistributedType

    t = accelerator.distributed_type
    if t == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if t == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_topology(accelerator, cfg, storage: Optional[torch.dtype] = None,
                   dtype: Optional[torch.dtype] = None) -> None:
    """Refuse, before any model is loaded, combinations that fail deep inside DeepSpeed or FSDP later."""
    kind = topology(accelerator)
    problems = topology_problems(kind, cfg, storage, dtype)
    if problems:
        raise UserError(f"this run cannot work under {kind} ({accelerator.num_processes} processes):\n  - "
                        + "\n  - ".join(problems))


def topology_problems(kind: str, cfg, storage: Optional[torch.dtype] = None,
                      dtype: Optional[torch.dtype] = None) -> list[str]:
    """What in the run config cannot work under `kind` (single, ddp, zero2, zero3, fsdp), each with the fix.
    `storage`: the dtype of the packed weights of a checkpoint saved already quantized (None: quantized while
    loading); `dtype`: the run's compute dtype (None: not known yet)."""
    problems = []
    if kind in ("zero3", "fsdp") and storage is not None and dtype is not None and storage != dtype:
        # Measured (bench/loading.py, CPU): ZeRO-3's bf16 engine and FSDP's mixed-precision policy cast every
        # parameter they shard to the compute dtype, packed 4-bit bytes included; an fp32-stored checkpoint run in
        # bf16 comes back at half its size ("shape [1024, 512] is invalid for input of size 262144").
        fix = (f"set model.dtype={str(storage).removeprefix('torch.')}, or " if storage.is_floating_point else "")
        problems.append(f"model.name_or_path={cfg.model.name_or_path!r} was saved already quantized with its packed "
                        f"weights stored as {storage}, and {kind} would cast them to the run's compute dtype "
                        f"{dtype}, corrupting them: {fix}load the checkpoint saved before quantization (scalora then "
                        "stores the packed weights in the compute dtype)")
    sharded = kind in ("zero2", "zero3", "fsdp")
    if cfg.model.compile and kind in ("zero3", "fsdp"):
        problems.append(f"model.compile=true under {kind}: compiled layers with sharded parameters are not tested in "
                        "scalora yet; set model.compile=false, or use launch/ddp.yaml / launch/zero2.yaml")
    if cfg.model.keep_base_outputs and kind in ("zero3", "fsdp"):
        # the kept outputs' backward reads the base weight outside the layer's forward, where the engine has it
        # sharded (not built for that)
        problems.append(f"model.keep_base_outputs=true under {kind}: the base weights are sharded there; drop it, or "
                        "use launch/ddp.yaml / launch/zero2.yaml")
    if sharded and cfg.train.optimizer != "adamw":
        problems.append(f"train.optimizer={cfg.train.optimizer} keeps block-wise 8-bit state that {kind} cannot "
                        "shard: use train.optimizer=adamw (sharding already divides the optimizer memory)")
    if kind in ("zero3", "fsdp") and cfg.quant.bits == 8:
        problems.append(f"quant.bits=8: LLM.int8 weights cannot be sharded by {kind}: use quant.bits=4 (QLoRA), or "
                        "launch/ddp.yaml / launch/zero2.yaml, which keep the base whole on every process")
    if kind in ("zero3", "fsdp") and cfg.quant.bits == 4 and cfg.quant.storage_dtype == "uint8":
        problems.append(f"quant.storage_dtype=uint8: {kind} shards parameters of one dtype; leave "
                        "quant.storage_dtype=auto so the packed 4-bit weights are stored in the compute dtype")
    if kind.startswith("zero") and cfg.train.on_nonfinite == "skip":
        problems.append("train.on_nonfinite=skip: DeepSpeed steps the optimizer inside backward, so a step cannot "
                        "be skipped; use train.on_nonfinite=stop (the run resumes from its last checkpoint)")
    return problems


def _deepspeed_values(cfg, accum: int, world: int) -> dict[str, tuple[Any, str]]:
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
            "gradient_accumulation_steps": (accum, "train.global_batch_size (or train.micro_batch_size)"),
            "train_batch_size": (t.micro_batch_size * accum * world, "train.global_batch_size"),
            "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm")}


def deepspeed_problems(ds: dict[str, Any], cfg, accum: int, world: int, dtype: Optional[torch.dtype]) -> list[str]:
    """What in a DeepSpeed config disagrees with the run config (accelerate would let it override scalora's value,
    silently); dtype None: not known yet."""
    problems = [f"{key}={ds[key]} (scalora's: {mine}; set {key_name} instead)"
                for key, (mine, key_name) in _deepspeed_values(cfg, accum, world).items()
                if ds.get(key, "auto") != "auto" and float(ds[key]) != float(mine)]
    for section, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        enabled = (ds.get(section) or {}).get("enabled", "auto")
        if dtype is not None and enabled != "auto" and bool(enabled) != (dtype == wanted):
            problems.append(f"{section}.enabled={enabled} (scalora computes in {str(dtype).removeprefix('torch.')}; "
                            "set model.dtype instead)")
    if "optimizer" in ds or "scheduler" in ds:
        problems.append("an optimizer or scheduler (scalora builds both from train.optimizer and train.schedule)")
    return problems


def deepspeed_error(problems: list[str]) -> UserError:
    return UserError("the DeepSpeed config disagrees with the run config, which is the one source of truth for batch "
                     "sizes, accumulation, clipping and precision: remove these from the DeepSpeed config and the "
                     "launcher's options (or make them \"auto\"):\n  - " + "\n  - ".join(problems))


def deepspeed_asked(built: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What the user asked DeepSpeed for, to hold against the run config: the JSON the launcher names (a launch
    file's `deepspeed_config_file`) as its author wrote it, else `built` (the config accelerate built from the launch
    file's inline settings and the launcher's options; None: not built yet), with the launcher's --gradient_clipping
    where the JSON leaves clipping out or "auto" (accelerate fills it in there). Not the config accelerate builds
    from a JSON: that one has more in it than the file, `gradient_accumulation_steps: 1` where the file has none
    (accelerate 1.15), which scalora would take for the user's value and refuse."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        asked = dict(built or {})
    else:
        try:
            with open(path) as f:
                asked = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"the launcher's deepspeed_config_file {path!r} could not be read ({e}); the path is "
                            "relative to the folder you launch from") from None
    clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clipping not in ("auto", "none") and asked.get("gradient_clipping", "auto") == "auto":
        asked["gradient_clipping"] = clipping
    return asked


def fill_deepspeed_config(accelerator, cfg, accum: int, dtype: torch.dtype) -> None:
    """Give DeepSpeed's "auto" fields scalora's values (accelerate fills them only from a DataLoader) and refuse a
    DeepSpeed value the user set that disagrees with the run config."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    problems = deepspeed_problems(deepspeed_asked(ds), cfg, accum, accelerator.num_processes, dtype)
    if problems:
        raise deepspeed_error(problems)
    for key, (mine, _) in _deepspeed_values(cfg, accum, accelerator.num_processes).items():
        ds[key] = mine


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask for a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self) -> None:
        import signal

        self.name: Optional[str] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        import signal

        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Whether any rank was signalled (agreed by all ranks, so that all of them save and stop together)."""
        flag = torch.tensor(float(self.name is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        if flag.item() and self.name is None:
            self.name = "SIGTERM"
        return bool(flag.item())
