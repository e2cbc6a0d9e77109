"""Scale-out on 2 CPU processes over gloo, through the shipped launch/ files and `accelerate launch`.

Every topology trains the builtin model on the same data with the same global batch (16 = 2 processes x 2
micro-batches of 4) as one process (1 x 4 x 4), and must give the same losses and adapter. Dropout masks follow the
data position, so the only differences left are the order of floating-point sums (a gradient all-reduced from two
halves versus summed at once): tests/helpers.py's assert_runs_agree compares the losses and what the adapters do to
the bounds of tests/tolerance.py, with a run short of a step shown to lie far outside.

Each launch costs ~8 s, most of it process start-up, so one run serves every test that can read it: a topology's
run, its sharded optimizer state, its adapter in peft and its chunked-loss path; a run's step-3 checkpoint, resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import scalora
from scalora import checkpoint

from helpers import (DIST, adapted_logits, assert_runs_agree, free_port, launch, launch_cmd, live_memory_env, losses,
                     run, side_by_side)
from tolerance import assert_rounding_close, logits_rtol, loss_rtol

pytestmark = pytest.mark.slow  # each test runs the real CLI in subprocesses

TOPOLOGIES = {"ddp": "launch/ddp.yaml", "zero2": "launch/zero2.yaml", "zero3": "launch/zero3.yaml",
              "fsdp": "launch/fsdp.yaml"}


@pytest.fixture(scope="module")
def reference(dist_reference):
    return dist_reference  # one process, the same global batch (tests/conftest.py)


@pytest.fixture(scope="module")
def distributed_run(env):
    """name -> (run folder, the command's stdout) of a 2-process run of that topology, run once however many tests
    ask. DDP is started the way a user starts one command: `scalora train ... dist.launch_config=launch/ddp.yaml
    dist.num_processes=2` (scalora runs `accelerate launch` with the file itself). FSDP and ZeRO-3 with
    train.chunked_loss=true: FSDP2 keeps the root's head whole through backward, so the chunked path runs there;
    ZeRO-3's released head falls back to whole logits. One run proves each topology and its chunked-loss path
    (whole-logits FSDP: the bf16 and layered-base runs). ZeRO-2 from a DeepSpeed JSON of the user's own that says
    nothing of batch or accumulation (the shipped zero2.yaml: test_the_cli_file_and_shipped_launch_files_work_from_
    anywhere); accelerate puts gradient_accumulation_steps 1 into the config it builds from such a file, and the run
    must still take its 2 from the run config (a run with 1 would not match one process's losses)."""
    done = {}

    def get(name):
        if name not in done:
            out = env["root"] / f"dist-{name}"
            if name == "ddp":
                p = run(env, "train", "configs/tiny.yaml", *DIST, f"train.output_dir={out}",
                        "dist.launch_config=launch/ddp.yaml", "dist.num_processes=2")
            else:
                chunked = ["train.chunked_loss=true"] if name in ("zero3", "fsdp") else []
                # ZeRO-2: a JSON as a DeepSpeed user writes one, the stage and nothing else
                launch_file = TOPOLOGIES[name] if name != "zero2" else \
                    _own_deepspeed_file(env["root"], {"zero_optimization": {"stage": 2}}, "ds-zero2")
                p = launch(env, launch_file, "configs/tiny.yaml", *DIST, *chunked, f"train.output_dir={out}")
            done[name] = out, p.stdout
        return done[name]
    return get


def _own_deepspeed_file(folder, config: dict, name: str = "ds") -> str:
    """A launch file for 2 processes naming a DeepSpeed JSON of the user's own (`config`), both written to
    `folder` as NAME.json and NAME.yaml."""
    ds_json = folder / f"{name}.json"
    ds_json.write_text(json.dumps(config))
    launch_file = folder / f"{name}.yaml"
    launch_file.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds_json}\n"
                           "  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 2\nuse_cpu: false\n")
    return str(launch_file)


@pytest.fixture(params=list(TOPOLOGIES))
def distributed(request, distributed_run):
    return (request.param, *distributed_run(request.param))


