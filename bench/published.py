"""The planner against published QLoRA memory points, on paper (no GPU needed).

    python bench/published.py

1. QLoRA paper (Dettmers et al. 2023): LLaMA-65B fine-tuned on one 48 GB GPU. Recipe from the paper's
   scripts/finetune_guanaco_65b.sh: NF4 + double quantization, bf16, LoRA r=64 on all linear layers (cast to bf16 by
   qlora.py), paged 32-bit AdamW, gradient checkpointing, per-device batch 4, up to 16 + 512 tokens.
2. fsdp_qlora (Answer.AI 2024): Llama-2-70B on two 24 GB GPUs, README command: batch 2, context 2048, bf16,
   LoRA r=64 on q/k/v/gate/up/down, gradient checkpointing, FSDP with CPU offload; the same without offload is what
   the authors needed offload for.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalora.plan import GiB, Settings, estimate, model_shape  # noqa: E402

POINTS = [
    # (label, model, targets, settings, strategy, devices, device memory, published: fits)
    ("QLoRA: LLaMA-65B, 1 x 48 GB", "huggyllama/llama-65b", "all-linear",
     Settings(bits=4, double_quant=True, compute_bytes=2, lora_bytes=2, lora_dropout=0.05,
              optimizer="paged_adamw_32bit", micro_batch=4, seq_len=528, gradient_checkpointing=True),
     "single", 1, 48 * GiB, True),
    ("QLoRA paper's Figure 6 setting: batch 1 x 512", "huggyllama/llama-65b", "all-linear",
     Settings(bits=4, double_quant=True, compute_bytes=2, lora_bytes=2, lora_dropout=0.05,
              optimizer="paged_adamw_32bit", micro_batch=1, seq_len=512, gradient_checkpointing=True),
     "single", 1, 48 * GiB, True),
    ("same, scalora's fp32 adapters + paged 8-bit AdamW", "huggyllama/llama-65b", "all-linear",
     Settings(bits=4, double_quant=True, compute_bytes=2, lora_bytes=4, lora_dropout=0.05,
              optimizer="paged_adamw_8bit", micro_batch=1, seq_len=512, gradient_checkpointing=True),
     "single", 1, 48 * GiB, True),
    ("fsdp_qlora: Llama-2-70B, 2 x 24 GB, FSDP + CPU offload", "meta-llama/Llama-2-70b-hf",
     ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
     Settings(bits=4, double_quant=True, compute_bytes=2, lora_bytes=2, lora_dropout=0.1, optimizer="adamw",
              micro_batch=2, seq_len=2048, gradient_checkpointing=True),
     "fsdp_offload", 2, 24 * GiB, True),
    ("fsdp_qlora without CPU offload (they needed it)", "meta-llama/Llama-2-70b-hf",
     ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
     Settings(bits=4, double_quant=True, compute_bytes=2, lora_bytes=2, lora_dropout=0.1, optimizer="adamw",
              micro_batch=2, seq_len=2048, gradient_checkpointing=True),
     "fsdp", 2, 24 * GiB, False),
]


def main() -> list[tuple[str, float, float, bool, bool]]:
    out = []
    for label, model, targets, st, strategy, n, mem, fits in POINTS:
        e = estimate(model_shape(model, targets, None, 64), st, strategy, n)
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in e.parts.items())
        # the training peak and the loading peak (under FSDP scalora loads the base layer by layer, sharded, as
        # fsdp_qlora does: dist.low_memory_loading)
        verdict = e.fits(mem, st.optimizer.startswith("paged"))
        ok = (verdict != "no") == fits
        print(f"{label}: predicted {e.total / GiB:.1f} GiB per device of {mem / GiB:.0f} GiB, fits: {verdict} "
              f"(published: {'fits' if fits else 'does not fit'}{'' if ok else ' - MISMATCH'})\n"
              f"    {parts}; host {e.cpu_total / GiB:.1f} GiB; scalora's loading peak {e.loading / GiB:.1f} GiB")
        out.append((label, e.total, mem, verdict, fits, e.loading))
    return out


if __name__ == "__main__":
    main()
