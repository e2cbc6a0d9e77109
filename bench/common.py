"""What the benchmark scripts share: one measurement per worker process, and the results file."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Callable


def emit_result(result: dict) -> None:
    """A worker's answer to `run_worker`: one line on stdout, with the allocator the worker ran with."""
    from scalora import malloc

    print("RESULT " + json.dumps({**result, "malloc": malloc.active()}), flush=True)


def run_worker(cmd: list[str], env: dict, what: str, cwd=None) -> dict:
    """Run a worker process (a fresh peak memory for each measurement) and return the result it emitted."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{what} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn`, after one call not counted (warm-up)."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def write_results(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {path}")
