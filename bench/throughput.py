"""Training throughput and memory: scalora against a plain peft loop and the transformers Trainer, side by side.

    .venv/bin/python bench/throughput.py                       # ~4M / ~30M / ~120M Llama, about 15 min on 2 cores
    .venv/bin/python bench/throughput.py --sizes 4m --repeats 1   # a quick look
    python3 bench/throughput.py --gpu                           # GPU mode: a ~1.1B Llama at sequence 2048, bf16

GPU mode (`--gpu`, run by bench/gpu.sh): the 1b size (TinyLlama's shape, vocabulary 32,000, random weights saved and
reloaded in 4-bit NF4), examples of ~1,400-2,000 tokens cut at 2,048, one repeat, and one more stack, scalora-best:
packed rows plus the GPU levers (liger-kernel's RMSNorm / RoPE / SwiGLU and fused linear cross-entropy, compiled
decoder layers). A stack that fails is reported as failed and the others still run. MFU is against the bf16 matmul
peak measured in the same run (the spec sheet's peak is printed beside it).

Every measurement runs in its own process (fresh peak memory), and the three stacks are interleaved within each
repeat (order rotated) so that machine noise hits all of them. Same model (Llama built here, saved with
save_pretrained, loaded 4-bit NF4 through from_pretrained), same LoRA (r=16, alpha 32, dropout 0.05, all linear
layers), same tokenized examples, same global and micro batch, same optimizer (torch AdamW), gradient checkpointing
on, same thread count. The data set has variable lengths (log-normal, median ~90 tokens, long tail, cut at
max_length): the baselines pad each micro-batch to its longest example, as DataCollatorForSeq2Seq does; scalora runs
once the same way (`pad`) and once packed (`pack`, its data.packing). scalora's stacks run with the allocator the
`scalora` command preloads (TBB's), the others with glibc's malloc, as each one's users run them. Stacks beyond the
default three (`--stacks`): DoRA (`scalora-dora-*`, `peft-dora`), fp32 scalora (`*-fp32`), bf16 scalora on any CPU
kind (`scalora-pad-bf16`, `scalora-dora-pad-bf16`), the peft loop in bf16 (`peft-bf16`, `peft-dora-bf16`), and the
levers' ablations (STACKS below). Reported: useful (non-padding) tokens per second after a warm-up step, the
training peak (resident memory after the model has loaded; CUDA max allocated on a GPU), the step's matmul FLOPs
over the machine's measured matmul peak, and a profile summary of one scalora step.
Results go to bench/results/throughput.json and a table on stdout; BENCHMARKS.md summarizes a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import emit_result, run_worker, write_results  # noqa: E402 (bench/, the script's folder)

SIZES = {  # Llama shapes; vocabulary of the builtin tokenizer (~220 words), untied head
    "4m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    "30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8,
                num_key_value_heads=4),
    "120m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=19, num_attention_heads=12,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B's shape: 1.10B parameters
    "smol135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M's shape
}
RUN = {  # (global batch, micro batch, max_length, measured steps): the bigger the model, the fewer tokens
    "4m": (16, 4, 512, 4),
    "30m": (16, 4, 512, 3),
    "120m": (8, 4, 256, 2),
    "1b": (16, 4, 2048, 3),
    "smol135m": (16, 8, 128, 2),  # the real-model job's batch (issue 27): 16 rows of up to 128 tokens
}
BEST = ["model.liger_kernel=true", "train.chunked_loss=liger", "model.compile=true"]  # scalora-best: GPU levers
PACK, COMPILE, DORA = ["data.packing=true"], ["model.compile=true"], ["lora.use_dora=true"]
KEEP = ["model.keep_base_outputs=true"]
# peft's LoRA path: torch's dropout, a mask per layer, peft's order of operations
TORCH_DROPOUT = ["train.fast_dropout=false", "train.shared_dropout=false", "train.fused_lora=false"]
STACKS = {  # name: (which loop, run-config overrides on top of the shared settings)
    "scalora-pad": ("scalora", []), "scalora-pack": ("scalora", PACK), "scalora-compile-pad": ("scalora", COMPILE),
    "scalora-pad-torchdrop": ("scalora", TORCH_DROPOUT), "scalora-pack-torchdrop": ("scalora", PACK + TORCH_DROPOUT),
    "scalora-pack-fastdrop": ("scalora", PACK + ["train.shared_dropout=false", "train.fused_lora=false"]),
    "scalora-pack-unfused": ("scalora", PACK + ["train.fused_lora=false"]),
    "scalora-pack-sdpa": ("scalora", PACK + ["model.attn_implementation=sdpa"]),
    "scalora-pad-sdpa": ("scalora", ["model.attn_implementation=sdpa"]),
    "scalora-compile": ("scalora", PACK + COMPILE), "scalora-best": ("scalora", PACK + BEST),
    "peft": ("peft", []), "peft-pack": ("peft", PACK), "trainer": ("trainer", []),
    # DoRA (lora.use_dora): scalora's against its own LoRA step and against the peft loop with use_dora=True
    "scalora-dora-pad": ("scalora", DORA), "scalora-dora-pack": ("scalora", PACK + DORA),
    "peft-dora": ("peft", DORA),
    # the same in fp32, the dtype of the peft loop on a CPU (model.dtype auto picks bf16 on AMX and AMD AVX512-BF16
    # CPUs from hidden 512)
    "scalora-pad-fp32": ("scalora", ["model.dtype=float32"]),
    "scalora-dora-pad-fp32": ("scalora", DORA + ["model.dtype=float32"]),
    "scalora-dora-pack-fp32": ("scalora", PACK + DORA + ["model.dtype=float32"]),
    "peft-dora-pack": ("peft", PACK + DORA),  # the peft DoRA loop on scalora's packed rows (as peft-pack)
    # model.keep_base_outputs: the 4-bit base's outputs kept through checkpointing instead of recomputed
    "scalora-keep-pad-fp32": ("scalora", KEEP + ["model.dtype=float32"]),
    "scalora-dora-keep-pad-fp32": ("scalora", KEEP + DORA + ["model.dtype=float32"]),
    "scalora-keep-pad": ("scalora", KEEP), "scalora-dora-keep-pad": ("scalora", KEEP + DORA),
    # the peft loop in bf16 as TRL / the Trainer run it with bf16=True on a CPU: the base loaded and computed in bf16,
    # the forward under torch.autocast(bf16), peft's adapters in fp32; scalora's bf16 rows are scalora-pad and
    # scalora-dora-pad (model.dtype auto on AMX and AMD AVX512-BF16 CPUs), or scalora's *-bf16 stacks, bf16 on any
    # CPU kind
    "peft-bf16": ("peft", ["model.dtype=bfloat16"]), "peft-dora-bf16": ("peft", DORA + ["model.dtype=bfloat16"]),
    "scalora-pad-bf16": ("scalora", ["model.dtype=bfloat16"]),
    "scalora-dora-pad-bf16": ("scalora", DORA + ["model.dtype=bfloat16"]),
}
LORA = dict(r=16, alpha=32, dropout=0.05)
LR = 2e-4


def cache_dir() -> Path:
    return Path(os.environ.get("SCALORA_CACHE", Path.home() / ".cache" / "scalora")) / "bench"


def build_model(size: str) -> str:
    """A randomly initialized Llama of the given size, saved once with save_pretrained (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalora.builtin import build_tokenizer

    path = cache_dir() / f"llama-{size}"
    if (path / "config.json").is_file():
        return str(path)
    tok = build_tokenizer()
    shape = {"vocab_size": len(tok), **SIZES[size]}  # the builtin tokenizer's words, or a real model's vocabulary
    cfg = LlamaConfig(**{"max_position_embeddings": max(1024, RUN[size][2]), "tie_word_embeddings": False,
                         "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id, **shape})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return str(path)


def build_data(n: int = 800, seed: int = 0, long: bool = False) -> str:
    """Instruction records with log-normal lengths (median ~90 tokens, 10% above ~250), from the builtin vocabulary;
    long: ~1,400-2,000 words each (GPU mode, sequence 2048)."""
    from scalora.builtin import _TOPIC_WORDS, _sentence

    path = cache_dir() / f"varlen-{n}-{seed}{'-long' if long else ''}.jsonl"
    if path.is_file():
        return str(path)
    rng = random.Random(seed)
    topics = sorted(_TOPIC_WORDS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.randint(1400, 2000) if long else int(min(900, math.exp(rng.gauss(math.log(70), 0.8))))
            text, topic = "", rng.choice(topics)
            while len(text.split()) < words:
                text += _sentence(rng, topic) + " "
            answer = " ".join(_sentence(rng, topic) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"instruction": "Continue the text on the same topic.", "input": text.strip(),
                                "output": answer}) + "\n")
    return str(path)


# --- workers: one measurement per process ---------------------------------------------------------------------
def _peak() -> float:
    from scalora.dist import peak_memory_bytes

    return peak_memory_bytes() / 2**30


def _reset_peak() -> None:
    from scalora.dist import reset_peak_memory

    reset_peak_memory()


def _run_config(a):
    from scalora.config import load_config

    G, micro, length, steps = RUN[a.size]
    return load_config(None, [
        f"model.name_or_path={a.model}", f"data.train_file={a.data}", "data.validation_fraction=0",
        f"data.max_length={length}", "data.packing=false",
        f"lora.r={LORA['r']}", f"lora.lora_alpha={LORA['alpha']}", f"lora.lora_dropout={LORA['dropout']}",
        f"train.global_batch_size={G}", f"train.micro_batch_size={micro}", f"train.max_steps={steps + 1}",
        f"train.lr={LR}", "train.schedule=constant", "train.warmup_ratio=0", "train.log_every=1",
        "train.eval_every=0", "train.save_every=0", "data.max_eval_generate=0", "log.report_to=none",
        f"train.output_dir={a.out}", "train.overwrite=true", "train.max_grad_norm=1.0",
        *STACKS[a.stack][1]])


def _examples(cfg, tokenizer):
    from scalora.data import build_datasets

    return build_datasets(cfg.data, tokenizer, cfg.train.seed).train


def worker_scalora(a) -> dict:
    from scalora.train import train

    train(_run_config(a))
    rows = [json.loads(line) for line in open(os.path.join(a.out, "metrics.jsonl"))]
    rows = [r for r in rows if "train/tokens" in r]
    tokens = [b["train/tokens"] - p["train/tokens"] for p, b in zip(rows, rows[1:])]  # drop step 1: warm-up
    seconds = [t / r["train/tokens_per_s"] for t, r in zip(tokens, rows[1:])]
    summary = json.load(open(os.path.join(a.out, "summary.json")))
    return {"tokens": sum(tokens), "seconds": sum(seconds), "peak_gb": summary["peak_memory_gb"],
            "warmup_s": rows[0]["train/tokens"] / rows[0]["train/tokens_per_s"],  # step 1: compiles, if any
            "step_s": seconds, "dtype": summary["compute_dtype"]}  # auto: bf16 on AMX / AMD AVX512-BF16, h >= 512


def _hf_setup(a):
    """The base and LoRA as peft users set them up: BitsAndBytesConfig, prepare_model_for_kbit_training,
    get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = _run_config(a)
    bf16 = torch.cuda.is_available() or cfg.model.dtype == "bfloat16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.train.seed)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM",
                                             use_dora=cfg.lora.use_dora))
    return cfg, tok, model, device


def _pad(rows, pad_id, device):
    import torch

    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _order(step: int, n: int, G: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: the same batches as scalora's loop draws, so that every stack pads
    (and computes) the same micro-batches."""
    from scalora.train import global_batch

    return global_batch(step, n, G, seed)


def worker_peft(a) -> dict:
    """A plain peft training loop: padded micro-batches, loss / accumulation, clip, AdamW."""
    import torch

    cfg, tok, model, device = _hf_setup(a)
    examples = _examples(cfg, tok)
    G, micro, _, steps = RUN[a.size]
    # bf16 on a CPU: autocast, as the Trainer does with bf16=True (on a GPU the base is bf16 already)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if device == "cpu" and cfg.model.dtype == "bfloat16" \
        else contextlib.nullcontext()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    _reset_peak()
    tokens = seconds = 0.0
    if cfg.data.packing:  # peft-pack: scalora's packed rows, split by their position ids (transformers' own mask)
        from scalora.data import collate

        model.config.use_cache = False

        def make_batch(rows):
            return {k: v.to(device) for k, v in collate(rows, tok.pad_token_id, block_mask=False).items()}
    else:
        def make_batch(rows):
            return _pad(rows, tok.pad_token_id, device)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch_rows = [examples[i] for i in _order(step, len(examples), G, cfg.train.seed)]
        for i in range(0, G, micro):
            rows = batch_rows[i:i + micro]
            with autocast:
                out = model(**make_batch(rows))
            (out.loss / (G // micro)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step > 0:
            tokens += sum(len(r["input_ids"]) for r in batch_rows)
            seconds += time.perf_counter() - t0
    # the compute dtype (prepare_model_for_kbit_training keeps the embeddings, norms and head in fp32 under autocast)
    dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else str(model.dtype).removeprefix("torch.")
    return {"tokens": tokens, "seconds": seconds, "peak_gb": _peak(), "dtype": dtype}


def worker_trainer(a) -> dict:
    """transformers' Trainer as most users run it: DataCollatorForSeq2Seq padding, gradient accumulation."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    cfg, tok, model, device = _hf_setup(a)
    examples = _examples(cfg, tok)
    G, micro, _, steps = RUN[a.size]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    step_tokens = [sum(len(examples[i]["input_ids"]) for i in _order(k, len(examples), G, cfg.train.seed))
                   for k in range(steps + 1)]

    class Clock(TrainerCallback):
        """Step k lasts from the end of step k-1 to its own end; its tokens are known from the fixed order."""

        def __init__(self):
            self.tokens = self.seconds = 0.0
            self.t_end = None

        def on_train_begin(self, args, state, control, **kw):
            _reset_peak()  # as for the others: the peak of training, after the model and optimizer are set up

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if self.t_end is not None:  # step 1 is the warm-up
                self.seconds += now - self.t_end
                self.tokens += step_tokens[state.global_step - 1]
            self.t_end = now

    clock = Clock()
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=micro, gradient_accumulation_steps=G // micro,
                             max_steps=steps + 1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                             logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=device == "cpu",
                             dataloader_num_workers=0, optim="adamw_torch", max_grad_norm=1.0,
                             remove_unused_columns=False, seed=cfg.train.seed, disable_tqdm=True,
                             bf16=device == "cuda" and torch.cuda.is_bf16_supported())
    ordered = [examples[i] for step in range(steps + 1) for i in _order(step, len(examples), G, cfg.train.seed)]
    ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"],
                             "attention_mask": [1] * len(e["input_ids"])} for e in ordered])

    class InOrder(Trainer):  # scalora's batches, in scalora's order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)  # noqa: ARG002

    InOrder(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[clock]).train()
    return {"tokens": clock.tokens, "seconds": clock.seconds, "peak_gb": _peak(),
            "dtype": "bfloat16" if args.bf16 else str(model.dtype).removeprefix("torch.")}


def worker(a) -> None:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
    fn = {"scalora": worker_scalora, "peft": worker_peft, "trainer": worker_trainer}[STACKS[a.stack][0]]
    result = fn(a)
    result["tokens_per_s"] = result["tokens"] / max(1e-9, result["seconds"])
    emit_result(result)


# --- FLOPs, the machine's matmul peak, a profile ------------------------------------------------------------------
def step_flops_per_token(size: str, seq: float) -> float:
    """Matmul FLOPs per trained token: frozen base forward + recompute (checkpointing) + input-gradient, LoRA forward
    + recompute + input and weight gradients, attention scores and values (causal: half), the head (no recompute)."""
    s = SIZES[size]
    h, inter, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    r = LORA["r"]
    base = sum(i * o for i, o in linears)
    lora = sum(r * (i + o) for i, o in linears)
    attn = 2 * 2 * seq / 2 * h  # QK^T and AV per token, causal half
    per_layer = 3 * 2 * base + 4 * 2 * lora + 3 * attn
    from scalora.builtin import build_tokenizer

    vocab = s.get("vocab_size") or len(build_tokenizer())
    return L * per_layer + 2 * 2 * h * vocab


SPEC_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks, FLOP/s


def matmul_peak(threads: int, seconds: float = 3.0) -> float:
    """FLOP/s of the best fp32 (CPU) or bf16 (GPU) square matmul this process reaches, measured now."""
    import torch

    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    dtype, dev = (torch.bfloat16, "cuda") if gpu else (torch.float32, "cpu")
    best = 0.0
    for n in (1024, 2048) if not gpu else (4096, 8192):
        x, y = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
        x @ y
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            x @ y
            k += 1
        if gpu:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


def profile_step(model_path: str, data: str, size: str, threads: int, compiled: bool = False
                 ) -> list[tuple[str, float]]:
    """Share of one scalora training step's CPU time by kind of operator (torch.profiler, self time); `compiled`:
    with model.compile (inductor's fused kernels show as "other")."""
    import torch

    from scalora import attention
    from scalora.data import collate, needs_block_mask
    from scalora.model import build_model
    from scalora.loss import token_loss_sum

    torch.set_num_threads(threads)
    a = argparse.Namespace(model=model_path, data=data, size=size, out="/tmp/scalora-profile",
                           stack="scalora-compile" if compiled else "scalora-pack")
    cfg = _run_config(a)
    model, tok, _ = build_model(cfg)
    model.train()  # as train() does: the layers' checkpointing and dropout are on in training mode only
    examples = _examples(cfg, tok)
    attn = model.config._attn_implementation  # as the run collates: example ids for sdpa_segments
    batch = collate(examples[:RUN[size][1]], tok.pad_token_id, block_mask=needs_block_mask(attn),
                    pad_to=cfg.data.max_length if compiled else None, segment_ids=attn == attention.NAME)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for i in range(3 if compiled else 2):  # compiled: two warm-up steps (compile, then the backward's)
        last = i == (2 if compiled else 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if last else _Null() as prof:
            token_loss_sum(model, batch).backward()
            opt.step()
            opt.zero_grad()
    kinds = {"matmul (base + LoRA + head)": ("mm", "addmm", "bmm", "linear", "matmul"),
             "4-bit dequantize": ("dequantize", "bitsandbytes"),
             "attention (SDPA)": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
             "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
             "loss (log-softmax, cross-entropy)": ("log_softmax", "nll_loss", "cross_entropy")}
    totals: dict[str, float] = {k: 0.0 for k in kinds}
    totals["other (elementwise, norms, copies, autograd)"] = 0.0
    for ev in prof.key_averages():
        name = ev.key.lower()
        kind = next((k for k, keys in kinds.items() if any(s in name for s in keys)), None)
        totals[kind or "other (elementwise, norms, copies, autograd)"] += ev.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    print(f"profile ({size}, {'compiled' if compiled else 'eager'}): {total / 1e3:.0f} ms of CPU self time in one "
          f"step, by kind: " + ", ".join(f"{k.split(' (')[0]} {v / 1e3:.0f}" for k, v in totals.items()), flush=True)
    return sorted(((k, v / total) for k, v in totals.items()), key=lambda kv: -kv[1])


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the driver -------------------------------------------------------------------------------------------------
def measure(stack: str, size: str, model: str, data: str, threads: int, live: bool = False) -> dict:
    """One measurement in a fresh process. scalora's stacks run with the allocator the `scalora` command preloads
    (TBB's, scalora/malloc.py), the others with glibc's malloc as their users run them; SCALORA_MALLOC=system gives
    scalora glibc's too. live: glibc for every stack, returning every freed block above 64 KiB at once, so that the
    resident peak is the live peak (what CUDA's max_memory_allocated is on a GPU); steps are slower then."""
    out = f"/tmp/scalora-bench-{stack}-{size}"
    cmd = [sys.executable, __file__, "--worker", stack, "--size", size, "--model", model, "--data", data,
           "--out", out, "--threads", str(threads), "--lora-dropout", str(LORA["dropout"])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif stack.startswith("scalora"):
        from scalora import malloc

        env = malloc.preload_env(env)
    return run_worker(cmd, env, f"{stack} {size}", cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4m,30m,120m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "throughput.json"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--live-memory", default="4m,30m",
                    help="sizes whose live peak (glibc caching off) is also measured, once per stack ('' for none)")
    ap.add_argument("--compile", action="store_true", help="add scalora-compile(-pad) (model.compile=true, packed / "
                    "padded) and peft-pack (the peft loop on the same packed rows)")
    ap.add_argument("--stacks", default="", help="only these stacks, comma-separated")
    ap.add_argument("--gpu", action="store_true", help="GPU mode: the 1b size at sequence 2048, one repeat, "
                    "scalora-best added, failures reported and skipped")
    ap.add_argument("--worker"), ap.add_argument("--size"), ap.add_argument("--model"), ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--lora-dropout", type=float, default=LORA["dropout"], help="LoRA dropout of every stack "
                    "(DoRA with dropout needs the base's product on the dropped input: peft's a second dense product, "
                    "scalora's the base's output less a sparse product)")
    a = ap.parse_args()
    LORA["dropout"] = a.lora_dropout
    if a.worker:
        a.stack = a.worker
        return worker(a)

    import torch

    stacks = ["scalora-pad", "scalora-pack", "peft", "trainer"]
    if a.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA GPU is visible to torch")
        a.sizes, a.repeats, a.live_memory, a.no_profile = "1b", 1, "", True
        stacks.append("scalora-best")
    if a.compile:  # compiled layers, padded and packed; a peft loop on the same packed rows
        stacks += ["scalora-compile-pad", "scalora-compile", "peft-pack"]
    if a.stacks:
        stacks = a.stacks.split(",")
    data = build_data(long=a.gpu)
    peak = matmul_peak(a.threads)
    from scalora.hardware import cpu_features, cpu_kind

    feats = cpu_features()
    kind = "gpu" if torch.cuda.is_available() else cpu_kind(feats)  # every row of the table names it
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {feats.get('model', '?')} (kind {kind}: {', '.join(feats['flags']) or 'no AVX2'}), {a.threads} threads"
    spec = next((v for k, v in SPEC_BF16.items() if k in device), None)
    print(f"device: {device} | measured matmul peak {peak / 1e9:.1f} GFLOP/s"
          + (f" | spec bf16 peak {spec / 1e12:.0f} TFLOP/s (MFU below is against the measured peak)" if spec else ""),
          flush=True)
    results: dict = {"device": device, "cpu_kind": kind, "matmul_peak_flops": peak, "threads": a.threads, "runs": {}}
    for size in a.sizes.split(","):
        model = build_model(size)
        runs: dict[str, list[dict]] = {s: [] for s in stacks}
        for rep in range(a.repeats):
            order = stacks[rep % len(stacks):] + stacks[:rep % len(stacks)]  # rotate who goes first
            for stack in order:
                try:
                    r = measure(stack, size, model, data, a.threads)
                except RuntimeError as e:
                    if not a.gpu:
                        raise
                    print(f"  {size} repeat {rep + 1} {stack:<13} FAILED: {str(e)[-1500:]}", flush=True)
                    results.setdefault("failed", {})[f"{size}/{stack}"] = str(e)[-4000:]
                    continue
                runs[stack].append(r)
                print(f"  {size} repeat {rep + 1} {stack:<13} {r['tokens_per_s']:9.1f} useful tokens/s  peak "
                      f"{r['peak_gb']:.3f} GiB", flush=True)
        results["runs"][size] = {s: rs for s, rs in runs.items() if rs}
    results["summary"] = summarize(results)
    live_sizes = [x for x in a.live_memory.split(",") if x and x in results["runs"]]
    if live_sizes:
        print("\nlive peak (resident peak with glibc's caching off), GiB; ratio to peft:")
        results["live_peak_gb"] = {}
        for size in live_sizes:
            row = {st: measure(st, size, build_model(size), data, a.threads, live=True)["peak_gb"] for st in stacks}
            results["live_peak_gb"][size] = row
            print(f"  {size:<5} " + "  ".join(f"{st} {v:.3f} ({v / row['peft']:.2f})" for st, v in row.items()),
                  flush=True)
    if not a.no_profile:
        size = a.sizes.split(",")[0]
        results["profile"] = {"size": size, "shares": profile_step(build_model(size), data, size, a.threads)}
        print(f"\nprofile of one scalora step ({size}, packed micro-batch), share of CPU time:")
        for k, v in results["profile"]["shares"]:
            print(f"  {k:<46} {v:6.1%}")
    write_results(a.out_json, results)


def summarize(results: dict) -> dict:
    """Median tokens/s and peak per stack, ratios scalora / baseline, MFU; printed as a table."""
    import statistics

    peak = results["matmul_peak_flops"]
    out = {}
    kind = results.get("cpu_kind", "?")
    print("\nkind        | size  | stack         | dtype    | useful tok/s | peak GiB | MFU*   | vs peft | vs Trainer | "
          "peak vs peft")
    for size, runs in results["runs"].items():
        med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
        mem = {s: statistics.median(r["peak_gb"] for r in rs) for s, rs in runs.items()}
        seq = RUN[size][2] / 2  # attention FLOPs at a typical length; a small term at these sizes
        row = {}
        for s in runs:
            mfu = med[s] * step_flops_per_token(size, seq) / peak
            nan = float("nan")
            row[s] = {"tokens_per_s": med[s], "peak_gb": mem[s], "mfu": mfu, "dtype": runs[s][0].get("dtype"),
                      "malloc": runs[s][0].get("malloc"),
                      "vs_peft": med[s] / med.get("peft", nan), "vs_trainer": med[s] / med.get("trainer", nan),
                      "peak_vs_peft": mem[s] / mem.get("peft", nan), "peak_vs_trainer": mem[s] / mem.get("trainer", nan)}
            print(f"{kind:<11} | {size:<5} | {s:<13} | {row[s]['dtype'] or '?':<8} | {med[s]:12.1f} | {mem[s]:8.3f} | "
                  f"{mfu:6.1%} | "
                  f"{row[s]['vs_peft']:7.2f} | "
                  f"{row[s]['vs_trainer']:10.2f} | {row[s]['peak_vs_peft']:.2f} (vs Trainer "
                  f"{row[s]['peak_vs_trainer']:.2f})")
        out[size] = row
    print("* MFU against the fp32 (CPU) or bf16 (GPU) matmul peak measured above, whatever the row's dtype")
    return out


if __name__ == "__main__":
    main()
