"""scalora's GGUF files run by llama.cpp itself (through llama-cpp-python), against the model scalora trained.

For a fine-tuned adapter (default: a SmolLM2-135M-Instruct run of configs/smollm2-135m.yaml):
1. `scalora export ADAPTER --gguf merged-f16.gguf` (and q8_0): llama.cpp's greedy answers to the held-out
   questions against transformers' greedy answers from `scalora merge`'s folder (fp32), token for token;
2. `scalora export ADAPTER --gguf-adapter lora.gguf` on the base file the user already has (the Q4_1 GGUF the run
   started from), as `llama-cli -m base.gguf --lora lora.gguf` runs it: the answers against the same reference
   (Q4_1 is not the NF4 the adapter was trained on, so a few answers may differ), and the base alone (no adapter)
   to show the adapter is what answers.

llama-cpp-python has no wheel on the package registry: it builds llama.cpp from source (cmake, a C++ compiler).
Install it in its own environment and pass its interpreter:

    python3 -m venv /tmp/lcpvenv && /tmp/lcpvenv/bin/pip install llama-cpp-python numpy diskcache jinja2
    .venv/bin/python bench/llama_cpp_check.py --adapter runs/smollm2-135m/final --llama-python /tmp/lcpvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.environ.get("SCALORA_SMOLLM2", os.path.expanduser("~/.cache/scalora/SmolLM2-135M-Instruct.Q4_1.gguf"))


def worker(model: str, lora: str, prompts_file: str, max_tokens: int) -> None:
    """In the llama-cpp-python environment: greedy token ids for each prompt's token ids."""
    from llama_cpp import Llama

    # n_batch=1: prompts evaluated token by token. In llama-cpp-python 0.3.36 built here (Intel Xeon with AMX,
    # AMX_INT8 on) a batch of 4 or more tokens through quantized weights crashed (SIGSEGV): the model file the run
    # started from (SmolLM2's own Q4_1, not written by scalora) as well as scalora's q8_0 export; f16 ran either way.
    llm = Llama(model_path=model, lora_path=lora or None, n_ctx=512, n_threads=2, n_batch=1, verbose=False, seed=0)
    out = []
    with open(prompts_file) as f:
        prompts = json.load(f)
    started = time.time()
    for ids in prompts:
        llm.reset()
        got = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            if tok == llm.token_eos() or len(got) >= max_tokens:
                break
            got.append(tok)
        out.append(got)
    print("RESULT " + json.dumps({"tokens": out, "seconds": time.time() - started}), flush=True)


def _llama(python: str, model: str, lora: str, prompts_file: str, max_tokens: int) -> list[list[int]]:
    # A clean environment: the variables this process's libraries set (OpenMP, oneDNN) crashed llama.cpp's loader
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    p = subprocess.run([python, __file__, "--worker", model, "--lora", lora or "", "--prompts", prompts_file,
                        "--max-tokens", str(max_tokens)], capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"llama.cpp run failed ({p.returncode}): {p.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="a scalora run's final/ folder (trained from the SmolLM2 GGUF file)")
    ap.add_argument("--base-gguf", default=SMOLLM2, help="the GGUF base the adapter-only file is applied to")
    ap.add_argument("--llama-python", default="python3", help="an interpreter that imports llama_cpp")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/scalora/bench/llama_cpp"))
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--worker")
    ap.add_argument("--lora")
    ap.add_argument("--prompts")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.lora, args.prompts, args.max_tokens)

    import torch
    from transformers import AutoModelForCausalLM

    from scalora.config import load_config
    from scalora.data import build_datasets, instruction_messages
    from scalora.model import load_tokenizer, resolve_model_path

    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    scalora = [sys.executable, "-m", "scalora"]
    merged = os.path.join(args.workdir, "merged")
    subprocess.run([*scalora, "merge", args.adapter, "--out", merged], check=True, env=env, capture_output=True)
    files = {}
    for kind in ("f16", "q8_0"):
        files[kind] = os.path.join(args.workdir, f"merged-{kind}.gguf")
        subprocess.run([*scalora, "export", args.adapter, "--gguf", files[kind], "--type", kind], check=True, env=env,
                       capture_output=True)
    files["lora"] = os.path.join(args.workdir, "lora.gguf")
    subprocess.run([*scalora, "export", args.adapter, "--gguf-adapter", files["lora"], "--type", "f32"], check=True,
                   env=env, capture_output=True)

    cfg = load_config(os.path.join(ROOT, "configs", "smollm2-135m.yaml"), [f"model.name_or_path={args.base_gguf}"])
    tok = load_tokenizer(cfg, resolve_model_path(args.base_gguf))
    records = build_datasets(cfg.data, tok, 0).validation_records[:args.questions]
    prompts = []
    for r in records:
        text = tok.apply_chat_template(instruction_messages(r, cfg.data)[:1], tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    prompts_file = os.path.join(args.workdir, "prompts.json")
    with open(prompts_file, "w") as f:
        json.dump(prompts, f)

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    reference = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            reference.append([t for t in out if t != tok.eos_token_id][:args.max_tokens])

    def answers(tokens):
        return [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]

    ref_answers = answers(reference)
    truth = [str(r[cfg.data.output_field]).strip() for r in records]
    rows = []
    for name, model_file, lora in (("merged f16", files["f16"], None), ("merged q8_0", files["q8_0"], None),
                                   ("Q4_1 base + lora.gguf", args.base_gguf, files["lora"]),
                                   ("Q4_1 base alone", args.base_gguf, None)):
        started = time.time()
        got = _llama(args.llama_python, model_file, lora, prompts_file, args.max_tokens)
        a = answers(got)
        rows.append({"run": name, "same_tokens_as_reference": sum(g == r for g, r in zip(got, reference)),
                     "same_answer_as_reference": sum(x == y for x, y in zip(a, ref_answers)),
                     "correct": sum(x == y for x, y in zip(a, truth)), "questions": len(prompts),
                     "seconds": round(time.time() - started, 1), "first_answers": a[:3]})
        print(json.dumps(rows[-1]), flush=True)
    ref_correct = sum(x == y for x, y in zip(ref_answers, truth))
    print(f"reference (transformers, scalora merge's folder, fp32): {ref_correct}/{len(prompts)} correct, first "
          f"answers {ref_answers[:3]}")
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump({"reference_correct": ref_correct, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
