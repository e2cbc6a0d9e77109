"""scalora against peft + TRL's SFTTrainer on a real model, the same job, quality measured one way for both.

The job (configs/smollm2-135m.yaml): SmolLM2-135M-Instruct (the GGUF file `make fetch-smollm2` fetches, converted
once into a plain folder), 4-bit NF4 with double quantization, LoRA r=16 / alpha 32 / dropout 0.05 on every linear
layer, the builtin topics data rendered through the model's chat template (loss on the answer only), global batch 16
(micro 8, 2 accumulation steps), max length 128, lr 2e-4 with 10% warmup and cosine decay, gradient checkpointing
(non-reentrant), the same steps, seeds and threads, in fp32 and bf16 (autocast, bf16 compute in the 4-bit layers).

- scalora: `scalora train configs/smollm2-135m.yaml` (validation and checkpoints off during the loop).
- TRL: what its users write: `BitsAndBytesConfig` NF4, `SFTTrainer(peft_config=LoraConfig(target_modules=
  "all-linear"))` (which runs peft's `prepare_model_for_kbit_training`), conversational prompt-completion records
  (loss on the completion only), `SFTConfig(bf16=...)`.

Each run is its own process; its peak resident memory is the kernel's (wait4's ru_maxrss), the same measure for
both. tokens/s: tokens of the examples trained on (no padding) over the training loop's seconds: scalora's summary
(validation and checkpoints excluded, none run here), TRL's `train_runtime` and `num_input_tokens_seen`
("non_padding"). Quality: each run's final adapter loaded by the same code onto the same 4-bit base in fp32 and
evaluated with scalora's validation (scalora/evaluate.py) on the same 64 held-out conversations: per-token loss on
the answers, and exact match of greedy answers. Two seeds give the run-to-run noise.

`--variants lora,dora`: each pair once with plain LoRA and once with DoRA (scalora's `lora.use_dora=true`, TRL's
`LoraConfig(use_dora=True)`), interleaved, so that DoRA's step against LoRA's is measured in the same run too.
`--stacks scalora`: scalora's runs alone (TRL's DoRA takes ~80 min for 30 steps on 2 cores), e.g. more seeds of
DoRA against LoRA. `--interleaved`: scalora's LoRA and DoRA models in one process, their optimizer steps alternated
on the same two micro-batches (a shared machine's slow minutes hit both; no first steps' set-up in the ratio).

    .venv/bin/python bench/real.py                         # fp32 and bf16, seeds 42 and 43, 30 steps
    .venv/bin/python bench/real.py --dtypes bfloat16 --seeds 42
    .venv/bin/python bench/real.py --dtypes float32 --seeds 42 --variants lora,dora
    .venv/bin/python bench/real.py --dtypes float32 --seeds 42,43,44 --variants lora,dora --stacks scalora --steps 12
    .venv/bin/python bench/real.py --interleaved --dtypes float32 --seeds 42 --steps 7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from common import emit_result, write_results  # noqa: E402

SMOLLM2 = os.environ.get("SCALORA_SMOLLM2", os.path.expanduser("~/.cache/scalora/SmolLM2-135M-Instruct.Q4_1.gguf"))
CONFIG = os.path.join(ROOT, "configs", "smollm2-135m.yaml")


def _cfg(extra=()):
    from scalora.config import load_config

    return load_config(CONFIG, [f"model.name_or_path={SMOLLM2}", *extra])


def run_measured(cmd: list[str], env: dict, what: str) -> tuple[dict, float]:
    """(the RESULT line's dict or {}, peak resident GiB of the process) for one worker process."""
    with open(os.path.join(env["BENCH_LOG_DIR"], what.replace(" ", "_") + ".log"), "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.write(out)
    if p.returncode:
        raise RuntimeError(f"{what} failed ({p.returncode}); see {log.name}")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    return (json.loads(line[-1][len("RESULT "):]) if line else {}), usage.ru_maxrss / 2**20


# --- the workers ---------------------------------------------------------------------------------------------------
def worker_trl(dtype: str, seed: int, steps: int, out: str, dora: bool = False) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from scalora.data import instruction_messages, read_records
    from scalora.model import resolve_model_path

    cfg = _cfg()
    folder = resolve_model_path(SMOLLM2)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype))
    tok = AutoTokenizer.from_pretrained(folder)
    records = []
    for r in read_records(cfg.data.train_file):
        user, answer = instruction_messages(r, cfg.data)
        records.append({"prompt": [user], "completion": [answer]})
    t = cfg.train
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=t.micro_batch_size,
                     gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size, learning_rate=t.lr,
                     lr_scheduler_type="cosine", warmup_steps=round(t.warmup_ratio * steps), seed=seed,
                     max_length=cfg.data.max_length, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=dtype == "bfloat16",
                     use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=5,
                     include_num_input_tokens_seen="non_padding", max_grad_norm=t.max_grad_norm,
                     dataloader_num_workers=0)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=lora)
    metrics = trainer.train().metrics
    trainer.save_model(os.path.join(out, "final"))
    tokens = trainer.state.num_input_tokens_seen
    emit_result({"tokens": tokens, "seconds": metrics["train_runtime"],
                 "tokens_per_s": tokens / metrics["train_runtime"], "adapter": os.path.join(out, "final")})


