"""LoRA dropout on the CPU: torch's `nn.Dropout` against scalora's `FastDropout` (train.fast_dropout), side by side.

    .venv/bin/python bench/dropout.py

For the input of each LoRA layer at the throughput bench's sizes (micro-batch 4 x 512 tokens; widths: hidden and
intermediate), forward and backward of dropout followed by the LoRA A matmul (r=16), and the base layer's matmul
for scale; medians of 30, interleaved. Also the kept fraction over the inputs (expected 1 - p = 0.95).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402 (bench/, the script's folder)
from scalora.core.lora import FastDropout  # noqa: E402
from scalora.hardware import cpu_features  # noqa: E402

WIDTHS = {"4m": (256, 688), "30m": (512, 1376), "120m": (768, 2048)}


def main() -> None:
    torch.manual_seed(0)
    print(f"CPU: {cpu_features()}, {torch.get_num_threads()} threads, fp32, p=0.05, x: 4 x 512 x width")
    print("size  | width | torch dropout+A fwd/bwd ms | FastDropout ms | ratio | base matmul ms | kept (torch / fast)")
    for size, widths in WIDTHS.items():
        for width in widths:
            x = torch.randn(4, 512, width, requires_grad=True)
            a = torch.randn(16, width, requires_grad=True)
            w = torch.randn(width, width)
            plain, fast = nn.Dropout(0.05).train(), FastDropout(0.05).train()
            rows = {"torch": [], "fast": [], "base": []}
            for _ in range(3):  # interleaved rounds
                rows["torch"] += timed(lambda: (plain(x) @ a.T).sum().backward(), 10)
                rows["fast"] += timed(lambda: (fast(x) @ a.T).sum().backward(), 10)
                rows["base"] += timed(lambda: x.detach() @ w.T, 10)
            med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
            with torch.no_grad():
                kept = ((plain(x) != 0).float().mean().item(), (fast(x) != 0).float().mean().item())
            print(f"{size:5} | {width:5} | {med['torch']:26.2f} | {med['fast']:14.2f} | {med['fast'] / med['torch']:5.2f} "
                  f"| {med['base']:14.2f} | {kept[0]:.4f} / {kept[1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