def test_same_losses_and_adapter_as_one_process(distributed, reference, env):
    name, out, stdout = distributed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["topology"] == name and "2 process(es)" in stdout
    assert list(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert_runs_agree(env, out, reference)



def test_deepspeed_builds_no_inference_op(distributed_run):
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce op (tensor-parallel inference only) when it
    starts, 33-54 s per new virtual environment; scalora marks it incompatible before the engine starts
    (`dist.skip_inference_shm_op`): the ZeRO runs print no build of it (DeepSpeed prints one when it builds), and
    DeepSpeed's own builder function returns nothing once marked."""
    import importlib

    from scalora import dist

    for name in ("zero2", "zero3"):
        _, stdout = distributed_run(name)
        assert "scalora:" in stdout and dist.SHM_OP not in stdout and "built successfully" not in stdout, name
    assert dist.skip_inference_shm_op()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None

def test_optimizer_state_is_sharded(distributed, reference):
    """ZeRO-2/3 and FSDP: each rank holds 1/2 of the adapter's AdamW state; DDP holds all of it on each rank."""
    name, out, _ = distributed
    summary = json.loads((out / "summary.json").read_text())
    # counted before or after sharding, the adapter's size is the single process's
    assert summary["trainable_params"] == json.loads((reference / "summary.json").read_text())["trainable_params"]
    full = 2 * summary["trainable_params"]  # exp_avg + exp_avg_sq
    per_rank = summary["optimizer_state_elements_per_rank"]
    assert len(per_rank) == 2
    if name == "ddp":
        assert per_rank == [full, full]
    else:
        assert sum(per_rank) == pytest.approx(full, rel=0.01)  # partitions may be padded
        assert all(n <= full / 2 * 1.01 for n in per_rank), per_rank


def test_adapter_loads_in_peft_like_the_single_process_one(distributed, reference, env):
    """peft reads the sharded run's adapter file as scalora does (the two runs' agreement is
    test_same_losses_and_adapter_as_one_process's); the base alone lies far outside."""
    _, out, _ = distributed
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), str(out / "final"))
        logits = theirs.eval()(input_ids=ids).logits
        with theirs.disable_adapter():
            bare = theirs(input_ids=ids).logits
    assert_rounding_close(logits, adapted_logits(env["base"], out / "final", ids), logits_rtol(theirs.get_base_model()),
                          wrong=bare, what="peft against scalora, same file")