def worker_eval(adapter: str) -> None:
    """One evaluation for every adapter: the 4-bit NF4 base in fp32 + the adapter, scalora's validation."""
    import torch
    from accelerate import Accelerator

    from scalora.core.peft_model import PeftModel
    from scalora.data import build_datasets
    from scalora.evaluate import validate
    from scalora.model import freeze_with_fp32_norms, load_base, load_tokenizer, resolve_model_path

    cfg = _cfg(["model.dtype=float32", "data.max_eval_examples=64", "data.max_eval_generate=64"])
    folder = resolve_model_path(SMOLLM2)
    tok = load_tokenizer(cfg, folder)
    base = load_base(cfg, folder, dtype=torch.float32)
    freeze_with_fp32_norms(base)
    model = PeftModel.from_pretrained(base, adapter).eval()
    data = build_datasets(cfg.data, tok, cfg.train.seed)
    metrics = validate(model, Accelerator(cpu=True), data, tok, cfg)
    emit_result({"eval_loss": metrics["eval/loss"], "exact_match": metrics["eval/exact_match"],
                 "validation_examples": len(data.validation)})


# --- the driver ----------------------------------------------------------------------------------------------------
def worker_interleaved(dtype: str, seed: int, steps: int) -> None:
    """scalora's LoRA and DoRA models of the job in one process, their optimizer steps alternated (LoRA, DoRA, LoRA,
    ...), each step the job's two micro-batches of 8 (the first 16 training examples, the same for both): what a
    shared machine's slow minutes do to one command and not the other hits both here. Times each step after the
    first of each model; prints the median ratio and each pair's."""
    import statistics

    import torch

    from scalora import attention
    from scalora.data import build_datasets, collate, needs_block_mask
    from scalora.loss import token_loss_sum
    from scalora.model import build_model

    models, batches = {}, None
    for variant in ("lora", "dora"):
        cfg = _cfg([f"model.dtype={dtype}", f"lora.use_dora={variant == 'dora'}", f"train.seed={seed}",
                    "log.report_to=none"])
        torch.manual_seed(seed)
        model, tok, _ = build_model(cfg)
        model.train()
        if batches is None:  # one tokenizer, one data set: the same batches for both
            examples = build_datasets(cfg.data, tok, cfg.train.seed).train
            attn, micro = model.config._attn_implementation, cfg.train.micro_batch_size
            batches = [collate(examples[i:i + micro], tok.pad_token_id, block_mask=needs_block_mask(attn),
                               segment_ids=attn == attention.NAME)
                       for i in range(0, cfg.train.global_batch_size, micro)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        models[variant] = (model, batches, opt, cfg.train.chunked_loss)
    # bf16 as the command runs it: accelerate's mixed precision wraps the forward in autocast (backward outside)
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    times = {v: [] for v in models}
    for _ in range(steps + 1):
        for variant, (model, batches, opt, chunked) in models.items():
            started = time.perf_counter()
            for batch in batches:
                with autocast:
                    loss = token_loss_sum(model, batch, chunked)
                loss.backward()
            opt.step()
            opt.zero_grad()
            times[variant].append(time.perf_counter() - started)
    lora, dora = times["lora"][1:], times["dora"][1:]
    emit_result({"lora_s": statistics.median(lora), "dora_s": statistics.median(dora),
                 "ratio": statistics.median(dora) / statistics.median(lora),
                 "pairs": [round(d / l, 3) for l, d in zip(lora, dora)]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "real.json"))
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/scalora/bench/real"))
    ap.add_argument("--worker", choices=["trl", "eval", "interleaved"])
    ap.add_argument("--interleaved", action="store_true",
                    help="scalora's LoRA and DoRA steps alternated in one process instead (no TRL, no evaluation)")
    ap.add_argument("--dtype")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--adapter")
    ap.add_argument("--variants", default="lora", help="lora, dora or both (comma-separated)")
    ap.add_argument("--stacks", default="scalora,trl", help="scalora, trl or both (comma-separated)")
    args = ap.parse_args()
    variants, stacks = args.variants.split(","), args.stacks.split(",")
    if set(variants) - {"lora", "dora"}:
        sys.exit(f"--variants {args.variants}: choose among lora and dora")
    if set(stacks) - {"scalora", "trl"}:
        sys.exit(f"--stacks {args.stacks}: choose among scalora and trl")
    if args.worker == "trl":
        return worker_trl(args.dtype, args.seed, args.steps, args.adapter, "dora" in variants)
    if args.worker == "eval":
        return worker_eval(args.adapter)
    if args.worker == "interleaved":
        return worker_interleaved(args.dtype, args.seed, args.steps)
    if not os.path.isfile(SMOLLM2):
        sys.exit(f"{SMOLLM2} is missing: run `make fetch-smollm2` first")

    from scalora.hardware import cpu_features, cpu_kind
    from scalora.model import resolve_model_path

    resolve_model_path(SMOLLM2)  # converted once, before anything is timed
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", BENCH_LOG_DIR=args.workdir)
    env.pop("WANDB_API_KEY", None)
    os.makedirs(args.workdir, exist_ok=True)
    features = cpu_features()
    kind = f"{cpu_kind(features)} ({', '.join(features['flags'])})"
    capped = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    if capped:  # a lower kind's kernels on this CPU: it stands in for that kind, it is not that kind
        kind += f" with {', '.join(capped)}"
    results = {"cpu_kind": kind, "steps": args.steps, "command": " ".join(sys.argv), "runs": []}
    if args.interleaved:  # the allocator the command runs with (scalora/malloc.py), as its runs below have it
        from scalora import malloc

        for dtype in args.dtypes.split(","):
            for seed in map(int, args.seeds.split(",")):
                r, _ = run_measured([sys.executable, __file__, "--worker", "interleaved", "--dtype", dtype, "--seed",
                                     str(seed), "--steps", str(args.steps)], malloc.preload_env(env),
                                    f"interleaved {dtype} {seed}")  # (one process's peak holds both models)
                results["runs"].append({"dtype": dtype, "seed": seed, **r, "cpu_kind": kind})
                print(f"  {dtype:<8} seed {seed}: LoRA {r['lora_s']:.2f} s, DoRA {r['dora_s']:.2f} s per step "
                      f"(medians of {args.steps}): DoRA/LoRA {r['ratio']:.3f}x, pairs "
                      f"{' '.join(f'{x:.2f}' for x in r['pairs'])}  [{kind}]", flush=True)
        return write_results(args.out.replace(".json", "-interleaved.json"), results)
    pairs = [(d, seed, v) for d in args.dtypes.split(",") for seed in map(int, args.seeds.split(",")) for v in variants]
    print(f"CPU kind: {kind}; {args.steps} steps per run", flush=True)
    for dtype, seed, variant in pairs:
        for stack in stacks:  # interleaved: a slow moment of a shared machine hits both
            out = os.path.join(args.workdir, f"{stack}-{dtype}-{seed}" + ("-dora" if variant == "dora" else ""))
            what = f"{stack} {variant} {dtype} {seed}"
            started = time.time()
            if stack == "scalora":
                _, peak = run_measured(
                    [sys.executable, "-m", "scalora", "train", CONFIG, f"model.name_or_path={SMOLLM2}",
                     f"model.dtype={dtype}", f"train.seed={seed}", f"train.max_steps={args.steps}",
                     "train.eval_every=0", "train.save_every=0", "data.max_eval_examples=1",
                     "data.max_eval_generate=0", "log.report_to=none", "train.overwrite=true",
                     f"lora.use_dora={variant == 'dora'}", f"train.output_dir={out}"], env, what)
                with open(os.path.join(out, "summary.json")) as f:
                    s = json.load(f)
                r = {"tokens": s["train_tokens"], "seconds": s["train_seconds"], "tokens_per_s": s["tokens_per_s"],
                     "adapter": os.path.join(out, "final"), "malloc": s.get("malloc")}
            else:
                r, peak = run_measured([sys.executable, __file__, "--worker", "trl", "--dtype", dtype, "--seed",
                                        str(seed), "--steps", str(args.steps), "--adapter", out, "--variants",
                                        variant], env, what)
            q, _ = run_measured([sys.executable, __file__, "--worker", "eval", "--adapter", r["adapter"]], env,
                                f"eval {what}")
            q.pop("malloc", None)  # the evaluation's allocator: the row's is the training run's
            results["runs"].append({"stack": stack, "variant": variant, "dtype": dtype, "seed": seed,
                                    "peak_gib": round(peak, 3), **r, **q, "wall_s": round(time.time() - started, 1),
                                    "cpu_kind": kind})
            print(f"  {stack:<8} {variant:<5} {dtype:<8} seed {seed}: {r['tokens_per_s']:6.1f} tokens/s "
                  f"({r['tokens']} tokens in {r['seconds']:.1f} s), peak {peak:.2f} GiB, eval loss "
                  f"{q['eval_loss']:.4f}, exact match {q['exact_match']:.1%}  [{kind}]", flush=True)
            write_results(args.out, results)

    def row(stack, dtype, seed, variant):
        return next(r for r in results["runs"] if (r["stack"], r["dtype"], r["seed"], r["variant"]) ==
                    (stack, dtype, seed, variant))

    if len(stacks) == 2:
        print(f"\nratios, scalora / TRL, each seed's pair [{kind}]:")
        for dtype, seed, variant in pairs:
            a, b = row("scalora", dtype, seed, variant), row("trl", dtype, seed, variant)
            print(f"  {variant:<5} {dtype:<8} seed {seed}: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"peak memory {a['peak_gib'] / b['peak_gib']:.2f}x, eval loss {a['eval_loss']:.4f} vs "
                  f"{b['eval_loss']:.4f}, exact match {a['exact_match']:.1%} vs {b['exact_match']:.1%}")
    if len(variants) == 2:
        print("DoRA's step against LoRA's (LoRA's tokens/s over DoRA's), same run:")
        for dtype, seed, _ in pairs[::2]:
            speed = {st: {v: row(st, dtype, seed, v)["tokens_per_s"] for v in variants} for st in stacks}
            ratios = ", ".join(f"{st} {v['lora'] / v['dora']:.2f}x" for st, v in speed.items())
            print(f"  {dtype:<8} seed {seed}: {ratios}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
