"""The loading peak per process: how much host memory each rank needs before training starts, by topology.

    .venv/bin/python bench/loading.py             # a ~310M-parameter Llama saved in 4-bit NF4, 1 and 2 processes

The model is built here from a config (random weights), quantized by bitsandbytes and saved with save_pretrained,
then every run loads it through `scalora train` (the same from_pretrained path as any model) and trains one step.
Each rank's loading peak is `summary.json`'s loading_peak_memory_gb_per_rank (resident high-water mark until the
model is prepared; glibc's caching off so that it is the live peak), and the model's part of it
loading_model_memory_gb_per_rank (the peak while the model was built, less what the process held before), the
planner's figures and the training peak beside them. "-whole" runs load the whole base on every process before it
is sharded (dist.low_memory_loading=false). Results go to bench/results/loading.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402 (bench/, the script's folder)

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)
# (name, launch file, processes, dist.low_memory_loading): "-whole" is the path where every process loads the
# whole base before it is sharded (the only one before low-memory loading; DeepSpeed's zero3_init_flag did not
# change it: quantization happens outside zero.Init)
RUNS = [("single", None, 1, True), ("ddp", "launch/ddp.yaml", 2, True), ("zero3-whole", "launch/zero3.yaml", 2, False),
        ("zero3", "launch/zero3.yaml", 2, True), ("fsdp-whole", "launch/fsdp.yaml", 2, False),
        ("fsdp", "launch/fsdp.yaml", 2, True)]
CHECKPOINTS = ("nf4", "fp32")  # saved already quantized; saved in fp32 and quantized while loading


def build(folder: Path) -> dict[str, str]:
    """The model saved in fp32 and, from it, in 4-bit NF4 (fp32 storage, as FSDP needs); built once."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from scalora.builtin import build_tokenizer

    path, full = folder / "llama-310m-nf4", folder / "llama-310m-fp32"
    if (path / "config.json").is_file():
        return {"nf4": str(path), "fp32": str(full)}
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(full)
    tok.save_pretrained(full)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(full, quantization_config=q, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"nf4": str(path), "fp32": str(full)}


def _args(model: str, data: str, out: Path, name: str, low_memory: bool = True) -> list[str]:
    return [f"dist.low_memory_loading={str(low_memory).lower()}", f"model.name_or_path={model}", f"data.train_file={data}", "data.max_length=64", "train.max_steps=1",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_every=0", "train.eval_every=0",
            "data.max_eval_generate=0", "data.validation_fraction=0", "log.report_to=none",
            f"train.output_dir={out / name}", "train.overwrite=true", "model.gradient_checkpointing=true",
            "model.dtype=float32"]  # the checkpoint stores its packed weights in fp32; ZeRO-3 and FSDP need the same


def predicted(name: str, processes: int, low_memory: bool, model: str, data: str, out: Path,
              runtime: float) -> tuple[float, float]:
    """scalora plan's loading peak per process for this run (--device cpu: the runtime measured here) and, of it,
    the model's part (plan.loading_bytes), GiB."""
    from scalora import plan as P
    from scalora.config import load_config

    cfg = load_config(None, _args(model, data, out, name, low_memory))
    shape = P.model_shape(model, cfg.lora.target_modules, cfg.lora.exclude_modules, cfg.lora.r)
    st = P.settings_from_config(cfg, "cpu", runtime, shape.hidden)
    strategy = name.split("-")[0]
    return (P.estimate(shape, st, strategy, processes).loading / 2**30,
            P.loading_bytes(shape, st, strategy, processes) / 2**30)


def run(name: str, launch: str | None, processes: int, low_memory: bool, model: str, data: str, out: Path) -> dict:
    args = _args(model, data, out, name, low_memory)
    # glibc's malloc handing freed blocks back at once: the live peak (not the command's default allocator)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", SCALORA_MALLOC="system", DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1")
    if launch is None:
        cmd = [sys.executable, "-m", "scalora", "train", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes",
               str(processes), "-m", "scalora", "train", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        errors = [line for line in p.stderr.splitlines() if line.startswith(("error", "RuntimeError"))]
        return {"error": errors[0] if errors else f"exit {p.returncode}"}
    s = json.load(open(out / name / "summary.json"))
    return {"loading_gb": s["loading_peak_memory_gb_per_rank"], "model_gb": s["loading_model_memory_gb_per_rank"],
            "training_gb": s["peak_memory_gb_per_rank"],
            "first_loss": json.loads(open(out / name / "metrics.jsonl").readline())["train/loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/scalora-bench-loading")
    ap.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "loading.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from throughput import build_data  # the same variable-length instruction data as the throughput bench

    models, data = build(work), build_data()
    for kind, path in models.items():
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**30
        print(f"checkpoint {kind}: {path} ({size:.2f} GiB of safetensors; ~310M parameters)", flush=True)
    from scalora.plan import cpu_runtime_bytes

    runtime = cpu_runtime_bytes()
    print("checkpoint | run          | processes | loading peak GiB per rank | predicted | the model's part | "
          "predicted | training peak GiB per rank | first loss")
    results: dict = {}
    for kind in CHECKPOINTS:
        for name, launch, n, low in RUNS:
            r = run(f"{kind}-{name}", launch, n, low, models[kind], data, work)
            r["predicted_loading_gb"], r["predicted_model_gb"] = predicted(name, n, low, models[kind], data, work,
                                                                           runtime)
            results[f"{kind}/{name}"] = r
            if "error" in r:
                print(f"{kind:<10} | {name:<12} | {n:9d} | failed: {r['error'][:80]}", flush=True)
            else:
                print(f"{kind:<10} | {name:<12} | {n:9d} | {', '.join(f'{x:.2f}' for x in r['loading_gb']):25} | "
                      f"{r['predicted_loading_gb']:9.2f} | {', '.join(f'{x:.2f}' for x in r['model_gb']):16} | "
                      f"{r['predicted_model_gb']:9.2f} | {', '.join(f'{x:.2f}' for x in r['training_gb']):26} | "
                      f"{r['first_loss']:.6f}", flush=True)
    write_results(a.out_json, results)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
