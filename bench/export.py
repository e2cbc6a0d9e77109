"""GGUF export's memory on a real model: merged one decoder layer at a time (what `scalora export --gguf` does)
against the whole merged model held in fp32 (the path `scalora merge` takes, and the export's fallback).

SmolLM2-135M-Instruct (the GGUF file `make fetch-smollm2` fetches, converted once into a plain fp32 folder: 538 MB),
a random LoRA adapter r=16 on every linear layer, its base as configs/smollm2-135m.yaml trains it (4-bit NF4, the
compute dtype `auto` picks on this CPU). Each export is its own process; its peak resident memory is the kernel's
(wait4's ru_maxrss). A third process only imports what an export imports (torch, transformers, bitsandbytes, gguf,
scalora), the floor under both. The two files must hold the same tensors bit for bit.

    .venv/bin/python bench/export.py                # f16 and q8_0
    .venv/bin/python bench/export.py --types f32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from common import emit_result, write_results  # noqa: E402
from real import CONFIG, SMOLLM2, run_measured  # noqa: E402


def worker(mode: str, adapter: str, config: str, out: str, kind: str) -> None:
    import argparse as ap

    t = time.perf_counter()
    from scalora import cli, gguf_export  # noqa: F401  (the imports of an export, for the floor too)

    if mode == "imports":
        import bitsandbytes  # noqa: F401
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    elif mode == "streamed":
        assert cli.main(["export", adapter, "--gguf", out, "--type", kind, "--config", config]) == 0
    elif mode == "whole":
        import torch

        args = ap.Namespace(adapter=adapter, base=None, config=config, full_precision=False, trust_remote_code=False)
        merged, tokenizer, _ = cli._merged(args, torch.float32)
        gguf_export.write_gguf(merged, tokenizer, out, kind)
    elif mode == "prepare":  # the base folder, a random adapter, the CPU kind
        from scalora.hardware import cpu_features, cpu_kind
        from scalora.model import resolve_model_path

        make_adapter(resolve_model_path(SMOLLM2), adapter)
        features = cpu_features()
        return emit_result({"kind": f"{cpu_kind(features)} ({', '.join(features['flags'])}; {os.cpu_count()} cores)"})
    else:  # compare: the two files' tensors, bit for bit
        import numpy as np
        from gguf import GGUFReader

        a, b = GGUFReader(adapter), GGUFReader(config)
        return emit_result({"same": len(a.tensors) == len(b.tensors) and all(
            x.name == y.name and np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))})
    emit_result({"seconds": time.perf_counter() - t})


def make_adapter(folder: str, adapter: str) -> None:
    """A random r=16 adapter on every linear layer, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import scalora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    peft_model = scalora.get_peft_model(model, scalora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(adapter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--worker", nargs=5, metavar=("MODE", "ADAPTER", "CONFIG", "OUT", "TYPE"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    # This process stays small (no torch, no files read): a child's peak (ru_maxrss) starts from its parent's
    # resident size at the fork, so a parent that had read the GGUF files showed 1.20 GiB for a 0.68 GiB export.
    if not os.path.isfile(SMOLLM2):
        sys.exit(f"{SMOLLM2} is missing: run `make fetch-smollm2` first")
    results = {"rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BENCH_LOG_DIR": tmp}
        adapter, config = os.path.join(tmp, "adapter"), os.path.join(tmp, "run.yaml")
        with open(CONFIG) as src, open(config, "w") as dst:
            dst.write(src.read().replace("~/.cache/scalora/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2))
        me = [sys.executable, os.path.abspath(__file__), "--worker"]
        kind_line = "CPU kind: " + run_measured(me + ["prepare", adapter, config, "-", "-"], env, "prepare")[0]["kind"]
        results["cpu_kind"] = kind_line
        print(kind_line)
        floor = run_measured(me + ["imports", adapter, config, "-", "f32"], env, "imports")[1]
        print(f"imports alone: peak {floor:.2f} GiB")
        for kind in args.types.split(","):
            row = {"type": kind, "imports_gib": floor}
            files = {mode: os.path.join(tmp, f"{mode}-{kind}.gguf") for mode in ("streamed", "whole")}
            for mode, out in files.items():
                res, peak = run_measured(me + [mode, adapter, config, out, kind], env, f"{mode} {kind}")
                row[mode] = {"seconds": res["seconds"], "peak_gib": peak, "file_mb": os.path.getsize(out) / 1e6}
            row["same_tensors"] = run_measured(me + ["compare", files["streamed"], files["whole"], "-", "-"], env,
                                               "compare")[0]["same"]
            s, w = row["streamed"], row["whole"]
            row["peak_ratio"] = s["peak_gib"] / w["peak_gib"]
            row["above_imports_ratio"] = (s["peak_gib"] - floor) / (w["peak_gib"] - floor)
            print(f"{kind}: streamed peak {s['peak_gib']:.2f} GiB in {s['seconds']:.1f} s, whole {w['peak_gib']:.2f} "
                  f"GiB in {w['seconds']:.1f} s: {row['peak_ratio']:.2f}x the peak, {row['above_imports_ratio']:.2f}x "
                  f"above the imports; file {s['file_mb']:.0f} MB; same tensors: {row['same_tensors']}  [{kind_line}]")
            results["rows"].append(row)
            for out in files.values():
                os.remove(out)
    write_results(os.path.join(ROOT, "bench", "results", "export.json"), results)


if __name__ == "__main__":
    main()
