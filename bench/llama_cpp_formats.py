"""What scalora writes into GGUF files beyond the weights, read by llama.cpp itself (llama-cpp-python).

1. Tokenizers, tokenized by llama.cpp (vocab only) against the transformers tokenizer they were written from: the
   same token ids for the same text.
2. Llama 3.1's rope scaling (the `rope_freqs` tensor): a tiny Llama with `llama3` scaling (original context 64, factor
   8) run by llama.cpp over a 200-token prompt, its logits at every position against transformers' on the same
   weights; the same weights exported without the scaling show how far a file that lost it lands.

Tiny models with the test suite's tokenizers (tests/helpers.py): byte-level BPE (llama.cpp's `gpt2` model) and
SentencePiece BPE with byte fallback (its `llama` model) in both forms transformers holds ("▁" from a Metaspace
pre-tokenizer, or from Llama 2's Prepend + Replace normalizer). Texts with words, digits, double spaces, non-ASCII
characters (byte fallback), leading spaces, tabs and newlines. Set up llama-cpp-python as bench/llama_cpp_check.py
says, then:

    .venv/bin/python bench/llama_cpp_formats.py --llama-python /tmp/lcpvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Instruction: name the topic of this sentence.\nInput: the river flooded the valley",
         "it is about words, 12345 and  two  spaces", "caf\u00e9 \u00fcber na\u00efve \u4e2d\u6587 \U0001f600",
         "  two leading spaces\tand a tab\n\nlines", "hello world", "the cat sat on the mat"]


def worker(model: str, texts_file: str) -> None:
    from llama_cpp import Llama

    with open(texts_file) as f:
        texts = json.load(f)
    if isinstance(texts[0], int):  # token ids: the logits at every position
        # an f32 KV cache (llama.cpp keeps f16 by default), so that the comparison is at fp32 rounding
        llm = Llama(model_path=model, n_ctx=512, n_batch=1, n_threads=2, logits_all=True, type_k=0, type_v=0,
                    verbose=False)
        llm.eval(texts)
        print("RESULT " + json.dumps(llm.scores[:len(texts)].tolist()))
        return
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    print("RESULT " + json.dumps([llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]))


def _run(python: str, model: str, data_file: str):
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    p = subprocess.run([python, __file__, "--llama-python", "-", "--worker", model, data_file],
                       capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"llama.cpp failed on {model}: {p.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT "):])


def rope_check(python: str, tmp: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers import bpe_tokenizer
    from scalora.gguf_export import write_gguf

    tok = bpe_tokenizer()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 50000.0}
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", rope_scaling=rope, **kw)).eval()
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", rope_theta=50000.0, **kw)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(3, len(tok), (200,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids[None]).logits[0]
    data = os.path.join(tmp, "ids.json")
    with open(data, "w") as f:
        json.dump(ids.tolist(), f)
    out = {}
    for name, m in (("with rope_freqs", model), ("scaling dropped", plain)):
        path = os.path.join(tmp, "rope.gguf")
        write_gguf(m, tok, path, "f32")
        got = torch.tensor(_run(python, path, data))
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1))
        out[name] = {"max_rel_err_first_64": err[:64].max().item(), "max_rel_err_after_64": err[64:].max().item()}
        print(f"llama3 rope, {name}: llama.cpp's logits against transformers', relative error per position: "
              f"max {err[:64].max():.2e} within the original context, {err[64:].max():.2e} beyond it")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from helpers import bpe_tokenizer, sentencepiece_tokenizer
    from test_gguf import _merged

    from scalora.gguf_export import write_gguf

    tokenizers = {"byte-level BPE (gpt2)": bpe_tokenizer(),
                  "SentencePiece, Metaspace form (llama)": sentencepiece_tokenizer(form="metaspace"),
                  "SentencePiece, normalizer form (llama)": sentencepiece_tokenizer(form="normalizer")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = os.path.join(tmp, "texts.json")
        with open(texts_file, "w") as f:
            json.dump(TEXTS, f)
        for name, tok in tokenizers.items():
            path = os.path.join(tmp, "m.gguf")
            write_gguf(_merged("llama", tok, True)[0], tok, path, "f16")
            got = _run(args.llama_python, path, texts_file)
            want = [tok(t)["input_ids"] for t in TEXTS]
            differ = [t for t, a, b in zip(TEXTS, got, want) if a != b]
            results[name] = {"same": len(TEXTS) - len(differ), "of": len(TEXTS), "differ": differ}
            print(f"{name}: {len(TEXTS) - len(differ)} / {len(TEXTS)} texts give transformers' ids in llama.cpp"
                  + (f"; differ: {differ}" if differ else ""))
        results["rope"] = rope_check(args.llama_python, tmp)
    return results


if __name__ == "__main__":
    main()
