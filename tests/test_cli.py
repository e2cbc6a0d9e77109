"""`scalora train / merge / generate` through the real CLI, in subprocesses, on the embedded default."""

import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import scalora
from scalora.core import quant

from helpers import FAST, run
from tolerance import assert_rounding_close, logits_rtol

pytestmark = pytest.mark.slow  # each test runs the real CLI in subprocesses


SECRETS = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_SeCrEtToKeN1234"}


@pytest.fixture(scope="module")
def trained(env):
    """A 6-step run of configs/tiny.yaml logging to W&B (offline), with a W&B key and a hub token in its environment
    (test_secrets_never_reach_files_or_logs)."""
    out = env["root"] / "a"
    p = run({**env, "env": dict(env["env"], **SECRETS)}, "train", "configs/tiny.yaml", *FAST,
            f"train.output_dir={out}", "log.report_to=wandb", "log.wandb_mode=offline")
    return out, p


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_train_writes_everything(trained):
    out, p = trained
    assert "validation exact match" in p.stdout and "step 6/6" in p.stdout
    for name in ("final/adapter_config.json", "final/adapter_model.safetensors", "summary.json", "loss.png",
                 "metrics.jsonl", "config.yaml", "checkpoints/step-000003/trainer_state.json",
                 "checkpoints/step-000006/adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    assert all(k in metrics[1] for k in ("train/lr", "train/tokens_per_s", "train/grad_norm"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_eval"]["eval/loss"] < summary["first_eval"]["eval/loss"]
    # tokens/s measure training alone: the windows' seconds (tokens / tokens_per_s) add up to the summary's training
    # seconds, with the validation and checkpoint of step 3 left out of step 4's window: counted in, that window
    # would be at least their seconds plus a step's; left out, it is one step (0.11-0.17 s here, 1.18 s once in a
    # loaded moment of a full suite, against 1.5 s of validating 300 examples and 0.2 s of checkpoint)
    train_rows = [m for m in metrics if "train/loss" in m]
    window = [(m["train/tokens"] - prev) / m["train/tokens_per_s"]
              for m, prev in zip(train_rows, [0] + [m["train/tokens"] for m in train_rows])]
    assert abs(sum(window) - summary["train_seconds"]) <= 0.05 * summary["train_seconds"] + 0.05, (window, summary)
    assert window[3] < summary["validation_seconds"] + summary["checkpoint_seconds"], (window, summary)
    assert f"{summary['train_seconds']:.1f} s of training" in p.stdout
    # generation samples: the first 3 validation questions at every validation, in the log before and after
    from scalora.data import _builtin_file

    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    first = [json.loads(line)["input"] for line in open(_builtin_file("validation"))][:3]
    assert [(s["step"], s["question"]) for s in samples] == [(step, q) for step in (0, 3, 6) for q in first]
    em = {m["step"]: m["eval/exact_match"] for m in metrics if "eval/exact_match" in m}
    for s in samples:  # a sample's answer agrees with the score (exact match over 4 answers, 3 of them shown)
        assert em[s["step"]] > 0 if s["generated"] == s["reference"] else em[s["step"]] < 1, s
    shown = [line for line in p.stdout.splitlines() if line.startswith("  sample: ")]
    assert len(shown) == 6 and all(repr(q) in line for q, line in zip(first * 2, shown))
    # no frozen base weights in a checkpoint: every tensor in it is the adapter's or its optimizer state's
    ckpt = out / "checkpoints/step-000006"
    tensors = {**load_file(ckpt / "adapter/adapter_model.safetensors"), **load_file(ckpt / "optimizer.safetensors")}
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:5]
    assert sum(t.numel() for t in tensors.values() if t.dim()) == 3 * summary["trainable_params"]  # + 2 moments


def test_secrets_never_reach_files_or_logs(trained):
    out, p = trained
    blobs = [p.stdout, p.stderr]
    for d, _, names in os.walk(out):
        blobs += [open(os.path.join(d, n), "rb").read().decode("latin-1") for n in names]
    assert len(blobs) > 10
    for value in SECRETS.values():
        assert not any(value in b for b in blobs)


def test_wandb_offline_run_folder_holds_the_metrics(trained):
    out, _ = trained
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    assert b"train/loss" in blob and b"eval/exact_match" in blob


def test_adapter_loads_in_peft_with_the_same_logits(trained, env):
    out, _ = trained
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = scalora.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), str(out / "final"))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), str(out / "final"))
    base = AutoModelForCausalLM.from_pretrained(env["base"])
    assert_rounding_close(_logits(ours, ids), _logits(theirs, ids), logits_rtol(base), wrong=_logits(base, ids),
                          what="logits (wrong: the base alone)")


def _as_trained(env, adapter):
    """The trained model, built here with peft: the base in 4-bit NF4 as configs/tiny.yaml loads it, + the adapter."""
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(env["base"], quantization_config=q, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter))
    quant.keep_4bit_weights_plain(model)  # bitsandbytes' plain 4-bit path (tests/test_cpu_paths.py)
    return model


