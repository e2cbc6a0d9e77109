"""DoRA's product on the dropped input, op by op: what each stock PyTorch form of it costs on this CPU, against the
dense product it stands beside.

    .venv/bin/python bench/dora_ops.py                    # bf16 and fp32, ~15 s on 2 cores
    .venv/bin/python bench/dora_ops.py --dtypes bfloat16

With dropout, DoRA needs the base's product on the dropped input x' besides the base's own output W x (peft:
a second `F.linear`). scalora computes W x' as W x - W d, d the dropped part of x (a fraction p of it): the forward as
`embedding_bag` over the rows of W's transposed copy (`scalora/core/lora.py` `_DroppedProduct`), the input
gradient at the dropped positions with `torch.sparse.sampled_addmm` (fp32: no bf16 CPU kernel). Per layer and
micro-batch a LoRA step runs three of the base's 4-bit products (the forward, the recomputation under gradient
checkpointing, the backward); DoRA adds the transpose and `embedding_bag` twice and the sampled product once.

For SmolLM2-135M's four projection shapes (section 8's job: 8 rows of 60 tokens = 480 tokens, p = 0.05), the median
milliseconds of each form, interleaved round by round, and per shape the sum DoRA's stock forms add per layer
and micro-batch against the three base products. Forms that the fast path does not use are timed too (the
alternatives a kernel would replace): CSR / COO `sparse.mm` (fp32 only: MKL's sparse kernels have no bf16),
`embedding_bag` reading W's transpose as a view (no copy), `embedding_bag`'s own per-sample-weight backward for the
dropped gradient, and the dense product grad @ W read at the dropped positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402 (bench/, the script's folder)
from scalora.core.lora import _dropped_index  # noqa: E402
from scalora.core.quant import bnb  # noqa: E402 (bitsandbytes as scalora imports it)
from scalora.hardware import cpu_features, cpu_kind  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down
TOKENS, P, ROUNDS, REPEATS = 480, 0.05, 5, 8


def forms(out_f: int, in_f: int, dtype: torch.dtype) -> dict:
    """name -> callable, each on the same W, x, dropout mask and output gradient."""
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(out_f, in_f, generator=g) * 0.02
    packed, state = bnb.functional.quantize_4bit(w32, quant_type="nf4", compress_statistics=True)
    state.dtype = dtype
    w = bnb.functional.dequantize_4bit(packed, state)  # (out, in) in dtype
    w_t = w.t().contiguous()
    x = torch.randn(TOKENS, in_f, generator=g).to(dtype)
    keep = torch.rand(TOKENS, in_f, generator=g) >= P
    flat, crow, cols = _dropped_index(keep)  # the positions as scalora's forward finds them
    vals = torch.take(x, flat)
    grad = torch.randn(TOKENS, out_f, generator=g).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's CSR support is in beta
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.shape[0]), (TOKENS, in_f),
                                          check_invariants=False)
    bag = torch.repeat_interleave(torch.arange(TOKENS), crow.diff())
    d32 = (x * ~keep).float()
    d_csr, d_coo, w32_t = d32.to_sparse_csr(), d32.to_sparse(), w.float().t()
    psw_backward = torch.ops.aten._embedding_bag_per_sample_weights_backward
    out = {
        "base: 4-bit product (bitsandbytes)": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
        "base: dense x @ W^T": lambda: torch.mm(x, w.t()),
        "dora: de-quantize W": lambda: bnb.functional.dequantize_4bit(packed, state),
        "dora: W's transposed copy": lambda: torch.empty(in_f, out_f, dtype=dtype).copy_(w.t()),
        "dora: embedding_bag (W d)": lambda: F.embedding_bag(cols, w_t, crow, mode="sum", per_sample_weights=vals,
                                                             include_last_offset=True),
        "dora: sampled_addmm (with its fp32 copies)": lambda: torch.sparse.sampled_addmm(
            pattern, grad.float(), w_t.t().float(), beta=0.0),
        "alt: grad @ W read at the dropped positions": lambda: torch.mm(grad, w).take(flat),
        "alt: embedding_bag's per-sample-weight backward": lambda: psw_backward(grad, w_t, cols, crow[:-1], bag, 0, -1),
        "alt: embedding_bag on W^T as a view": lambda: F.embedding_bag(
            cols, w.t(), crow, mode="sum", per_sample_weights=vals, include_last_offset=True),
        "alt: dense x' @ W^T beside x @ W^T (stacked)": lambda: torch.mm(torch.cat([x, x * keep]), w.t()),
    }
    if dtype == torch.float32:
        out["alt: sparse.mm(CSR d, W^T view) (fp32)"] = lambda: torch.sparse.mm(d_csr, w32_t)
        out["alt: mm(CSR d, W^T contiguous) (fp32)"] = lambda: torch.mm(d_csr, w32_t.contiguous())
        out["alt: sparse.mm(COO d, W^T) (fp32)"] = lambda: torch.sparse.mm(d_coo, w32_t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    feats = cpu_features()
    print(f"CPU kind: {cpu_kind(feats)} ({' '.join(feats['flags'])}), {torch.get_num_threads()} threads, "
          f"{TOKENS} tokens, p={P}; median ms of {ROUNDS} x {REPEATS} calls, interleaved")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for out_f, in_f in SHAPES:
            fs = forms(out_f, in_f, dtype)
            times: dict[str, list[float]] = {k: [] for k in fs}
            for _ in range(ROUNDS):
                for k, f in fs.items():
                    times[k] += timed(f, REPEATS)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"\n{name}, W {out_f} x {in_f} (out x in)")
            dense = ms["base: dense x @ W^T"]
            for k, v in ms.items():
                print(f"  {k:<50} {v:8.3f} ms  {v / dense:6.2f}x the dense product")
            lora = 3 * ms["base: 4-bit product (bitsandbytes)"]
            extra = 2 * (ms["dora: W's transposed copy"] + ms["dora: embedding_bag (W d)"]) \
                + ms["dora: sampled_addmm (with its fp32 copies)"]
            print(f"  per layer and micro-batch: LoRA's three base products {lora:.3f} ms; DoRA's stock forms add "
                  f"{extra:.3f} ms ({(lora + extra) / lora:.2f}x the base products' time)")


if __name__ == "__main__":
    main()
