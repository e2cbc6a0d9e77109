"""q/k/v's LoRA on one shared input: lora_A as one matmul (`SharedDropout`, fused layers) against three, side by side.

    .venv/bin/python bench/lora_group.py        # ~20 s

Three 4-bit NF4 layers reading the same input (4 x 512 tokens; q hidden -> hidden, k and v hidden -> hidden / 2),
LoRA r=16 with the fast, shared dropout 0.05 and fused arithmetic, as `scalora train` sets them up; forward and
backward of the three, medians of 30, the two variants interleaved round by round.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scalora.core.lora as L  # noqa: E402
from common import timed  # noqa: E402 (bench/, the script's folder)
from scalora.hardware import cpu_features  # noqa: E402


def layer(fin: int, fout: int) -> L.LoraLayer:
    import bitsandbytes as bnb

    dense = nn.Linear(fin, fout, bias=False)
    base = bnb.nn.Linear4bit(fin, fout, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4", module=base,
                                    compress_statistics=True)
    wrapped = L.LoraLayer(base.to("cpu"))
    wrapped.update_layer("default", 16, 32, 0.05, True, False)
    nn.init.normal_(wrapped.lora_B["default"].weight, std=0.02)
    return wrapped


def main() -> None:
    print(f"CPU: {cpu_features()}, {torch.get_num_threads()} threads, fp32")
    for hidden in (256, 512, 768):  # the throughput bench's 4m, 30m, 120m widths
        torch.manual_seed(0)
        parent = nn.Module()
        parent.q_proj, parent.k_proj, parent.v_proj = layer(hidden, hidden), layer(hidden, hidden // 2), \
            layer(hidden, hidden // 2)
        parent.train()
        L.use_fast_dropout(parent), L.use_fused_lora(parent), L.share_dropout_masks(parent)
        x = torch.randn(4, 512, hidden, requires_grad=True)

        def step():
            (parent.q_proj(x).sum() + parent.k_proj(x).sum() + parent.v_proj(x).sum()).backward()

        rows: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for grouped in (True, False):
                L.SharedDropout.group_lora_a = grouped
                rows[grouped] += timed(step, 10)
        L.SharedDropout.group_lora_a = True
        med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
        print(f"hidden {hidden}: one lora_A matmul {med[True]:.2f} ms, three {med[False]:.2f} ms, "
              f"ratio {med[True] / med[False]:.2f}", flush=True)


if __name__ == "__main__":
    main()
