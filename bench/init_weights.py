"""What PiSSA, OLoRA and LoftQ initialisation do to a quantized base, on a real model.

SmolLM2-135M-Instruct (the GGUF file `make fetch-smollm2` fetches, converted once into a plain fp32 folder; its
weights therefore sit on Q4_1's grid already, which a model fetched in bf16 would not), LoRA r=16, alpha=32 on every
linear layer as configs/smollm2-135m.yaml trains it, the base quantized to NF4 (double quantization, fp32 compute)
or to 8 bits, with each initialisation. Measured against the full-precision model, at initialisation (before any
training, so the numbers are the initialisation's alone):

- weight error: sqrt(sum over the wrapped layers of ||W - (Q + s B A)||^2) / sqrt(sum ||W||^2), Q the de-quantized
  base as the run holds it (for PiSSA / OLoRA the quantized residual);
- logits error: ||logits - logits_fp32|| / ||logits_fp32|| over 4 x 96 tokens of English text, and the share of
  positions whose top-1 token is the fp32 model's;
- conversion gap (PiSSA / OLoRA): the trained adapter converted to plain LoRA on the original base and used on the
  plain quantized base differs from the trained model by Q(W_res) + s B0 A0 - Q(W) whatever the training did; the
  logits difference between the model at initialisation and the plain quantized model is that gap;
- seconds to add the adapter (the SVDs / QRs and reading the original weights), against plain LoRA's.

    .venv/bin/python bench/init_weights.py            # NF4 and 8-bit
    .venv/bin/python bench/init_weights.py --bits 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from common import write_results  # noqa: E402
from real import SMOLLM2  # noqa: E402

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made books cheaper "
        "and faster to produce. Within fifty years, presses were running in more than two hundred cities across "
        "Europe, and the number of printed books grew into the millions. Scholars could compare editions, "
        "merchants kept better records, and news travelled further than ever before. Today, the same idea of "
        "reproducing text cheaply lives on in every screen and printer we use, from newspapers to the web pages "
        "that carry an encyclopedia to anyone with a connection. Learning to read became common, and with it "
        "came schools, libraries and a public that argued about ideas in pamphlets and letters.")

INITS = [True, "pissa", "pissa_niter_4", "olora", "loftq"]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import scalora
    from scalora.core import quant
    from scalora.core.lora import LoraLayer
    from scalora.hardware import cpu_features, cpu_kind
    from scalora.model import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "init-weights.json"))
    args = ap.parse_args()
    if not os.path.isfile(SMOLLM2):
        sys.exit(f"{SMOLLM2} is missing: run `make fetch-smollm2` first")
    features = cpu_features()
    kind = f"{cpu_kind(features)} ({', '.join(features['flags'])}; {os.cpu_count()} cores)"
    torch.manual_seed(0)
    path = resolve_model_path(SMOLLM2)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :384].reshape(4, -1)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    weights = {n: m.weight.detach() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    del full

    def quantized(bits: int):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if bits == 4 else \
            BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                    dtype=torch.float32).eval()

    rows = []
    print(f"SmolLM2-135M-Instruct, r=16 alpha=32 all-linear, CPU kind {kind}")
    print(f"{'base':>5} {'init':>14} {'weight err':>11} {'logits err':>11} {'top-1 same':>10} "
          f"{'conv. gap':>10} {'init s':>7}")
    for bits in args.bits:
        plain_logits = None
        for init in INITS:
            extra = {"loftq_config": {"loftq_bits": bits, "loftq_iter": 1}} if init == "loftq" else {}
            base = quantized(bits)
            t = time.perf_counter()
            model = scalora.get_peft_model(base, scalora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                    init_lora_weights=init, **extra))
            seconds = time.perf_counter() - t
            num = den = 0.0
            for name, m in model.named_modules():
                if isinstance(m, LoraLayer):
                    w = weights[name.removeprefix("base_model.model.")]
                    got = quant.dense_weight(m.base_layer) + m.delta_weight("default")
                    num += (w - got).double().square().sum().item()
                    den += w.double().square().sum().item()
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            if init is True:
                plain_logits = logits
            err = ((logits - ref).norm() / ref.norm()).item()
            same = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            gap = ((logits - plain_logits).norm() / ref.norm()).item() if init in ("pissa", "pissa_niter_4",
                                                                                   "olora") else None
            row = dict(bits=bits, init=str(init), weight_error=(num / den) ** 0.5, logits_error=err,
                       top1_same=same, conversion_gap=gap, init_seconds=seconds)
            rows.append(row)
            label = "nf4" if bits == 4 else "int8"
            print(f"{label:>5} {str(init):>14} {row['weight_error']:11.4f} {err:11.4f} {same:10.3f} "
                  f"{'' if gap is None else f'{gap:.4f}':>10} {seconds:7.1f}", flush=True)
            del model, base
    write_results(args.out, {"cpu_kind": kind, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)",
                             "rows": rows})


if __name__ == "__main__":
    main()