def test_merge_gives_the_trained_model(trained, env):
    """`scalora merge` merges into the base as the run trained it (4-bit, de-quantized): the merged fp32 model's
    logits are the trained model's; --full-precision merges into the original fp32 weights instead."""
    out, _ = trained
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    merged_dir = env["root"] / "merged"
    run(env, "merge", str(out / "final"), "--out", str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any(isinstance(m, scalora.LoraLayer) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    # (W + s B A) x against W x + s B (A x): the same sums in another order; a merge without the scale (B A added
    # once) lies far outside
    as_trained = _as_trained(env, out / "final")
    rtol = logits_rtol(merged)
    with as_trained.disable_adapter():
        bare = _logits(as_trained, ids)
    adapted = _logits(as_trained, ids)
    scaling = as_trained.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    unscaled = bare + (adapted - bare) / scaling  # to first order: what a merge of B A without the scale gives
    assert_rounding_close(_logits(merged, ids), adapted, rtol, wrong=unscaled, what="merged as trained")
    full_dir = env["root"] / "merged-full"
    run(env, "merge", str(out / "final"), "--out", str(full_dir), "--full-precision")
    ref = scalora.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), str(out / "final"))
    full = _logits(AutoModelForCausalLM.from_pretrained(full_dir), ids)
    # the two paths do differ: the 4-bit merge is far outside the full-precision one's tolerance
    assert_rounding_close(full, _logits(ref, ids), rtol, wrong=_logits(merged, ids), what="merged in full precision")


def test_generate(trained, env):
    """`scalora generate` prints what greedy decoding with the trained model (4-bit base + adapter) gives,
    computed here in-process with peft."""
    from transformers import AutoTokenizer

    out, _ = trained
    prompt = "the band played"
    p = run(env, "generate", str(out / "final"), "--prompt", prompt, "--max-new-tokens", "6")
    assert "base loaded as trained (4-bit base" in p.stderr
    tok = AutoTokenizer.from_pretrained(env["base"])
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = _as_trained(env, out / "final").eval().generate(**ids, max_new_tokens=6, do_sample=False,
                                                             pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected and p.stdout.strip().splitlines()[-1] == expected


def test_resume_continues_exactly(trained, env):
    """3 steps, stop, then resume to 6: the same adapter as the uninterrupted 6-step run (one process, fp32)."""
    out_a, _ = trained
    out_b = env["root"] / "b"
    args = ["train", "configs/tiny.yaml", *FAST, f"train.output_dir={out_b}", "log.report_to=none"]
    run(env, *[a if a != "train.max_steps=6" else "train.max_steps=3" for a in args])
    p = run(env, *args)
    assert "resuming from" in p.stdout and "step-000003" in p.stdout
    a = load_file(out_a / "final/adapter_model.safetensors")
    b = load_file(out_b / "final/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in open(out_b / "metrics.jsonl") if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_report_to_none_never_imports_wandb(env):
    out = env["root"] / "c"
    code = ("import sys; from scalora.config import load_config; from scalora.train import train; "
            f"train(load_config('configs/tiny.yaml', ['train.max_steps=2', 'data.max_eval_generate=0', "
            "'data.max_eval_examples=16', "
            f"'train.output_dir={out}', 'log.report_to=none'])); "
            "assert 'wandb' not in sys.modules, 'wandb imported'; print('NO_WANDB')")
    p = subprocess.run([sys.executable, "-c", code], env=env["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "NO_WANDB" in p.stdout, p.stderr[-2000:]


def test_cli_errors_are_clear(env, tmp_path):
    """A bad key through the real process: status 2 and the suggestion. The rest in this process (the entry point
    the command calls; test_the_command_ends_as_a_normal_exit_would shows statuses come through the process)."""
    import contextlib
    import io

    from scalora import cli

    p = run(env, "train", "configs/tiny.yaml", "train.lrr=1", check=False)
    assert p.returncode == 2 and "did you mean 'lr'" in p.stderr

    def here(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(list(args))
            except SystemExit as e:  # argparse's --help
                status = e.code
        return status, out.getvalue(), err.getvalue()

    status, _, err = here("train", "configs/tiny.yaml", "model.name_or_path=/nonexistent/model",
                          f"train.output_dir={tmp_path / 'x'}")
    assert status == 2 and "could not be loaded" in err
    status, out, _ = here("--help")
    assert status == 0 and all(c in out for c in ("train", "merge", "generate"))
    status, out, _ = here("train", "--help")
    assert status == 0 and "train.lr=1e-4" in out and "global_batch_size" in out


def test_the_command_ends_as_a_normal_exit_would(env, tmp_path):
    """`scalora` ends with os._exit (scalora/cli.py's run: the interpreter's teardown cost ~0.8 s a process), after
    what a normal exit does first: threads that are not daemons finish, atexit handlers run, buffered output is
    written, and the code comes through. A bare os._exit loses all three; joining the threads without threading's
    own exit calls first waits forever on an idle executor's worker (found with torch.compile's workers)."""
    code = f"""
import atexit, sys, threading, time
from scalora.cli import run
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").close())
def late():
    time.sleep(0.5)
    open({str(tmp_path / "thread")!r}, "w").close()
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # kept, with an idle worker (torch.compile keeps such pools): it stops when told
pool.submit(int).result()
sys.stdout.write("BUFFERED")  # no newline: still in the pipe's buffer
run(sys.argv[1:])
"""
    e = {k: v for k, v in env["env"].items() if k != "PYTHONUNBUFFERED"}  # a pipe's stdout: block-buffered
    p = subprocess.run([sys.executable, "-c", code, "launch-file", "ddp"], env=e, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("BUFFERED") and p.stdout.strip().endswith("launch/ddp.yaml")
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    p = subprocess.run([sys.executable, "-c", code, "launch-file", "no-such-topology"], env=e, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "no-such-topology" in p.stderr, (p.returncode, p.stderr[-2000:])
