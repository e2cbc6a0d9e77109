"""The memory allocator scalora's commands run with: TBB's scalable allocator (tbbmalloc) where it is installed.

glibc's malloc keeps the blocks a training step frees in its heap, fragmented by the step's mix of tensor sizes, and
a CPU run pays for that in resident memory and in time. Measured side by side on an Intel Xeon with AMX
(amx_bf16 avx512_bf16, 2 cores; BENCHMARKS.md section 12): SmolLM2-135M's 30-step QLoRA job in bf16, 313 against 260
tokens/s (1.20x) at 1.10 against 1.25 GiB peak; the 30m benchmark model, 1.12x the tokens/s at 0.84x (padded) and
0.69x (packed) the peak. Other CPU kinds: not measured.

The allocator must be in place before the process's first allocation, so it cannot be switched on from inside a
running interpreter: the `scalora` command (and `python -m scalora`) starts itself again, once, before it imports
anything else, with tbbmalloc's libraries in LD_PRELOAD, as torch's own CPU launcher does for jemalloc and tcmalloc
(`python -m torch.backends.xeon.run_cpu`). Processes it starts (`accelerate launch`'s workers) inherit it.
`SCALORA_MALLOC=system` keeps the C library's malloc. This module imports nothing but the standard library: it runs
before torch is loaded.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Mapping, Optional

ENV = "SCALORA_MALLOC"  # "tbb" (the default) or "system"
_STARTED = "SCALORA_MALLOC_STARTED"  # set in the started-again process: it never starts itself a third time
LIBS = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the proxy needs the first, found by its soname once loaded


def wanted(env: Mapping[str, str] = os.environ) -> str:
    """The allocator `env` asks for: "tbb" (the default) or "system"; any other SCALORA_MALLOC is refused."""
    value = env.get(ENV, "tbb").strip().lower() or "tbb"
    if value not in ("tbb", "system"):
        raise SystemExit(f"scalora: error: {ENV}={env[ENV]!r}: use 'tbb' (TBB's scalable allocator, the "
                         "default) or 'system' (the C library's malloc)")
    return value


def tbb_libraries() -> Optional[list[str]]:
    """Paths of tbbmalloc's two libraries as the `tbb` wheel installs them (the environment's lib folder), or None
    where they are not installed (not Linux on x86-64, or the package left out)."""
    if not sys.platform.startswith("linux"):
        return None
    for folder in dict.fromkeys((os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"))):
        paths = [os.path.join(folder, name) for name in LIBS]
        if all(os.path.exists(p) for p in paths):
            return paths
    return None


@functools.cache
def active() -> str:
    """The allocator this process runs with: "tbbmalloc" if its proxy is loaded, else "system" (read once: the
    allocator cannot change in a running process)."""
    try:
        with open("/proc/self/maps") as f:
            return "tbbmalloc" if any(LIBS[1] in line for line in f) else "system"
    except OSError:
        return "system"


def release_cached() -> None:
    """Hand the memory the allocator keeps cached for reuse back to the OS: tbbmalloc's free lists and its cache of
    large blocks (`scalable_allocation_command(TBBMALLOC_CLEAN_ALL_BUFFERS)`), or glibc's free blocks (`malloc_trim`)
    where the process runs with the C library's malloc.

    Training calls it under tbbmalloc after each padded micro-batch (scalora/train.py train_step). Measured side by
    side on an Intel Xeon with AMX (amx_bf16 avx512_bf16, 2 cores; BENCHMARKS.md section 12): SmolLM2-135M's bf16
    job (padded micro-batches of 8) peak 1.06 -> 0.92 GiB at the same tokens/s (each call 1-5 ms); the 30m
    benchmark model padded 0.95 -> 0.85 GiB at the same speed, packed 0.96 -> 0.85 GiB but 0.86x the speed (its rows
    are nearly one shape, so the cache is reused: not released there); once per optimizer step instead lowered
    nothing at 30m. With glibc the same calls lowered nothing measurable (section 12): training makes them under
    tbbmalloc only (`tbb_active`); a streamed export trims after each layer with either."""
    global _RELEASE
    if _RELEASE is None:
        _RELEASE = _find_release()
    if _RELEASE:
        _RELEASE()


def tbb_active() -> bool:
    """Whether this process runs with tbbmalloc."""
    return active() == "tbbmalloc"


def _find_release():
    import ctypes
    import ctypes.util

    try:
        if tbb_active():
            command = ctypes.CDLL(LIBS[0]).scalable_allocation_command  # the preloaded library: same handle
            command.argtypes, command.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
            return lambda: command(0, None)  # TBBMALLOC_CLEAN_ALL_BUFFERS
        name = ctypes.util.find_library("c")
        trim = ctypes.CDLL(name).malloc_trim if name else None  # glibc only (musl and macOS have none)
        return (lambda: trim(0)) if trim else False
    except (OSError, AttributeError):
        return False


_RELEASE = None


def preload_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with tbbmalloc in LD_PRELOAD when it is wanted and installed (unchanged otherwise)."""
    libs = tbb_libraries() if wanted(env) == "tbb" else None
    if not libs:
        return dict(env)
    current = env.get("LD_PRELOAD", "").split()
    return dict(env, LD_PRELOAD=" ".join(libs + [p for p in current if p not in libs]))


def without_tbb(env: dict[str, str]) -> dict[str, str]:
    """`env` with tbbmalloc's libraries taken out of LD_PRELOAD (other preloads kept)."""
    kept = [p for p in env.get("LD_PRELOAD", "").split() if os.path.basename(p) not in LIBS]
    out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    if kept:
        out["LD_PRELOAD"] = " ".join(kept)
    return out


def start_with_allocator(argv: list[str]) -> None:
    """Start `python -m scalora ARGV` again with the allocator asked for when this process has another: with
    tbbmalloc preloaded when it is wanted and installed, without it under SCALORA_MALLOC=system when an inherited
    LD_PRELOAD brought it in. Returns (doing nothing) otherwise, also where the process cannot be replaced: the
    command then runs with the allocator it has, which its first log line names. Called by the command's entry
    point before any other import; a started-again process never starts itself a third time."""
    want_tbb = wanted() == "tbb"
    if os.environ.get(_STARTED) or not sys.executable or want_tbb == (active() == "tbbmalloc"):
        return
    if want_tbb:
        if not tbb_libraries():
            return
        env = preload_env(dict(os.environ))
    else:
        env = without_tbb(dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "scalora", *argv], dict(env, **{_STARTED: "1"}))
    except OSError:
        return
