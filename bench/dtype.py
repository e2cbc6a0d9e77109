"""Compute dtype on this CPU, end to end: the same QLoRA run in fp32 and in bf16, side by side.

    .venv/bin/python bench/dtype.py                        # 4m and 30m Llama, 2 repeats, ~10 min on 2 cores
    .venv/bin/python bench/dtype.py --sizes 4m --repeats 1

`model.dtype: auto` picks the compute dtype from the CPU's features (scalora/hardware.py); this is the measurement
that rule rests on. Each run is `scalora train` in its own process on a Llama built here (bench/throughput.py's
models and variable-length data), 4-bit NF4 base, LoRA r=16 on all linear layers, gradient checkpointing, the two
dtypes interleaved. Reported: a 2048 x 2048 matmul in each dtype, useful tokens/s after a warm-up step, the training
peak, and the training loss of every step in both dtypes (the largest relative difference is the tolerance the
bf16 choice is held to). Results go to bench/results/dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import write_results  # noqa: E402

STEPS = {"4m": 12, "30m": 6, "120m": 3, "smol135m": 2}
# The instruction-set caps a process can be started with (tests/test_isa_levels.py): set, they make one CPU run a
# lower kind's kernels, and the results are reported under that kind, not the CPU's own.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def matmul_gflops(dtype, threads: int, n: int = 2048, seconds: float = 1.5) -> float:
    import torch

    torch.set_num_threads(threads)
    x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x @ y
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        x @ y
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def run_one(size: str, dtype: str, model: str, data: str, threads: int) -> dict:
    from throughput import RUN

    G, micro, length, _ = RUN[size]
    out = f"/tmp/scalora-dtype-{size}-{dtype}"
    args = [f"model.name_or_path={model}", f"model.dtype={dtype}", "model.gradient_checkpointing=true",
            f"data.train_file={data}", "data.validation_fraction=0", f"data.max_length={length}",
            "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0.05", f"train.global_batch_size={G}",
            f"train.micro_batch_size={micro}", f"train.max_steps={STEPS[size] + 1}", "train.lr=2e-4",
            "train.schedule=constant", "train.warmup_ratio=0", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "data.max_eval_generate=0", "log.report_to=none", f"train.output_dir={out}",
            "train.overwrite=true", f"dist.threads_per_process={threads}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "scalora", "train", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{size} {dtype} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "train/loss" in line]
    tokens = [b["train/tokens"] - a["train/tokens"] for a, b in zip(rows, rows[1:])]  # step 1 is the warm-up
    seconds = [t / r["train/tokens_per_s"] for t, r in zip(tokens, rows[1:])]
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"tokens_per_s": sum(tokens) / sum(seconds), "peak_gb": summary["peak_memory_gb"],
            "losses": [r["train/loss"] for r in rows], "compute_dtype": summary.get("compute_dtype")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4m,30m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "dtype.json"))
    a = ap.parse_args()

    import torch

    from scalora.hardware import cpu_features
    from throughput import build_data, build_model

    feats = cpu_features()
    caps = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    mm = {d: matmul_gflops(getattr(torch, d), a.threads) for d in ("float32", "bfloat16")}
    print(f"CPU: {feats['model']} | features: {', '.join(feats['flags']) or 'none of avx2/avx512/amx'} | "
          f"{a.threads} threads | instruction sets capped: {caps or 'no'}", flush=True)
    print(f"2048x2048 matmul: fp32 {mm['float32']:.0f} GFLOP/s, bf16 {mm['bfloat16']:.0f} GFLOP/s "
          f"(bf16 / fp32 = {mm['bfloat16'] / mm['float32']:.2f})", flush=True)
    data = build_data()
    results: dict = {"cpu": feats, "isa_caps": caps, "threads": a.threads, "matmul_gflops": mm, "sizes": {}}
    print("\nsize  | dtype    | useful tok/s | peak GiB | bf16 / fp32 | max rel. loss diff")
    for size in a.sizes.split(","):
        model = build_model(size)
        runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
        for rep in range(a.repeats):
            for dtype in (("float32", "bfloat16") if rep % 2 == 0 else ("bfloat16", "float32")):
                runs[dtype].append(run_one(size, dtype, model, data, a.threads))
        med = {d: statistics.median(r["tokens_per_s"] for r in rs) for d, rs in runs.items()}
        peak = {d: statistics.median(r["peak_gb"] for r in rs) for d, rs in runs.items()}
        l32, l16 = runs["float32"][0]["losses"], runs["bfloat16"][0]["losses"]
        loss_diff = max(abs(x - y) / abs(x) for x, y in zip(l32, l16))
        ratio = med["bfloat16"] / med["float32"]
        results["sizes"][size] = {"runs": runs, "tokens_per_s": med, "peak_gb": peak, "bf16_over_fp32": ratio,
                                  "max_rel_loss_diff": loss_diff}
        for d in runs:
            print(f"{size:<5} | {d:<8} | {med[d]:12.1f} | {peak[d]:8.3f} | "
                  f"{(f'{ratio:11.2f}' if d == 'bfloat16' else ' ' * 11)} | "
                  f"{(f'{loss_diff:.2%}' if d == 'bfloat16' else '')}", flush=True)
    write_results(a.out_json, results)


if __name__ == "__main__":
    main()
