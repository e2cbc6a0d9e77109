"""Validation: per-token loss and perplexity, and exact match of generated answers, split across processes."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .config import RunConfig
from .data import Datasets, count_loss_tokens, device_batch, instruction_messages, instruction_prompt
from .loss import token_loss_sum


@torch.no_grad()
def loss_and_perplexity(model, accelerator, rows: list[dict], micro: int, pad_id: int,
                        chunked: Union[bool, str] = "auto") -> dict[str, float]:
    """Per-token validation loss and perplexity, the rows split across processes."""
    model.eval()
    loss = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    mine = rows[accelerator.process_index::accelerator.num_processes]
    for i in range(0, len(mine), micro):
        chunk = mine[i:i + micro]
        loss += token_loss_sum(model, device_batch(chunk, pad_id, accelerator.device, True), chunked)
        count += count_loss_tokens(chunk)
    loss, count = accelerator.reduce(loss, "sum"), accelerator.reduce(count, "sum")
    model.train()
    mean = (loss / count.clamp(min=1)).item()
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50))}


def answer_prompt(record: dict, fmt: str, tokenizer, cfg: RunConfig) -> Optional[tuple[list[int], str]]:
    """(prompt ids, reference answer) for exact-match scoring, or None for plain-text data."""
    d = cfg.data
    if fmt == "instruction" and d.instruction_template == "chat":
        fmt, record = "chat", {d.messages_field: instruction_messages(record, d)}
    if fmt == "instruction":
        ids = tokenizer(instruction_prompt(record, d), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + ids, str(record[d.output_field]).strip()
    if fmt == "chat":
        messages = record[d.messages_field]
        if not messages or messages[-1].get("role") != "assistant":
            return None
        text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], messages[-1]["content"].strip()
    return None


def question(record: dict, fmt: str, cfg: RunConfig) -> str:
    """What a validation example asks, for a sample line: the input (else the instruction), or the last user turn."""
    d = cfg.data
    if fmt == "instruction":
        return str(record.get(d.input_field) or record[d.instruction_field])
    users = [m for m in record.get(d.messages_field) or [] if m.get("role") == "user"]
    return str(users[-1]["content"]) if users else ""


@torch.no_grad()
def exact_match(model, accelerator, data: Datasets, tokenizer, cfg: RunConfig,
                samples: Optional[list[dict[str, str]]] = None, n_samples: int = 3) -> Optional[float]:
    """Share of validation answers generated greedily that equal the reference, after stripping spaces. With
    `samples`, the first `n_samples` of this rank's (question, reference, generated) are appended to it."""
    n = cfg.data.max_eval_generate
    pairs = [(p, r) for r in data.validation_records[:n] if (p := answer_prompt(r, data.format, tokenizer, cfg))]
    if not pairs:
        return None
    net = accelerator.unwrap_model(model)
    net.eval()
    base_config = net.get_base_model().config
    use_cache, base_config.use_cache = base_config.use_cache, True
    hits = torch.zeros((), device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for (ids, ref), record in pairs[accelerator.process_index::accelerator.num_processes]:
        max_new = len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + 2
        with accelerator.autocast():  # as in training: the k-bit preparation keeps norms in fp32
            out = net.generate(input_ids=torch.tensor([ids], device=accelerator.device), max_new_tokens=max_new,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        hits += answer == ref
        if samples is not None and total < n_samples:
            samples.append({"question": question(record, data.format, cfg), "reference": ref, "generated": answer})
        total += 1
    base_config.use_cache = use_cache
    net.train()
    hits, total = accelerator.reduce(hits, "sum"), accelerator.reduce(total, "sum")
    return (hits / total.clamp(min=1)).item()


def validate(model, accelerator, data: Datasets, tokenizer, cfg: RunConfig,
             samples: Optional[list[dict[str, str]]] = None) -> dict[str, float]:
    """Every validation metric the run config asks for (and generation samples into `samples`, if given).

    With model.compile the layers run eagerly here: validation batches come in other shapes than the training
    micro-batches (ragged lengths, a last smaller batch, one-token decoding steps with a KV cache), and compiling
    for each of them recompiled the layers up to dynamo's recompile limit (measured: 8 recompiles, ~20 s of a 30 s
    tiny packed run [amx_bf16 avx512_bf16]) for a forward pass that runs a few times per validation."""
    if cfg.model.compile:
        with torch.compiler.set_stance("force_eager"):
            return _validate(model, accelerator, data, tokenizer, cfg, samples)
    return _validate(model, accelerator, data, tokenizer, cfg, samples)


def _validate(model, accelerator, data: Datasets, tokenizer, cfg: RunConfig,
              samples: Optional[list[dict[str, str]]]) -> dict[str, float]:
    metrics = loss_and_perplexity(model, accelerator, data.validation, cfg.train.micro_batch_size,
                                  tokenizer.pad_token_id, cfg.train.chunked_loss)
    if cfg.data.max_eval_generate:
        em = exact_match(model, accelerator, data, tokenizer, cfg, samples)
        if em is not None:
            metrics["eval/exact_match"] = em
    return metrics


def describe(step: int, m: dict[str, float]) -> str:
    parts = [f"step {step}: validation loss {m['eval/loss']:.4f}, perplexity {m['eval/perplexity']:.2f}"]
    if "eval/exact_match" in m:
        parts.append(f"exact match {m['eval/exact_match']:.1%}")
    return ", ".join(parts)
