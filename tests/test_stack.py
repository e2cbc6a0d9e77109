"""The suite runs on the pinned stack: every package in constraints.txt is installed at its pinned version, and
torch at the Makefile's. A refreshed stack (`make lock`) lands only with a suite that passed on it."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"constraints.txt: {line!r} is not pinned with =="
            pins[name] = ver
    return pins


def test_installed_versions_equal_the_pins():
    pins = _pins()
    for must in ("transformers", "accelerate", "bitsandbytes", "deepspeed", "peft", "wandb", "safetensors",
                 "datasets", "pytest"):
        assert must in pins, f"{must} is not pinned in constraints.txt"
    wrong = []
    for name, ver in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue  # a platform-only dependency of the locked machine; pip installs what this one needs
        if have != ver:
            wrong.append(f"{name} {have} (pinned {ver})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(wrong) + \
        ". Reinstall with `make clean install`, or refresh the pins with `make lock` and run the suite."


def test_torch_is_the_makefile_pin():
    import torch

    pinned = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch.__version__.split("+")[0] == pinned, \
        f"torch {torch.__version__} is installed, the Makefile pins {pinned}: reinstall with `make clean install`"
