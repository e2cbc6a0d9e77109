"""The `scalora` command with TBB's scalable allocator (its default, scalora/malloc.py) against glibc's malloc
(SCALORA_MALLOC=system): the same `scalora train` job, interleaved, tokens/s and peak resident memory side by side.

Each run is its own process; its peak is the kernel's (wait4's ru_maxrss), its tokens/s the summary's (training
alone; validation holds one example and checkpoints are off, as in bench/real.py). Default job:
configs/smollm2-135m.yaml (`make fetch-smollm2` first); `--config configs/tiny.yaml` runs on the builtin tiny model.

    .venv/bin/python bench/malloc.py                           # SmolLM2-135M, 30 steps, 2 repeats, dtype auto
    .venv/bin/python bench/malloc.py --config configs/tiny.yaml --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from common import write_results  # noqa: E402
from real import run_measured  # noqa: E402


def one_run(config: str, overrides: list[str], allocator: str, out: str, log_dir: str) -> dict:
    from scalora import malloc

    # the command preloads its allocator itself (other preloads kept)
    env = malloc.without_tbb(dict(os.environ, SCALORA_MALLOC=allocator, HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                                  BENCH_LOG_DIR=log_dir))
    cmd = [sys.executable, "-m", "scalora", "train", config, *overrides, "train.eval_every=0", "train.save_every=0",
           "data.max_eval_examples=1", "data.max_eval_generate=0", "log.report_to=none", "train.overwrite=true",
           f"train.output_dir={out}"]
    _, peak = run_measured(cmd, env, f"{allocator} {os.path.basename(out)}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"malloc": s["malloc"], "tokens_per_s": s["tokens_per_s"], "peak_gib": round(peak, 3),
            "dtype": s["compute_dtype"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "malloc.json"))
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/scalora/bench/malloc"),
                    help="the runs' folders and logs (kept: a failed run's log names its file)")
    args = ap.parse_args()
    from scalora.hardware import cpu_features, cpu_kind

    feats = cpu_features()
    kind = f"{cpu_kind(feats)} ({', '.join(feats['flags'])})"
    overrides = [f"train.max_steps={args.steps}", f"model.dtype={args.dtype}"]
    runs: dict[str, list[dict]] = {"system": [], "tbb": []}
    print(f"CPU kind: {kind}; {args.config}, {args.steps} steps, {args.repeats} repeats, interleaved", flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    for r in range(args.repeats):
        for allocator in ("system", "tbb"):  # interleaved: a slow moment of a shared machine hits both
            row = one_run(args.config, overrides, allocator, os.path.join(args.workdir, f"{allocator}-{r}"),
                          args.workdir)
            runs[allocator].append(row)
            print(f"  {allocator:<6} repeat {r}: {row}", flush=True)
    med = {a: {k: statistics.median(x[k] for x in rows) for k in ("tokens_per_s", "peak_gib")}
           for a, rows in runs.items()}
    speed = med["tbb"]["tokens_per_s"] / med["system"]["tokens_per_s"]
    memory = med["tbb"]["peak_gib"] / med["system"]["peak_gib"]
    print(f"{'cpu kind':<40} | allocator | tokens/s (median) | peak GiB (median)")
    for a in ("system", "tbb"):
        print(f"{kind:<40} | {runs[a][0]['malloc']:<9} | {med[a]['tokens_per_s']:17.1f} | {med[a]['peak_gib']:.3f}")
    print(f"tbbmalloc / glibc: {speed:.2f}x the tokens/s, {memory:.2f}x the peak ({runs['tbb'][0]['dtype']})")
    write_results(args.out, {"cpu_kind": kind, "config": args.config, "steps": args.steps, "runs": runs,
                             "median": med, "speed_ratio": speed, "peak_ratio": memory, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
