"""Everything that knows about processes and ranks: threads, the Accelerator, printing on rank 0."""

from __future__ import annotations

import os
from typing import Any

import torch


def configure_threads(requested: int = 0) -> int:
    """Threads per process from the cores and the processes on this node (oversubscription costs ~10x)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = requested or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(global_batch: int, micro_batch: int, mixed_precision: str, log_with: Any, project_dir: str):
    """An Accelerator whose gradient accumulation keeps the global batch the same for any number of processes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    world = world_size()
    if global_batch % (micro_batch * world):
        raise ValueError(f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                         f"{micro_batch} x {world} processes: change one of them so that it divides")
    accum = global_batch // (micro_batch * world)
    # cpu=True is needed for multi-process CPU runs: without it each process silently runs alone.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       gradient_accumulation_steps=accum, log_with=log_with,
                       project_config=ProjectConfiguration(project_dir=project_dir))


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
