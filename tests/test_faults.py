"""Never lose a run: kills at any point, preemption, non-finite losses, full disks, dead ranks, secrets (bad input
before a run is touched: tests/test_errors.py).

Every interrupted run is resumed and compared with one uninterrupted run of the same config: on one process in fp32
the final adapter must be bitwise equal and the metric history the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from scalora import checkpoint

from helpers import DIST, adapter, assert_runs_agree, launch_cmd, losses, run, train_args

pytestmark = pytest.mark.slow  # each test runs the real CLI in subprocesses

def faulty(env, spec, once=None):
    e = dict(env["env"], SCALORA_FAULT_INJECT=spec)
    if once:
        e["SCALORA_FAULT_ONCE"] = str(once)
    return {**env, "env": e}


def history(out):
    """The metric lines minus what depends on the clock."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("train/tokens_per_s", "train/peak_memory_gb")} for r in rows]


def assert_same_run(out, ref):
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert history(out) == history(ref)


@pytest.fixture(scope="module")
def reference(env):
    out = env["root"] / "faults-ref"
    run(env, *train_args(out))
    return out


def test_sigkill_at_steps_and_inside_checkpoint_writes(env, reference):
    """Five kills in one run: at every stage of a checkpoint write, the final one's last stage too; then resume.
    (Kills between optimizer steps are test_sigkill_from_outside_at_random_times'.)"""
    out = env["root"] / "faults-kill"
    points = [("ckpt-adapter", 3), ("ckpt-optimizer", 3), ("ckpt-manifest", 4), ("ckpt-rename", 4),
              ("ckpt-rename", 6)]
    for point, step in points:
        p = run(faulty(env, f"{point}@{step}"), *train_args(out), check=False)
        assert p.returncode == -signal.SIGKILL, (point, step, p.stdout[-2000:], p.stderr[-2000:])
        for _, path in checkpoint.checkpoints(out):  # whatever survived is complete
            assert checkpoint.verify(path) is None
        assert not os.path.exists(out / "final")
    p = run(env, *train_args(out))
    assert "resuming from" in p.stdout
    assert_same_run(out, reference)


def test_sigkill_from_outside_at_random_times(env, reference):
    """Killed twice from outside at a random moment after a random early step (the run must still be going: a kill
    that lands after the run ended would test nothing), then resumed."""
    out = env["root"] / "faults-kill-ext"
    rng = random.Random(1)
    for _ in range(2):
        proc = env["zygote"].spawn(train_args(out), env["env"])
        after = rng.randint(1, 2)
        last, step_s = None, 0.05
        # wait until training reaches that step (a resumed run may start past it), then kill at a random moment
        for line in proc.stdout_lines():
            now = time.monotonic()
            if re.match(r"step \d+/6", line):
                step_s, last = (now - last if last is not None else step_s), now
                if int(line.split()[1].split("/")[0]) >= after:
                    break
        time.sleep(rng.uniform(0, step_s))  # within the next step, however fast this machine runs them
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (out / "final").exists(), "the run ended before the kill"
    run(env, *train_args(out))
    assert_same_run(out, reference)


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(env, reference):
    out = env["root"] / "faults-term"
    proc = env["zygote"].spawn(train_args(out, "train.save_every=0"), env["env"])
    for line in proc.stdout_lines():
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.wait(timeout=300)
    rest, err = proc.output()
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received: checkpoint" in rest
    saved = checkpoint.checkpoints(out)
    assert len(saved) == 1 and 2 <= saved[0][0] < 6
    run(env, *train_args(out, "train.save_every=0"))
    assert_same_run(out, reference)


def test_nonfinite_loss_stops_without_writing(env):
    out = env["root"] / "faults-nan"
    p = run(faulty(env, "nan@4"), *train_args(out), check=False)
    assert p.returncode == 3 and "step 4" in p.stderr and "non-finite" in p.stderr
    assert [s for s, _ in checkpoint.checkpoints(out)] == [2, 3]  # nothing after the last good step
    assert not os.path.exists(out / "final")
    out2 = env["root"] / "faults-nan-skip"
    p = run(faulty(env, "nan@4"), *train_args(out2, "train.on_nonfinite=skip"))
    assert "step 4: non-finite gradient norm, optimizer step skipped" in p.stdout
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in adapter(out2).values())


