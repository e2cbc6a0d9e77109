"""Running the real CLI in subprocesses: one process, or under `accelerate launch` with a launch/ file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

FAST = ["train.max_steps=6", "train.save_every=3", "train.eval_every=3", "data.max_eval_generate=4",
        "train.schedule=constant", "train.warmup_ratio=0", "train.log_every=1"]
# Several processes: micro-batches of 4 so that 2 processes x 2 accumulation steps make the global batch of 16.
DIST = ["train.micro_batch_size=4", "train.max_steps=6", "train.save_every=3", "train.eval_every=0",
        "data.max_eval_generate=0", "train.schedule=constant", "train.warmup_ratio=0", "train.log_every=1",
        "log.report_to=none"]


def run(env, *args, check=True, timeout=600):
    p = subprocess.run([sys.executable, "-m", "scalora", *args], env=env["env"], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"scalora {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launch_file: str, *args, extra=()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_file,
            "--main_process_port", str(free_port()), *extra, "-m", "scalora", "train", *args]


def launch(env, launch_file: str, *args, check=True, timeout=600):
    p = subprocess.run(launch_cmd(launch_file, *args), env=env["env"], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"accelerate launch {launch_file} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# The fault and bad-input tests' run: 6 steps, a checkpoint after every step, validation loss at step 3.
ARGS = ["train.max_steps=6", "train.save_every=1", "train.save_total_limit=2", "train.eval_every=3",
        "data.max_eval_generate=0", "train.schedule=cosine", "train.warmup_ratio=0.2", "train.log_every=1",
        "log.report_to=none"]


def train_args(out, *extra):
    return ["train", "configs/tiny.yaml", *ARGS, f"train.output_dir={out}", *extra]


def tree_digest(root) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
