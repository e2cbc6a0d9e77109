"""The package's two floors: the peft-compatible core imports nothing from the orchestrator above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scalora"


def test_core_imports_nothing_from_the_orchestrator_statically():
    offenders = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: import {n}" for n in names
                          if n.startswith("scalora") and not n.startswith("scalora.core")]
    assert not offenders, offenders
    assert len(list((PACKAGE / "core").glob("*.py"))) >= 6


@pytest.mark.slow  # a fresh interpreter: ~6 s of torch's, transformers' and peft's imports [avx2]
def test_the_peft_workflow_loads_the_core_alone():
    """`from scalora import get_peft_model, ...` and using it loads no orchestrator module."""
    code = ("import sys, torch\n"
            "from scalora import LoraConfig, get_peft_model, PeftModel\n"
            "m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=['0']))\n"
            "m(torch.randn(2, 4))\n"
            "print(sorted(n for n in sys.modules if n.startswith('scalora')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert "scalora.core.peft_model" in loaded
    assert all(n == "scalora" or n.startswith("scalora.core") for n in loaded), loaded
