"""The allocator the `scalora` command runs with (scalora/malloc.py): TBB's scalable allocator, preloaded by the command
starting itself again before any heavy import; the C library's malloc with SCALORA_MALLOC=system. The allocator
must change where tensors live, never what they hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FAST, losses
from scalora import malloc


def test_preload_env_adds_tbbmalloc_once_and_keeps_other_preloads():
    libs = malloc.tbb_libraries()
    assert libs, "tbbmalloc's libraries are missing from this environment: the install step (pip install -e .) " \
                 "installs the `tbb` package on Linux x86-64"
    env = malloc.preload_env({"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"].split() == [*libs, "/opt/other.so"]
    assert malloc.preload_env(env) == env  # twice: the same, no duplicate
    assert "LD_PRELOAD" not in malloc.preload_env({malloc.ENV: "system"})
    assert malloc.without_tbb(env) == {"LD_PRELOAD": "/opt/other.so"}
    assert "LD_PRELOAD" not in malloc.without_tbb(malloc.preload_env({}))


def test_entry_point_imports_no_torch_before_choosing_the_allocator():
    """The started-again process must not have loaded torch twice: the entry point and `import scalora` load only the
    standard library (the package's PEFT names are imported on first use)."""
    code = "import sys, scalora.entry, scalora; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr)
    import scalora
    from scalora.core import LoraConfig, get_peft_model

    assert scalora.LoraConfig is LoraConfig and scalora.get_peft_model is get_peft_model  # imported on first use
    with pytest.raises(AttributeError):
        scalora.no_such_name


def test_unknown_allocator_is_refused_with_the_choices():
    e = dict(os.environ, **{malloc.ENV: "jemalloc"})
    p = subprocess.run([sys.executable, "-m", "scalora", "train", "configs/tiny.yaml"], env=e, capture_output=True,
                       text=True)
    assert p.returncode == 1 and "SCALORA_MALLOC='jemalloc'" in p.stderr and "'system'" in p.stderr, p.stderr


@pytest.mark.slow
def test_command_runs_with_tbbmalloc_and_the_same_numbers_as_glibc(env, tmp_path):
    """From an environment without the preload, `scalora train` starts itself again with tbbmalloc (the summary and
    the header say which allocator ran); SCALORA_MALLOC=system runs glibc's, also where an inherited LD_PRELOAD
    (the session's, which has tbbmalloc) brought the other in: it starts itself again without it. Losses and adapter
    are equal bit for bit: the same kernels on the same values, only the addresses differ."""
    from safetensors.torch import load_file

    assert malloc.tbb_libraries()[1] in env["env"]["LD_PRELOAD"]
    runs = {}
    for name, e in (("tbbmalloc", malloc.without_tbb(env["env"])),
                    ("system", dict(env["env"], **{malloc.ENV: "system"}))):
        out = tmp_path / name
        p = subprocess.run([sys.executable, "-m", "scalora", "train", "configs/tiny.yaml", *FAST,
                            "log.report_to=none", "train.eval_every=0", "data.max_eval_examples=64",
                            f"train.output_dir={out}"], env=e, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["malloc"] == name
        assert f"malloc {name}" in p.stdout
        runs[name] = out
    assert losses(runs["tbbmalloc"]) == losses(runs["system"])
    a, b = (load_file(os.path.join(runs[n], "final", "adapter_model.safetensors")) for n in ("tbbmalloc", "system"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_release_cached_hands_tbbmalloc_cache_back_to_the_os():
    """Training calls malloc.release_cached after each micro-batch: under tbbmalloc, memory freed by a step stays
    resident in the allocator's caches until then. 200 tensors of 0.4-1.2 MB (every size different, ~150 MB) are
    freed: first shown still resident in part (else the call would have nothing to prove), then handed back."""
    code = """
import torch
from scalora import malloc
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) * 1024
assert malloc.tbb_active()
base = rss()
xs = [torch.ones(n) for n in range(100_000, 300_000, 1000)]
allocated = sum(x.numel() * 4 for x in xs)
del xs
kept = rss() - base
malloc.release_cached()
print(allocated, kept, rss() - base)
"""
    p = subprocess.run([sys.executable, "-c", code], env=malloc.preload_env(malloc.without_tbb(dict(os.environ))),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    allocated, kept, after = map(int, p.stdout.split())
    assert kept > 0.25 * allocated, (allocated, kept)  # tbbmalloc kept a good part of the freed blocks...
    assert after < 0.25 * kept, (kept, after)  # ...and the call returned (nearly) all of it
