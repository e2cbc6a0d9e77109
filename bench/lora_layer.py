"""One LoRA-wrapped layer, forward + backward: scalora's wrapper (peft's order of operations, and fused:
`use_fused_lora`, what `scalora train` runs) vs peft's vs the bare base layer.

    .venv/bin/python bench/lora_layer.py            # about 1 min on 2 cores

Base kinds: a plain frozen fp32 `nn.Linear` and a bitsandbytes 4-bit NF4 `Linear4bit` (compute in the device's
dtype). The input requires grad (as inside a network), LoRA r=16 with dropout 0.05; the timed call is
`layer(x).sum().backward()`. The four variants of a base kind are interleaved round by round and the median is
reported, so that machine noise hits all of them; overhead = wrapped / bare.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(kind: str, features: int, device: str, dtype):
    import bitsandbytes as bnb
    import peft
    import peft.tuners.lora.bnb  # noqa: F401 (not imported by peft itself)
    import peft.tuners.lora.layer  # noqa: F401
    import torch
    from torch import nn

    from scalora.core.lora import LoraLayer, use_fused_lora

    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)
    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False)
    if kind == "4bit":
        base = bnb.nn.Linear4bit(features, features, bias=False, compute_dtype=dtype, quant_type="nf4",
                                 quant_storage=dtype)
        base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        quant_storage=dtype, module=base)
        base = base.to(device)
        make_peft = lambda b: peft.tuners.lora.bnb.Linear4bit(b, "default", config, r=16,  # noqa: E731
                                                              lora_alpha=32, lora_dropout=0.05)
    else:
        base = dense.to(device=device, dtype=dtype)
        make_peft = lambda b: peft.tuners.lora.layer.Linear(b, "default", config, r=16,  # noqa: E731
                                                            lora_alpha=32, lora_dropout=0.05)
    base.requires_grad_(False)
    ours, fused = LoraLayer(base), LoraLayer(base)
    for layer in (ours, fused):
        layer.update_layer("default", 16, 32, 0.05, True, False)
    use_fused_lora(fused)
    theirs = make_peft(base)
    for layer in (ours, fused, theirs):
        layer.lora_B["default"].weight.data.normal_(0, 0.01)  # a trained adapter, not the zero init
    return {"bare": base, "scalora": ours, "fused": fused, "peft": theirs}


def bench(kind: str, features: int = 2048, tokens: int = 2048, rounds: int = 15) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    layers = build(kind, features, device, dtype)
    x = torch.randn(tokens, features, device=device, dtype=dtype, requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for r in range(rounds + 2):
        for name, layer in layers.items():
            x.grad = None
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer(x).float().sum().backward()
            if gpu:
                torch.cuda.synchronize()
            if r >= 2:  # warm-up rounds
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> dict:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    out = {}
    print(f"{'base':<6} | {'bare ms':>8} | {'scalora ms':>10} | {'fused ms':>8} | {'peft ms':>8} | scalora/bare | "
          "peft/bare | scalora/peft | fused/peft")
    for kind in ("fp32" if not torch.cuda.is_available() else "bf16", "4bit"):
        t = bench("4bit" if kind == "4bit" else "dense")
        out[kind] = t
        print(f"{kind:<6} | {t['bare'] * 1e3:8.2f} | {t['scalora'] * 1e3:10.2f} | {t['fused'] * 1e3:8.2f} | "
              f"{t['peft'] * 1e3:8.2f} | {t['scalora'] / t['bare']:12.3f} | {t['peft'] / t['bare']:9.3f} | "
              f"{t['scalora'] / t['peft']:12.3f} | {t['fused'] / t['peft']:.3f}")
    return out


if __name__ == "__main__":
    main()
