"""Every bad input gets one message a user can act on: exit status 2, one `error:` line, no traceback, and a finished
run in the output folder left byte for byte as it was.

Generated cases (hypothesis) run the real CLI entry point in this process (`scalora.cli.main`, a few ms each);
explicit cases run it in subprocesses, under a launcher where the case is about launched processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalora import cli
from scalora.config import SECTIONS

from helpers import run, train_args, tree_digest

pytestmark = pytest.mark.slow  # a finished run is made first (one real training run in a subprocess)


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
    """A finished run (checkpoints, final adapter, metrics), made once; each case gets it as its output folder."""
    out = tmp_path_factory.mktemp("errors") / "finished"
    run(env, *train_args(out, "train.max_steps=2", "train.save_every=1"))
    assert (out / "final" / "adapter_model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def scalora_here(env):
    """`scalora ARGS` through the real entry point (`scalora.cli.main`), in this process: (status, stderr). For
    inputs refused before anything trains; what needs launched processes runs in subprocesses below."""
    import contextlib
    import io

    saved = {k: os.environ.get(k) for k in ("SCALORA_CACHE", "HF_HUB_OFFLINE")}
    os.environ.update(SCALORA_CACHE=env["env"]["SCALORA_CACHE"], HF_HUB_OFFLINE="1")

    def call(*args: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(list(args))
        return status, err.getvalue()

    yield call
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def cli_in_process(scalora_here, finished):
    """`scalora train` with the finished run as the output folder (train.overwrite=true: the path where a bad input
    could cost a run). Returns (status, stderr); fails if the folder changed (and puts it back for the next case)."""
    before = tree_digest(finished)
    pristine = finished.parent / "pristine"
    shutil.copytree(finished, pristine)

    def call(*args: str) -> tuple[int, str]:
        status, err = scalora_here("train", "configs/tiny.yaml", f"train.output_dir={finished}",
                                   "train.overwrite=true", "log.report_to=none", *args)
        if tree_digest(finished) != before:
            shutil.rmtree(finished)
            shutil.copytree(pristine, finished)  # the next example starts from the finished run again
            raise AssertionError(f"the finished run changed: {args}")
        return status, err

    return call


def assert_one_message(status: int, stderr: str, *expected: str) -> None:
    """Exit status 2, exactly one line of error, nothing of a traceback; the message names what was expected."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert status == 2, (status, stderr[-2000:])
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert all(e in errors[0] for e in expected), (expected, errors[0])


# --- generated: config overrides -----------------------------------------------------------------------------------
FREE_TEXT = {("model", "revision"), ("model", "attn_implementation"), ("train", "output_dir"), ("log", "project"),
             ("log", "run_name"), ("log", "group"), ("dist", "launch_config"), ("data", "validation_file")}
RANGES = {("lora", "r"): [0, -3], ("lora", "lora_alpha"): [0, -1.5], ("lora", "lora_dropout"): [1.0, -0.1, 7],
          ("quant", "bits"): [2, 3, 32], ("train", "lr"): [0, -1e-4], ("train", "micro_batch_size"): [0, -4, 3, 5],
          ("train", "global_batch_size"): [0, 15, 7], ("train", "warmup_ratio"): [1.0, -0.5],
          ("train", "max_grad_norm"): [-1], ("data", "max_length"): [0, 7, -100], ("train", "save_every"): [-1],
          ("data", "validation_fraction"): [1.0, -0.2], ("dist", "num_processes"): [0, -2],
          ("train", "max_steps"): [-5], ("train", "save_total_limit"): [-1], ("data", "max_eval_examples"): [-1],
          ("data", "max_eval_generate"): [-3]}