def _cut_at_step_3(src, dst):
    """A copy of a finished 6-step run as a kill before step 6's checkpoint leaves it (run folders may be moved):
    step 3's checkpoint the newest, the metric lines of steps 4-6 written, no final adapter or summary."""
    shutil.copytree(src, dst)
    for name in ("final", "summary.json", "loss.png", "checkpoints/step-000006"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [s for s, _ in checkpoint.checkpoints(str(dst))] == [3]


def test_resume_two_processes_to_one(env, reference, distributed_run):
    """FSDP's step-3 checkpoint (sharded optimizer state), resumed by one process: the reference's run."""
    out = env["root"] / "dist-2to1"
    _cut_at_step_3(distributed_run("fsdp")[0], out)
    p = run(env, "train", "configs/tiny.yaml", *DIST, "train.chunked_loss=true", f"train.output_dir={out}")
    assert "1 process(es)" in p.stdout and "resuming from" in p.stdout and "step-000003" in p.stdout
    assert_runs_agree(env, out, reference)


def test_resume_one_process_to_two(env, reference):
    """One process's step-3 checkpoint, resumed under ZeRO-3 by two."""
    out = env["root"] / "dist-1to2"
    _cut_at_step_3(reference, out)
    p = launch(env, TOPOLOGIES["zero3"], "configs/tiny.yaml", *DIST, f"train.output_dir={out}")
    assert "2 process(es)" in p.stdout and "resuming from" in p.stdout and "step-000003" in p.stdout
    assert_runs_agree(env, out, reference)


def test_two_nodes_on_one_machine(env, reference):
    """Two launchers, one per node rank, meeting at 127.0.0.1: the multi-node path with one process per node."""
    out = env["root"] / "dist-2nodes"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        # both "nodes" share these 2 cores: one thread each (a real node has its own cores)
        cmd = launch_cmd(TOPOLOGIES["ddp"], "configs/tiny.yaml", *DIST, f"train.output_dir={out}",
                         "dist.threads_per_process=1",
                         extra=("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                "--main_process_ip", "127.0.0.1"))
        cmd[cmd.index("--main_process_port") + 1] = port
        procs.append(subprocess.Popen(cmd, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert_runs_agree(env, out, reference)


def test_impossible_combinations_are_refused_at_start(env):
    """What a topology cannot run, refused by `scalora train` before it starts the launcher (no process is started);
    the launched processes' own check (`accelerate launch` directly): test_launcher_settings_that_disagree_are_
    refused_before_training (FSDP with an 8-bit base, ZeRO-2 with an 8-bit optimizer)."""
    p = run(env, "train", "configs/tiny.yaml", *DIST, "train.optimizer=adamw_8bit",
            "dist.launch_config=launch/zero2.yaml", "dist.num_processes=2",
            f"train.output_dir={env['root'] / 'dist-bad2'}", check=False)
    assert p.returncode != 0 and p.stderr.startswith("error: under zero2: train.optimizer=adamw_8bit"), p.stderr


def test_fsdp_on_cpu_needs_the_switch(env):
    """accelerate (1.15) runs FSDP on CPUs only through dist._fsdp_on_cpu: alone it makes MULTI_CPU of
    ACCELERATE_USE_FSDP. When this fails because accelerate picks FSDP itself, delete dist._fsdp_on_cpu."""
    import sys

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "tests/fsdp_probe.py"], env=env["env"], capture_output=True, text=True,
                       timeout=300)
    lines = sorted(line.split() for line in p.stdout.splitlines() if line[:1].isdigit())
    assert p.returncode == 0 and len(lines) == 2, p.stderr[-3000:]
    for rank, (index, alone, ours) in enumerate(lines):
        assert (int(index), alone, ours) == (rank, "MULTI_CPU", "FSDP")


def _launch_args(*extra):
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *extra]


def test_launcher_settings_that_disagree_are_refused_before_training(env, tmp_path):
    """scalora's config is the one source of truth for batch, accumulation and precision: a launcher value that
    disagrees is refused with both values and the key to set. Every problem comes in one message, from the launched
    processes' check before the model loads: nothing is trained, not even the output folder is made. A missing data
    file, under a launcher that is set up right, is reported by the node's first process before loading, once."""
    ds_yaml = _own_deepspeed_file(tmp_path, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4,
                                             "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"})
    cases = [  # (the launcher's arguments, the run config's overrides, what the one message says)
        (["--config_file", "launch/fsdp.yaml", "--gradient_accumulation_steps", "4", "--mixed_precision", "fp16"],
         ["model.dtype=float32", "quant.bits=8"],
         ["3 problems", "gradient_accumulation_steps=4", "takes 2", "train.global_batch_size", "mixed_precision=fp16",
          "model.dtype=float32", "model.dtype=float16", "LLM.int8 weights cannot be sharded by fsdp", "quant.bits=4"]),
        (["--config_file", ds_yaml], ["train.optimizer=adamw_8bit"],  # the DeepSpeed file's, and the topology's
         ["2 problems", "gradient_accumulation_steps=4 (scalora's: 2", "train.global_batch_size",
          "under zero2: train.optimizer=adamw_8bit"]),
        (["--num_processes", "2", "--cpu"], [],  # accelerate's simple launcher: one process, where 2 were asked for
         ["--num_processes 2 but started one process", "scalora launch-file ddp"]),
        (["--config_file", "launch/ddp.yaml"], [f"data.train_file={tmp_path / 'missing.jsonl'}"],  # inputs, once
         ["missing.jsonl' does not exist"]),
    ]
    outs = [tmp_path / f"run{i}" for i in range(len(cases))]

    def launched(case, out) -> subprocess.CompletedProcess:
        cmd = _launch_args(*case[0], "-m", "scalora", "train", "configs/tiny.yaml", *DIST, *case[1],
                           f"train.output_dir={out}")
        return subprocess.run(cmd, env=env["env"], capture_output=True, text=True, timeout=600)

    done = side_by_side(*(lambda c=c, o=o: launched(c, o) for c, o in zip(cases, outs)))  # mostly imports each
    for (launcher, overrides, messages), out, p in zip(cases, outs, done):
        assert p.returncode != 0, launcher
        errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1, (launcher, p.stderr[-3000:])
        assert all(m in errors[0] for m in messages), (launcher, errors[0])
        # the launcher's problems stop every process before setup; a data problem stops the node's first process,
        # and the other may have made the output folder (empty) before the launcher stopped it
        made = sorted(p.name for p in out.iterdir()) if out.exists() else None
        assert made is None or (made == [] and "data.train_file" in " ".join(overrides)), (launcher, made)


def test_the_cli_file_and_shipped_launch_files_work_from_anywhere(env, tmp_path, reference_bf16):
    """`accelerate launch --mixed_precision bf16 <shipped file> scalora/cli.py train ...`, run from another folder:
    the file found by `scalora launch-file`, the CLI run as a file, and the launcher's precision taken where the
    config says model.dtype auto. It is also the bf16 ZeRO-2 run: the single-process bf16 run's losses and adapter
    to bf16 rounding, as test_bf16_compute_under_sharding checks FSDP's."""
    out = tmp_path / "from-elsewhere"
    shipped = run(env, "launch-file", "zero2").stdout.strip()
    assert os.path.isabs(shipped) and shipped.endswith("scalora/launch/zero2.yaml")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = _launch_args("--config_file", shipped, "--mixed_precision", "bf16", os.path.join(root, "scalora", "cli.py"),
                       "train", os.path.join(root, "configs", "tiny.yaml"), *DIST, f"train.output_dir={out}")
    p = subprocess.run(cmd, env=env["env"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["topology"] == "zero2" and summary["processes"] == 2
    assert summary["compute_dtype"] == "bfloat16"
    assert summary["compute_dtype_reason"] == "auto: the launcher's mixed_precision=bf16"
    assert_runs_agree(env, out, reference_bf16, dtype="bfloat16")


def _single_run(env, name: str, *overrides: str):
    """One process training configs/tiny.yaml with DIST and `overrides`: what a 2-process variant must match."""
    out = env["root"] / f"dist-single-{name}"
    run(env, "train", "configs/tiny.yaml", *DIST, *overrides, f"train.output_dir={out}")
    return out


@pytest.fixture(scope="module")
def reference_bf16(env):
    return _single_run(env, "bf16", "model.dtype=bfloat16")


@pytest.mark.parametrize("name", ["fsdp"])
def test_bf16_compute_under_sharding(env, reference_bf16, name):
    """bf16 compute (what GPUs run) under FSDP2: the single-process bf16 run's losses and adapter to bf16 rounding
    (tests/tolerance.py's operand_rtol). FSDP on CPU once crashed here: its mixed-precision policy was never set.
    ZeRO-2's bf16 run is test_the_cli_file_and_shipped_launch_files_work_from_anywhere's."""
    out = env["root"] / f"dist-bf16-{name}"
    launch(env, TOPOLOGIES[name], "configs/tiny.yaml", *DIST, "model.dtype=bfloat16", f"train.output_dir={out}")
    assert json.loads((out / "summary.json").read_text())["compute_dtype"] == "bfloat16"
    assert_runs_agree(env, out, reference_bf16, dtype="bfloat16")


@pytest.fixture(scope="module")
def layered_base(env, tmp_path_factory):
    """A base whose decoder layers hold nearly all its weights (8 layers of width 512, the builtin tokenizer's
    small vocabulary): 26M parameters saved in fp32 (0.1 GB), quantized to 4-bit while loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalora.builtin import build_tokenizer

    path = tmp_path_factory.mktemp("layered") / "base"
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=256,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_each_rank_loads_a_fraction_of_the_base(env, layered_base):
    """Low-memory loading (the default under ZeRO-3 and FSDP): what loading adds to a process (its peak while
    loading, less what it held before) is under half that of a single process loading the whole base with
    from_pretrained (dist.low_memory_loading=false; by default one process on a CPU loads layer by layer too, which
    tests/test_loading.py checks). That process holds the whole packed base and the checkpoint pages it quantized
    from; each of 2 ranks holds half of the packed layers, one layer being quantized, the embeddings and head
    (measured [avx2] on this 8-layer base: 0.39-0.40x under FSDP and ZeRO-3; 0.24-0.26x on 16 layers, on
    avx512_bf16 and avx2; the path that loads the whole base on every rank measured 1.0-1.1x, bench/loading.py). Same
    first loss as the single process: the same model."""
    topics = os.path.join(os.path.dirname(scalora.__file__), "assets", "topics", "train.jsonl")
    args = ["configs/tiny.yaml", f"model.name_or_path={layered_base}", "model.dtype=float32", "train.max_steps=1",
            "train.global_batch_size=4", "train.micro_batch_size=2", "data.max_length=64", "train.save_every=0",
            f"data.train_file={topics}", "data.validation_fraction=0", "data.max_eval_generate=0",
            "log.report_to=none"]  # no validation: loading is what is measured
    e = live_memory_env(env)  # freed memory goes back: a live peak
    outs = {name: env["root"] / f"layered-{name}" for name in ("single", "fsdp", "zero3")}
    # each run's own peak, the three side by side (two at a time)
    side_by_side(lambda: run(e, "train", *args, f"train.output_dir={outs['single']}", "dist.low_memory_loading=false"),
                 *(lambda n=n: launch(e, TOPOLOGIES[n], *args, f"train.output_dir={outs[n]}")
                   for n in ("fsdp", "zero3")))
    single = json.loads((outs["single"] / "summary.json").read_text())
    whole = single["loading_model_memory_gb_per_rank"][0]
    checkpoint_gb = os.path.getsize(os.path.join(layered_base, "model.safetensors")) / 2**30
    assert whole > 0.75 * checkpoint_gb  # the packed base and the fp32 checkpoint it came from are in there
    for name in ("fsdp", "zero3"):
        out = outs[name]
        summary = json.loads((out / "summary.json").read_text())
        per_rank = summary["loading_model_memory_gb_per_rank"]
        assert len(per_rank) == 2 and max(per_rank) < 0.5 * whole, (name, per_rank, whole)
        first, want = losses(out)[1], losses(env["root"] / "layered-single")[1]
        assert_rounding_close(torch.tensor([first]), torch.tensor([want]), loss_rtol(AutoConfig.from_pretrained(
            layered_base)), what="first loss")


@pytest.fixture(scope="module")
def reference_dora(env):
    return _single_run(env, "dora", "lora.use_dora=true")


def test_dora_and_loraplus_under_zero3(env, reference_dora):
    """DoRA with LoRA+ where the optimizer state is sharded, under ZeRO-3, in one run: losses and adapter equal the
    single-process DoRA + LoRA+ run's (the tolerances of the other topology tests); the DoRA run with one lr for all
    differs from it. DoRA: a trained magnitude per output, the norm over each layer's de-quantized weight, both
    processes loading the base layer by layer, each layer's magnitude computed once its weights are in and before it
    is sharded; ZeRO-3 gathers a module's parameters for its own call, so the magnitude and lora_B go in through
    their modules' calls and the norm reads A, B and W inside DeepSpeed's gathering context where they are not whole
    already. LoRA+: two learning rates in two parameter groups. Two bugs this found: a parameter ZeRO-3 shards while
    loading holds an empty 1-D tensor, and LoRA+ put every one in lora_B's group (16x lr, other losses from step 3;
    the magnitudes are 1-D, in lora_A's group as peft puts them); and ZeRO-2 left the second group's optimizer state
    unlinked (its first checkpoint failed; sharding._link_deepspeed_state). LoRA+ under FSDP2 and ZeRO-2, DoRA under
    ZeRO-2 and DDP (which keep the base whole on every process) passed the same checks when written and are left out
    for the suite's time; DoRA alone and LoRA+ alone ran as separate launches until the two were one."""
    both = ["lora.use_dora=true", "train.loraplus_lr_ratio=16"]
    reference = _single_run(env, "dora-loraplus", *both)
    out = env["root"] / "dist-dora-loraplus-zero3"
    launch(env, TOPOLOGIES["zero3"], "configs/tiny.yaml", *DIST, *both, f"train.output_dir={out}")
    assert_runs_agree(env, out, reference)
    from helpers import adapter

    plus, plain = adapter(reference), adapter(reference_dora)
    assert any(k.endswith("lora_magnitude_vector") for k in adapter(out))
    assert any(not torch.allclose(plus[k], plain[k], rtol=0.1) for k in plus)


def test_dora_and_pissa_under_fsdp(env, reference):
    """DoRA with PiSSA initialisation on two processes under FSDP2, which unshards a whole decoder layer for its
    forward, in one run: the layer-by-layer loader computes each decoder layer's SVD from the checkpoint's weights once
    the layer is in (the base becomes the residual W - s B A, quantized to 4-bit), then the layer's magnitudes from
    that residual and the new A and B, before fully_shard shards it, on every rank alike. Losses and the final adapter
    (plain LoRA on the original base, rank 2r, with the magnitudes: W + s' B' A' there is the residual + s B A the
    magnitudes were trained against) equal the single-process run's to the tolerances of the other topology tests; the
    plain LoRA run's adapter has no magnitudes. (DoRA alone and PiSSA alone ran as separate launches until the two
    were one, for the suite's time.)"""
    both = ["lora.use_dora=true", "lora.init_lora_weights=pissa"]
    reference_both = _single_run(env, "dora-pissa", *both)
    out = env["root"] / "dist-dora-pissa-fsdp"
    launch(env, TOPOLOGIES["fsdp"], "configs/tiny.yaml", *DIST, *both, f"train.output_dir={out}")
    assert_runs_agree(env, out, reference_both)
    from helpers import adapter

    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 32
    magnitudes = {k for k in adapter(out) if k.endswith("lora_magnitude_vector")}
    assert magnitudes and not magnitudes & set(adapter(reference))
