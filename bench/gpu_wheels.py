"""Gather the wheels a bare CUDA machine needs for bench/gpu.sh, where a package registry is reachable.

    python3 bench/gpu_wheels.py                 # -> .whl/ (git-ignored): wheels for CPython 3.12, manylinux x86-64
    python3 bench/gpu_wheels.py --wandb         # and wandb with its OpenTelemetry stack (+20 MiB)

Such a machine has Python, a CUDA build of torch, transformers, accelerate and peft, and the packages listed in
bench/gpu_image.txt (what the GPU image this project borrows holds); everything else travels as wheels. Starting from
the packages scalora's GPU check needs (NEEDED below), this downloads each at the version constraints.txt pins
(the stack the suite passed with; the newest release where it pins none), reads each wheel's Requires-Dist and
follows the requirements the image lacks, until nothing is missing. deepspeed ships only a source archive: it is
built here into a pure-Python wheel (its ops compile on first use there). scalora's own wheel is built last. torch is
never downloaded: the machine's CUDA build stays. Prints the list and the total size. wandb is left out unless asked
for: the GPU check logs with log.report_to=none (scalora imports wandb only for report_to=wandb), and with wandb the
wheels came to 69 MiB against the 64 MiB a borrowed GPU machine's call carries (measured 2026-11-25: 49 MiB without).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["bitsandbytes", "deepspeed", "liger-kernel", "datasets", "trl"]
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--abi", "abi3", "--abi", "none"] + [x for n in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17",
                                                          "manylinux2014", "manylinux1", "manylinux_2_34",
                                                          "manylinux_2_31", "manylinux_2_24") for x in
                                                ("--platform", f"{n}_x86_64")] + ["--platform", "any"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[norm(name)] = version.strip()
    return out


def image() -> set[str]:
    return {norm(x) for x in (ROOT / "bench" / "gpu_image.txt").read_text().split() if not x.startswith("#")}


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            spec = line.split(":", 1)[1].strip()
            if "extra ==" in spec:
                continue
            if ";" in spec and "python_version" in spec and "<" in spec.split(";")[1] and "3.1" in spec:
                continue  # backports for older Pythons
            reqs.append(norm(re.split(r"[\s<>=!~;\[(]", spec, maxsplit=1)[0]))
    return reqs


def fetch(name: str, version: str | None, dest: Path) -> Path:
    spec = f"{name}=={version}" if version else name
    before = set(dest.glob("*.whl"))
    if name == "deepspeed":  # a source archive only: build a pure-Python wheel
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    found = new or {w for w in dest.glob("*.whl") if norm(w.name.split("-")[0]) == norm(name)}
    return sorted(found)[0]


def main() -> None:
    dest = ROOT / ".whl"
    dest.mkdir(exist_ok=True)
    pinned, have = pins(), image() | {"torch", "scalora"}
    todo, done = NEEDED + (["wandb"] if "--wandb" in sys.argv else []), {}
    while todo:
        name = todo.pop(0)
        if name in done or name in have:
            continue
        wheel = fetch(name, pinned.get(name), dest)
        done[name] = wheel
        todo += [r for r in requirements(wheel) if r not in done and r not in have]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT)], check=True)
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    for w in sorted(dest.glob("*.whl")):
        print(f"{w.stat().st_size / 2**20:8.1f} MiB  {w.name}")
    print(f"{total / 2**20:8.1f} MiB in {len(list(dest.glob('*.whl')))} wheels, in {dest}")


if __name__ == "__main__":
    main()
