"""The loss at a large vocabulary: the plain path (whole fp32 logits) against scalora's chunked one, side by side.

    .venv/bin/python bench/loss.py                  # vocabulary 128,256 (Llama 3), hidden 1024, 512 / 2048 / 4096 tokens
    .venv/bin/python bench/loss.py --tokens 2048 --repeats 3

Each measurement is its own process (a fresh resident-memory peak, glibc's caching off so that the resident peak is
the live one): head + cross-entropy forward and backward, gradients to the hidden states (as in LoRA training, where
the head is frozen). Reported: seconds (median), peak memory above the inputs, both ratios chunked / plain, and the
largest difference in loss and gradient. Results go to bench/results/loss.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import emit_result, run_worker, write_results  # noqa: E402 (bench/, the script's folder)


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def worker(a) -> None:
    import torch
    import torch.nn.functional as F

    from scalora.dist import reset_peak_memory
    from scalora.loss import CHUNK_BYTES, ChunkedLinearCrossEntropy

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.tokens, a.hidden, generator=g, requires_grad=True)
    weight = torch.randn(a.vocab, a.hidden, generator=g) * 0.02
    labels = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    labels[::5] = -100
    reset_peak_memory()
    before = _rss_peak()
    t0 = time.perf_counter()
    if a.path == "plain":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
    else:
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, None, labels, max(1, CHUNK_BYTES // (4 * a.vocab)))
    loss.backward()
    seconds = time.perf_counter() - t0
    emit_result({"seconds": seconds, "peak_bytes": _rss_peak() - before, "loss": loss.item(),
                 "grad": hidden.grad[:64].tolist()})


def measure(path: str, tokens: int, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--tokens", str(tokens), "--vocab", str(a.vocab),
           "--hidden", str(a.hidden), "--threads", str(a.threads)]
    return run_worker(cmd, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), f"{path} {tokens}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker")
    ap.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "loss.json"))
    a = ap.parse_args()
    if a.worker:
        a.path, a.tokens = a.worker, int(a.tokens)
        return worker(a)

    from scalora.hardware import cpu_features

    feats = cpu_features()
    print(f"CPU: {feats['model']} ({', '.join(feats['flags'])}), {a.threads} threads, fp32 | vocabulary {a.vocab:,}, "
          f"hidden {a.hidden}", flush=True)
    print("tokens | path    | seconds | peak GiB | whole fp32 logits GiB | chunked / plain: time, memory | "
          "max |loss diff| rel, max |grad diff|")
    results = {"cpu": feats, "vocab": a.vocab, "hidden": a.hidden, "threads": a.threads, "runs": {}}
    for tokens in (int(t) for t in a.tokens.split(",")):
        runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
        for rep in range(a.repeats):
            for path in (("plain", "chunked") if rep % 2 == 0 else ("chunked", "plain")):
                runs[path].append(measure(path, tokens, a))
        sec = {p: statistics.median(r["seconds"] for r in rs) for p, rs in runs.items()}
        mem = {p: statistics.median(r["peak_bytes"] for r in rs) for p, rs in runs.items()}
        p, c = runs["plain"][0], runs["chunked"][0]
        loss_diff = abs(p["loss"] - c["loss"]) / abs(p["loss"])
        grad_diff = max(abs(x - y) for rp, rc in zip(p["grad"], c["grad"]) for x, y in zip(rp, rc))
        results["runs"][tokens] = {"seconds": sec, "peak_bytes": mem, "loss_rel_diff": loss_diff,
                                   "grad_max_diff": grad_diff}
        logits = tokens * a.vocab * 4 / 2**30
        for path in runs:
            ratio = (f"{sec['chunked'] / sec['plain']:.2f}x, {mem['chunked'] / mem['plain']:.2f}x"
                     if path == "chunked" else "")
            diffs = f"{loss_diff:.1e}, {grad_diff:.1e}" if path == "chunked" else ""
            print(f"{tokens:6d} | {path:<7} | {sec[path]:7.2f} | {mem[path] / 2**30:8.2f} | {logits:21.2f} | "
                  f"{ratio:29} | {diffs}", flush=True)
    write_results(a.out_json, results)


if __name__ == "__main__":
    main()