KEYS = [(s, f.name, typing.get_type_hints(cls)[f.name]) for s, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)]
names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def _wrong_for(tp) -> st.SearchStrategy:
    """Values of a type the key does not take (after the YAML round trip of the override): lists, mappings, numbers
    or words, whichever the key's declared type does not admit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    allowed = set(args) if origin is typing.Union else {tp}
    kinds = {typing.get_origin(a) or a for a in allowed}
    options = []
    if list not in kinds:
        options.append(st.lists(st.one_of(st.integers(), names), min_size=1, max_size=3))
    else:  # a list of the wrong element type
        elements = {typing.get_args(a)[0] for a in allowed if typing.get_origin(a) is list}
        options.append(st.lists(st.dictionaries(names, st.integers(), min_size=1) if elements & {int, str} else
                                st.integers(), min_size=1, max_size=3))
    if dict not in kinds:
        options.append(st.dictionaries(names, st.integers(), min_size=1, max_size=2))
    if not allowed & {int, float}:
        options.append(st.integers(min_value=2, max_value=10**6))
    if str not in allowed and not any(typing.get_origin(a) is typing.Literal for a in allowed | {tp}):
        options.append(st.text(string.ascii_letters, min_size=2, max_size=10).filter(
            lambda s: s.lower() not in ("yes", "no", "on", "off", "true", "false", "null", "y", "n")))
    if typing.get_origin(tp) is typing.Literal:
        options.append(names.filter(lambda s: s not in args))
    if allowed & {int} and float not in allowed:
        options.append(st.floats(min_value=0.1, max_value=100).filter(lambda x: x != int(x)))
    return st.one_of(options)


@st.composite
def bad_override(draw) -> tuple[str, str]:
    """(override, what the message must name)."""
    kind = draw(st.sampled_from(["type", "range", "unknown key", "unknown section", "not key=value"]))
    if kind == "range":
        (section, key), values = draw(st.sampled_from(sorted(RANGES.items())))
        return f"{section}.{key}={json.dumps(draw(st.sampled_from(values)))}", f"{section}.{key}"
    if kind == "unknown key":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(names.filter(lambda k: k not in typing.get_type_hints(SECTIONS[section])))
        return f"{section}.{key}={json.dumps(draw(st.one_of(st.integers(), names)))}", f"unknown key '{section}.{key}'"
    if kind == "unknown section":
        section = draw(names.filter(lambda s: s not in SECTIONS))
        return f"{section}.{draw(names)}=1", f"unknown section '{section}'"
    if kind == "not key=value":
        bad = draw(st.sampled_from(["lr", "train.lr", "=3", ".lr=1", "train.=1"]))
        return bad, "must look like section.key=value"
    section, key, tp = draw(st.sampled_from([k for k in KEYS if k[:2] not in FREE_TEXT]))
    return f"{section}.{key}={json.dumps(draw(_wrong_for(tp)))}", f"{section}.{key}="


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_override())
def test_generated_config_overrides(cli_in_process, case):
    override, expected = case
    status, stderr = cli_in_process(override)
    assert_one_message(status, stderr, expected)


# --- generated: data files -------------------------------------------------------------------------------------------
FIELDS = ("text", "instruction", "output", "messages", "input")


@st.composite
def bad_data(draw) -> tuple[bytes, str]:
    """(file bytes, what the message must mention)."""
    kind = draw(st.sampled_from(["broken json", "not utf-8", "binary", "empty", "missing columns", "wrong types",
                                 "nulls", "not objects", "huge line"]))
    good = [json.dumps({"text": draw(names)}) for _ in range(draw(st.integers(0, 3)))]
    if kind == "broken json":
        lines = good + ["{" + draw(st.text(string.ascii_letters + string.digits + " ", max_size=20))]
        return "\n".join(lines).encode(), f"line {len(lines)}"
    if kind == "not utf-8":
        return ("\n".join(good) + "\n").encode() + b'{"text": "caf\xe9 \xff"}\n', "UTF-8"
    if kind == "binary":
        return b"\x00\xff\xfe" + draw(st.binary(min_size=1, max_size=200)), "line 1"
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\n\n  \n"])), "bad.jsonl"
    if kind == "missing columns":
        keys = draw(st.lists(names.filter(lambda k: k not in FIELDS), min_size=1, max_size=3, unique=True))
        rows = [{k: draw(names) for k in keys} for _ in range(draw(st.integers(1, 4)))]
        return "\n".join(json.dumps(r) for r in rows).encode(), "cannot tell the format"
    if kind == "wrong types":
        value = draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1), st.booleans(),
                               st.dictionaries(names, st.integers(), min_size=1)))
        return (json.dumps({"text": value}) + "\n").encode() * draw(st.integers(1, 3)), "'text'"
    if kind == "nulls":
        return "\n".join(good + [json.dumps({"text": None})]).encode(), "'text'"
    if kind == "not objects":
        value = draw(st.one_of(st.integers(), st.lists(st.integers()), names))
        return (json.dumps(value) + "\n").encode(), "expected an object"
    return (json.dumps({"note": "x" * draw(st.integers(100_000, 300_000))}) + "\n").encode(), "cannot tell the format"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_data())
def test_generated_data_files(cli_in_process, tmp_path_factory, case):
    content, expected = case
    path = tmp_path_factory.mktemp("data") / "bad.jsonl"
    path.write_bytes(content)
    status, stderr = cli_in_process(f"data.train_file={path}")
    assert_one_message(status, stderr, expected)


# --- explicit cases, one per class ----------------------------------------------------------------------------------
def _scalora(env, *args, cwd=None, extra_env=None):
    e = dict(env["env"], **(extra_env or {}))
    return env["zygote"].run(list(args), e, cwd=None if cwd is None else str(cwd))


def test_bad_input_never_damages_a_finished_run(cli_in_process, tmp_path):
    """train.overwrite=true with a bad data file, model or target: the error comes before the old run is touched
    (cli_in_process fails if the folder changed)."""
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"text": broken\n')
    for override, message in [(f"data.train_file={bad_data}", "line 2"),
                              ("model.name_or_path=/no/such/model", "could not be loaded"),
                              ("lora.target_modules=[nothing_matches]", "nothing_matches")]:
        status, err = cli_in_process(override)
        assert status == 2 and message in err, (override, err[-1500:])


def test_errors_in_launched_processes(env, tmp_path):
    """A batch that does not divide across dist.num_processes is refused before any process starts; an error only a
    worker can see (no example survives tokenizing) reaches the user once, with the rank, and no traceback."""
    p = _scalora(env, *train_args(tmp_path / "a", "dist.launch_config=ddp", "dist.num_processes=3"))
    assert_one_message(p.returncode, p.stderr, "train.global_batch_size=16", "x 3 processes")
    assert "process(es)" not in p.stdout  # no worker started
    p = _scalora(env, *train_args(tmp_path / "b", "dist.launch_config=ddp", "dist.num_processes=2",
                                  "train.micro_batch_size=4", "data.max_length=8", "data.too_long=drop"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank ") and "no usable examples" in errors[0], errors


@pytest.mark.parametrize("case", ["output is a file", "missing launch file", "unwritable output", "launch file junk"])
def test_file_system_errors(scalora_here, tmp_path, case):
    out = tmp_path / "out"
    if case == "output is a file":
        out.write_text("not a folder")
        args, expected = train_args(out), ("is a file",)
    elif case == "missing launch file":
        args, expected = train_args(out, "dist.launch_config=launch/nope.yaml"), ("nope.yaml", "fsdp")
    elif case == "launch file junk":
        junk = tmp_path / "junk.yaml"
        junk.write_text("- just\n- a list\n")
        args, expected = train_args(out, f"dist.launch_config={junk}", "dist.num_processes=2"), ("junk.yaml",)
    else:
        if os.geteuid() == 0:
            pytest.skip("the suite runs as root here, whom file permissions do not stop")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        args, expected = train_args(locked / "out"), ("cannot be created",)
    assert_one_message(*scalora_here(*args), *expected)


@pytest.fixture(scope="module")
def adapter(finished, tmp_path_factory):
    return finished / "final"


@pytest.mark.parametrize("damage", ["truncated", "foreign bytes", "not json config", "no peft_type",
                                    "lora_bias config"])
@pytest.mark.parametrize("command", ["merge", "generate"])
def test_damaged_adapters_are_named(scalora_here, adapter, tmp_path, damage, command):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    weights, config = bad / "adapter_model.safetensors", bad / "adapter_config.json"
    expected = {"truncated": "adapter_model.safetensors", "foreign bytes": "adapter_model.safetensors",
                "not json config": "not valid JSON", "no peft_type": "no peft_type",
                "lora_bias config": "lora_bias=True"}
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "foreign bytes":
        weights.write_bytes(os.urandom(5000))
    elif damage == "not json config":
        config.write_text("{not json")
    else:
        c = json.loads(config.read_text())
        c.pop("peft_type") if damage == "no peft_type" else c.update(lora_bias=True)
        config.write_text(json.dumps(c))
    cmd = ["merge", str(bad), "--out", str(tmp_path / "m")] if command == "merge" else \
        ["generate", str(bad), "--prompt", "hello", "--config", str(adapter.parent / "config.yaml")]
    assert_one_message(*scalora_here(*cmd), expected[damage])
    assert not (tmp_path / "m").exists()


def test_adapter_config_with_unknown_fields_loads_with_a_warning(adapter, tmp_path):
    import warnings

    import scalora

    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    c = json.loads((bad / "adapter_config.json").read_text())
    c["future_option"] = {"level": 3}
    (bad / "adapter_config.json").write_text(json.dumps(c))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = scalora.LoraConfig.from_pretrained(str(bad))
    assert cfg.r == c["r"] and any("future_option" in str(w.message) for w in caught)


@pytest.mark.parametrize("damage", ["another format", "all damaged", "another run", "copied in"])
def test_checkpoints_that_cannot_resume_are_refused(scalora_here, finished, tmp_path, damage):
    """Resuming from a checkpoint of another format, or when every checkpoint is damaged, is refused (starting again
    from step 0 would throw the run's history away); a run folder of another config is refused, and so is a
    checkpoint copied in from another run (its own config differs; complete and consistent, not silently loaded)."""
    import hashlib

    import yaml

    from scalora import checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "final")
    if damage == "copied in":
        ckpt = out / "checkpoints/step-000002"
        cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
        cfg["lora"]["lora_alpha"] = 7.0
        (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
        manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
        manifest["files"]["config.yaml"] = {"size": (ckpt / "config.yaml").stat().st_size,
                                            "sha256": hashlib.sha256((ckpt / "config.yaml").read_bytes()).hexdigest()}
        (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    for ckpt in sorted((out / "checkpoints").iterdir()):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        if damage == "another format":
            manifest["format"] = 99
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
        elif damage == "all damaged":
            (ckpt / "optimizer.safetensors").write_bytes(os.urandom(64))
    expected = {"another format": ("format 99", "expected 1"), "all damaged": ("every checkpoint",),
                "another run": ("different config",), "copied in": ("different config", "step-000002")}[damage]
    extra = ["train.lr=0.5"] if damage == "another run" else []
    before = tree_digest(out)
    args = train_args(out, "train.max_steps=4", "train.save_every=1", *extra)
    if damage == "all damaged":  # each damaged checkpoint is named in a warning as it is passed over
        with pytest.warns(UserWarning, match="skipping checkpoint"):
            result = scalora_here(*args)
    else:
        result = scalora_here(*args)
    assert_one_message(*result, *expected)
    assert tree_digest(out) == before


def test_other_commands(scalora_here, tmp_path, adapter):
    assert_one_message(*scalora_here("generate", str(adapter)), "--prompt")
    (tmp_path / "file").write_text("x")
    assert_one_message(*scalora_here("merge", str(adapter), "--out", str(tmp_path / "file")), "is a file")
    assert_one_message(*scalora_here("plan", "configs/tiny.yaml", "--gpus", "0"), "--gpus")
    assert_one_message(*scalora_here("generate", str(tmp_path / "no-adapter"), "--prompt", "x"), "no-adapter",
                       "does not exist")
    assert_one_message(*scalora_here("launch-file", "nope"), "nope", "fsdp")


def test_debug_shows_the_traceback_and_bugs_say_where_to_report(env, tmp_path):
    out = tmp_path / "out"
    p = _scalora(env, "--debug", "train", "configs/tiny.yaml", "lora.r=0", f"train.output_dir={out}")
    assert p.returncode == 2 and "Traceback" in p.stderr and "lora.r=0" in p.stderr
    p = _scalora(env, *train_args(out, "train.max_steps=3"), extra_env={"SCALORA_FAULT_INJECT": "bug@2"})
    assert p.returncode == 1 and "Traceback" in p.stderr, p.stderr[-2000:]
    assert "this is a bug in scalora" in p.stderr and "fault injected after step 2" in p.stderr


def test_sharding_refuses_packed_weights_it_would_cast(scalora_here, saved_tiny_models, tmp_path):
    """ZeRO-3 and FSDP cast every parameter they shard to the compute dtype, packed 4-bit bytes included: a checkpoint
    saved quantized with another storage dtype would be corrupted (measured on a 310M Llama, bench/loading.py: the
    first forward fails). Refused before launch with the fix; the matching dtype passes."""
    import torch

    from conftest import load_quantized
    from scalora import dist
    from scalora.builtin import build_tokenizer
    from scalora.config import load_config
    from scalora.model import prequantized_storage

    path = tmp_path / "prequantized"
    load_quantized(saved_tiny_models["llama"], 4).save_pretrained(path)  # bitsandbytes' default storage: uint8
    build_tokenizer().save_pretrained(path)
    cfg = load_config(None, [f"model.name_or_path={path}"])
    assert prequantized_storage(cfg, str(path)) == torch.uint8
    assert prequantized_storage(cfg, saved_tiny_models["llama"]) is None
    fp32 = torch.float32
    assert dist.topology_problems("fsdp", cfg, fp32, fp32) == []
    assert dist.topology_problems("ddp", cfg, torch.uint8, torch.bfloat16) == []  # DDP keeps the base as loaded
    for kind in ("zero3", "fsdp"):
        assert "model.dtype=float32" in dist.topology_problems(kind, cfg, fp32, torch.bfloat16)[0]
        assert "saved before quantization" in dist.topology_problems(kind, cfg, torch.uint8, fp32)[0]
    status, stderr = scalora_here(*train_args(tmp_path / "out", f"model.name_or_path={path}",
                                              "dist.launch_config=zero3", "dist.num_processes=2",
                                              "train.micro_batch_size=8"))
    assert_one_message(status, stderr, "saved already quantized", "stored as torch.uint8")
