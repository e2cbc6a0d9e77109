"""The numerics tests again under the instruction sets of the CPU kinds below this machine's own.

fp32 and bf16 results move with the kernels' summation order, and the kernels differ by CPU kind: MKL (fp32
matmuls), oneDNN (bf16 matmuls, some fp32 ones) and ATen's own vectorized loops each pick AVX2, AVX-512 or AMX code
at run time. This project's machines have been AVX2-only AMD EPYC, AVX-512 + AVX512-BF16 AMD EPYC (no AMX) and Intel
Xeon with AMX. A tolerance set from one kind's rounding failed on another (issue 26). Each of the three libraries
lets a process cap the instruction set it dispatches to, so one machine runs the lower kinds' code paths: this test
reruns the tests marked `numerics` (every in-process comparison against peft, a hand computation or another path,
with the tolerances of tests/tolerance.py, the slow ones left out) in a fresh process per level below this CPU's
own.

A tolerance that holds on one kind only fails here on any machine above that kind. What it cannot do is run a kind
above the machine's own (an AVX2 machine, the lowest kind, has none below it: its own run of the suite is its check),
nor reproduce AMD's own implementation of the same instructions (the results of one instruction sequence are the same
bits on any CPU that runs it). The level below AVX2 (ATen's default loops, SSE4) is no kind of this project's and is
not run (it took 28-36 s of the AVX2 kind's suite).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from scalora import hardware

# (name, rank, environment): rank orders the kinds; a level runs where the CPU's own rank is higher.
LEVELS = [
    ("avx2", 1, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ("avx512_bf16-no-amx", 2, {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                               "MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
]
EXPECTED_ATEN = {"avx2": "AVX2", "avx512": "AVX512"}


def own_rank() -> float:
    """Where this CPU's kind (scalora.hardware.cpu_kind) stands among the levels: AVX-512 without bf16 sits between
    AVX2 and AVX512-BF16 (its oneDNN cannot run the bf16 level's code)."""
    kind = hardware.cpu_kind(hardware.cpu_features())
    return {"amx": 3, "avx512": 1.5, "avx2": 1, "baseline": 0}.get(kind, 2)  # 2: avx512_bf16 of either vendor


# What the process really dispatches to: ATen's level, and the ISA oneDNN reports when it builds a bf16 matmul.
_PROBE = """
import torch
print("aten:", torch.backends.cpu.get_cpu_capability())
a = torch.randn(64, 64, dtype=torch.bfloat16)
a @ a
"""


@pytest.mark.slow  # a fresh pytest process per level
@pytest.mark.parametrize("level", [name for name, _, _ in LEVELS])
def test_numerics_hold_under_a_lower_instruction_set(level, tmp_path):
    name, rank, caps = next(lv for lv in LEVELS if lv[0] == level)
    own = own_rank()
    if rank >= own:
        pytest.skip(f"this CPU ({', '.join(hardware.cpu_features()['flags']) or 'no AVX2'}) is at or below the "
                    f"{level} level: its own run of the suite covers it")
    env = {**os.environ, **caps, "ONEDNN_VERBOSE": "1"}
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert f"aten: {EXPECTED_ATEN[caps['ATEN_CPU_CAPABILITY']]}" in probe.stdout, probe.stdout
    isa = re.search(r"isa:(.*)", probe.stdout)
    assert not isa or "AMX" not in isa.group(1), isa.group(1)  # no AMX below its own kind
    if caps["ONEDNN_MAX_CPU_ISA"] == "AVX2" and isa:
        assert "AVX-512" not in isa.group(1), isa.group(1)
    env.pop("ONEDNN_VERBOSE")
    # torch.compile's kernels cached under another level's ATEN_CPU_CAPABILITY gave NaN losses here (torch 2.13):
    # each level compiles into its own cache (scalora's own compiles key it by vector width now,
    # scalora.core.quant.pin_vector_width; a test's torch.compile need not). The compiled test is `slow`, left out of
    # these reruns to keep the suite's time: its cold compile took ~35 s a level; it does run at this CPU's own level.
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    tests = os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.join(tests, f) for f in os.listdir(tests)  # where the marker is used: less to import
                   if f.startswith("test_") and f.endswith(".py") and "numerics" in open(os.path.join(tests, f)).read())
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numerics and not slow", "-p",
                        "no:cacheprovider", f"--basetemp={tmp_path / 'run'}", *files],
                       env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(tests))
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    assert p.returncode == 0, f"under {level} ({caps}):\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 50 and "failed" not in summary, summary