def test_full_disk_keeps_the_previous_checkpoint(env):
    out = env["root"] / "faults-disk"
    p = run(faulty(env, "enospc@3"), *train_args(out), check=False)
    assert p.returncode == 2 and "disk is full" in p.stderr and "previous checkpoint is intact" in p.stderr
    assert [s for s, _ in checkpoint.checkpoints(out)] == [1, 2]
    assert checkpoint.verify(str(out / "checkpoints/step-000002")) is None
    assert not any(n.endswith(".tmp") for n in os.listdir(out / "checkpoints"))


def test_damaged_checkpoint_is_skipped(env, reference, tmp_path):
    """A checkpoint whose file no longer matches its checksum is passed over for the one before it."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints/step-000006/optimizer.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        assert checkpoint.latest(str(out)).endswith("step-000005")


def test_a_dead_rank_is_restarted_and_the_job_resumes(env, dist_reference, tmp_path):
    """Rank 1 is killed after step 4 of a 2-process run (before step 4's checkpoint); torchrun (--max_restarts 1,
    c10d rendezvous) restarts both processes, which resume from step 3's checkpoint and end with the uninterrupted
    one-process run's adapter and losses (tests/test_dist.py shows 2 processes give that run). Without
    dist.init_restarted_process_group this failed about one run in two: the restarted ranks could read the dead
    attempt's gloo addresses from torchrun's shared store."""
    out = tmp_path / "restarted"
    args = ["configs/tiny.yaml", *DIST, "train.save_every=1"]
    marker = tmp_path / "fired"
    cmd = launch_cmd("launch/ddp.yaml", *args, f"train.output_dir={out}",
                     extra=("--max_restarts", "1", "--monitor_interval", "1", "--rdzv_backend", "c10d"))
    t0 = time.time()
    p = subprocess.run(cmd, env=faulty(env, "step@4@1", once=marker)["env"], capture_output=True, text=True,
                       timeout=300)  # without the fix, one run in four hung here
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert marker.exists() and "resuming from" in p.stdout and "step-000003" in p.stdout
    assert time.time() - t0 < 300
    assert_runs_agree(env, out, dist_reference)


def test_a_dead_rank_without_restarts_fails_promptly(env):
    out = env["root"] / "faults-rank-norestart"
    cmd = launch_cmd("launch/ddp.yaml", "configs/tiny.yaml", *DIST, "train.save_every=1", f"train.output_dir={out}")
    t0 = time.time()
    p = subprocess.run(cmd, env=faulty(env, "step@3@1")["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert time.time() - t0 < 180  # no hang: gloo sees the peer gone, torchrun stops the others
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", p.stderr), p.stderr[-3000:]
    assert [s for s, _ in checkpoint.checkpoints(out)][-1] >= 2


def test_unreachable_wandb_trains_on_offline_with_one_warning(env):
    """An unreachable W&B server: one warning, the run logged to W&B offline (a folder `wandb sync` uploads), at once
    rather than after W&B's own retries (~15 s), and training as without W&B."""
    out = env["root"] / "faults-wandb"
    e = {**env, "env": dict(env["env"], WANDB_API_KEY="local-" + "0" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
                            WANDB_INIT_TIMEOUT="4")}  # nothing listens on port 9: refused at once
    p = run(e, *train_args(out, "train.max_steps=2", "log.report_to=wandb", "log.wandb_mode=online"), timeout=300)
    assert p.stderr.count("UserWarning: the W&B server cannot be reached (127.0.0.1:9: ") == 1, p.stderr[-2000:]
    assert "could not start" not in p.stderr  # not W&B's own failure after its retries
    assert len(losses(out)) == 2 and (out / "final/adapter_model.safetensors").exists()
    assert list((out / "wandb").glob("offline-run-*"))  # the W&B run kept, for `wandb sync`
