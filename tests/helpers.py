"""Running the real CLI in subprocesses: one process, or under `accelerate launch` with a launch/ file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file

FAST = ["train.max_steps=6", "train.save_every=3", "train.eval_every=3", "data.max_eval_generate=4",
        "train.schedule=constant", "train.warmup_ratio=0", "train.log_every=1"]
# Several processes: micro-batches of 4 so that 2 processes x 2 accumulation steps make the global batch of 16.
DIST = ["train.micro_batch_size=4", "train.max_steps=6", "train.save_every=3", "train.eval_every=0",
        "data.max_eval_examples=64", "data.max_eval_generate=0", "train.schedule=constant", "train.warmup_ratio=0",
        "train.log_every=1", "log.report_to=none"]


def run(env, *args, check=True, timeout=600):
    """`scalora ARGS` in a process of its own, forked from the session's pre-imported interpreter where the
    environment allows (tests/zygote.py), else started afresh; as subprocess.run(capture_output=True) returns it."""
    p = env["zygote"].run(list(args), env["env"], timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"scalora {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def side_by_side(*calls):
    """The zero-argument `calls` (each starting processes of its own and waiting for them) run two at a time; their
    results in order, the first exception raised again. Processes started afresh side by side overlap their imports
    and waits on 2 cores; each keeps its own peak memory and numbers (the tests that measure those read them per
    run). Measured [avx2]: three fresh runs 49.5 / 50.6 -> 38.1 / 39.0 s (A/B alternated), four refused launches
    38.0 -> 27.8 s; a forked run (already imported, all compute) beside a launch gained nothing, and runs that are
    mostly training lose (test_plan's six measured runs: 153 -> 224 s, two threads each on 2 cores): those stay one
    after the other."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def live_memory_env(env):
    """`env` (the session's fixture) for a run whose memory is measured as what is live: glibc's malloc handing every
    freed block above 64 KiB back at once (MALLOC_MMAP_THRESHOLD_), which TBB's allocator, the command's default
    (scalora/malloc.py), does not read; such a run starts afresh (tests/zygote.py)."""
    from scalora import malloc

    e = malloc.without_tbb(dict(env["env"], MALLOC_MMAP_THRESHOLD_="65536", **{malloc.ENV: "system"}))
    return dict(env, env=e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launch_file: str, *args, extra=()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_file,
            "--main_process_port", str(free_port()), *extra, "-m", "scalora", "train", *args]


def launch(env, launch_file: str, *args, check=True, timeout=600):
    p = subprocess.run(launch_cmd(launch_file, *args), env=env["env"], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"accelerate launch {launch_file} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "adapter_model.safetensors"))


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# The fault and bad-input tests' run: 6 steps, a checkpoint after every step, validation loss at step 3 (on 64
# examples: the whole split's 300 took half of such a run's time).
ARGS = ["train.max_steps=6", "train.save_every=1", "train.save_total_limit=2", "train.eval_every=3",
        "data.max_eval_examples=64", "data.max_eval_generate=0", "train.schedule=cosine", "train.warmup_ratio=0.2",
        "train.log_every=1", "log.report_to=none"]


def train_args(out, *extra):
    return ["train", "configs/tiny.yaml", *ARGS, f"train.output_dir={out}", *extra]


def tree_digest(root) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def adapted_logits(base: str, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the fp32 base + an adapter folder, through scalora's PeftModel (peft's API)."""
    from transformers import AutoModelForCausalLM

    import scalora

    model = scalora.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def assert_runs_agree(env, out, ref, dtype: str = "float32") -> None:
    """Two runs of configs/tiny.yaml that differ by rounding alone (another process count or topology, a restart):
    the same per-step losses and the same trained model, to the bounds of tests/tolerance.py. The adapters are
    compared by what they do (the base's logits with each; Adam moves elements whose gradient is within rounding of
    zero a long way, and those change the outputs only to second order); the reference's earliest checkpoint (a run
    short of one or more steps) lies far outside (bf16: outside, see below). bf16 compute: bf16's rounding instead
    of fp32's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tolerance import (MARGIN, UNIT_ROUNDOFF, assert_losses_close, assert_rounding_close, bf16_loss_rtol,
                           model_shape, rel_diff, trained_rtol)

    from scalora import checkpoint

    config = AutoConfig.from_pretrained(env["base"])
    got, want = losses(out), losses(ref)
    steps = len(want)
    if dtype == "float32":
        assert_losses_close(got, want, config)
        grad_rtol, margin = None, MARGIN  # fp32 rounding: trained_rtol's default
    else:  # bf16 gradients: one rounding (u) per stage of the backward, adding in quadrature
        for k, step in enumerate(want):
            assert_rounding_close(torch.tensor([got[step]]), torch.tensor([want[step]]), bf16_loss_rtol(k + 1),
                                  what=f"bf16 losses step {step}")
        u = UNIT_ROUNDOFF[torch.bfloat16]
        grad_rtol = u * (2 * model_shape(config)[1]) ** 0.5
        # That bound (every backward stage rounding each step's gradients by u, the steps' errors adding up) is ~30x
        # what these runs differ by (measured [avx2]: 0.0013 against a tolerance of 0.043, FSDP and ZeRO-2), and
        # the earliest checkpoint (3 steps of 6) lies ~3x outside it: no wrong result within reach sits MARGIN
        # tolerances out, so bf16 shows it outside by 2
        margin = 2.0
    assert list(got) == list(want) and want[max(want)] < want[min(want)] - 1  # it learned
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = AutoModelForCausalLM.from_pretrained(env["base"]).eval()(input_ids=ids).logits
    expected = adapted_logits(env["base"], os.path.join(ref, "final"), ids)
    rtol = trained_rtol(config, steps, rel_diff(bare, expected), grad_rtol)
    # the reference's earliest surviving checkpoint: a run short of one or more steps
    wrong = adapted_logits(env["base"], os.path.join(checkpoint.checkpoints(str(ref))[0][1], "adapter"), ids)
    assert_rounding_close(adapted_logits(env["base"], os.path.join(out, "final"), ids), expected, rtol, wrong=wrong,
                          what="adapted logits (wrong: the reference's earliest checkpoint)", margin=margin)


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, a chat template) trained here on the builtin corpus: a
    tokenizer with a GGUF form (the builtin model's word-level one has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from scalora.builtin import CHAT_TEMPLATE, pretraining_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's: llama.cpp's "gpt-2"
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pretraining_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentencepiece_tokenizer(prepend_scheme: str = "first", form: str = "metaspace"):
    """A SentencePiece-style BPE tokenizer as transformers holds Llama 2's and Mistral v0.1's (transformers'
    LlamaTokenizer: "▁" for spaces and before the text, byte fallback to the 256 <0xXX> pieces, <unk> <s> </s>),
    its vocabulary learned here on the builtin corpus and its merges derived from the vocabulary's order as
    transformers derives a SentencePiece model's (generate_merges). A chat template as the bpe one. `form`: the "▁"
    put in by a Metaspace pre-tokenizer (transformers 5's LlamaTokenizer) or by a Prepend + Replace normalizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from scalora.builtin import CHAT_TEMPLATE, pretraining_corpus

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(pretraining_corpus(), trainer)
    vocab = tok.get_vocab()
    merges = generate_merges(vocab, {t: -float(i) for t, i in vocab.items()})
    out = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=prepend_scheme != "never", add_bos_token=True)
    if form == "normalizer":  # the older form of Llama 2's and Mistral v0.1's tokenizer.json
        from tokenizers import normalizers

        out.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                                 normalizers.Replace(" ", "\u2581")])
        out.backend_tokenizer.pre_tokenizer = None
    out.chat_template = CHAT_TEMPLATE
    return out
