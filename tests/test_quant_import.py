"""bitsandbytes imported by scalora's core with its import-time `torch.compile` deferred (scalora/core/quant.py)."""

import json
import subprocess
import sys

import pytest
import torch

from scalora.core import quant

# Modules only a `torch.compile(...)` call loads: transformers' own imports bring dynamo, not these
_COMPILE_ONLY = ("torch._inductor.compile_fx", "networkx")

_PROBE = """
import json, sys
{first}
import scalora.core, transformers.masking_utils  # what `scalora train` imports before building a model
import bitsandbytes.backends.default.ops  # the module whose kernels bitsandbytes compiles
print(json.dumps({{m: m in sys.modules for m in {mods!r}}}))
"""


def _loaded(*firsts: str) -> list[dict]:
    """For each `first` line, in fresh interpreters side by side (imports run on one core each)."""
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE.format(first=first, mods=_COMPILE_ONLY)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for first in firsts]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [json.loads(out.splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and bitsandbytes: ~10 s
def test_importing_the_core_leaves_inductor_unloaded():
    core, plain = _loaded("", "import bitsandbytes")
    assert core == {m: False for m in _COMPILE_ONLY}
    # bitsandbytes imported first, as it is: the compile machinery is loaded (what the test would miss if broken)
    assert plain == {m: True for m in _COMPILE_ONLY}


def test_deferred_compile_compiles_once_on_first_call_with_the_arguments_given():
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    defer = quant._deferred_compile(fake_compile)

    @defer(dynamic=False)
    def double(x):
        return 2 * x

    def triple(x):
        return 3 * x

    bare = defer(triple)
    assert calls == []  # nothing compiled at decoration
    assert double(torch.tensor(2.0)) == ("compiled", torch.tensor(4.0))
    assert double(3) == ("compiled", 6) and bare(1) == ("compiled", 3)
    assert calls == [{"dynamic": False}, {}]  # once each, with the decorator's arguments
    assert double.__name__ == "double"


def test_import_restores_torch_compile():
    assert torch.compile is not None and torch.compile.__module__ == "torch"


def test_deferred_compile_pins_the_vector_width_first(monkeypatch):
    """bitsandbytes' kernels compile with inductor's vector width pinned, as the decoder layers do (the width keys
    inductor's cache apart: scalora.core.quant.pin_vector_width); a width the user set is kept."""
    import torch._inductor.config as inductor
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    seen = []
    defer = quant._deferred_compile(lambda fn, **kwargs: (seen.append(inductor.cpp.simdlen), fn)[1])
    monkeypatch.setattr(inductor.cpp, "simdlen", None)
    own = pick_vec_isa().bit_width()  # what inductor picks for this process unpinned
    defer(lambda x: x)(1)
    monkeypatch.setattr(inductor.cpp, "simdlen", 256)
    defer(lambda x: x)(1)
    assert seen == [own, 256]
