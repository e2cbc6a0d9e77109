"""scalora.attention (sdpa_segments): example-by-example causal SDPA against torch's SDPA with the block mask."""

from __future__ import annotations

import pytest
import torch

from scalora import attention
from scalora.builtin import build_tokenizer
from scalora.config import DataConfig, RunConfig
from scalora.data import collate, pack, tokenize_record

from tolerance import assert_rounding_close, assert_wrong_is_far, logits_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model(tok, impl: str, gqa: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2 if gqa else 4, vocab_size=len(tok), initializer_range=0.2,
                      use_cache=False, attn_implementation=impl)  # sharp attention: a wrong mask shows
    return LlamaForCausalLM(cfg)


def _rows(tok, packed: bool):
    cfg = DataConfig()
    recs = [{"instruction": "Which topic ?", "input": " ".join(["the band played"] * k), "output": "music"}
            for k in (1, 3, 2, 5, 4)]
    examples = [dict(zip(("input_ids", "labels"), tokenize_record(r, "instruction", tok, cfg))) for r in recs]
    if not packed:
        return examples
    rows = pack(examples, max_length=96)
    assert len(rows) < len(examples) and any(len(r["input_ids"]) < max(len(x["input_ids"]) for x in rows)
                                             for r in rows)  # packed, and a row with padding after it
    rows[-1] = {k: v + ([0] if k == "position_ids" else v[-1:]) for k, v in rows[-1].items()}  # a 1-token example
    return rows


def _run(impl: str, gqa: bool, batch: dict, real: torch.Tensor, tok):
    """Logits, and the gradients of a loss over the real tokens only."""
    model = _model(tok, impl, gqa)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch.get("position_ids")).logits
    (logits.square() * real[..., None]).mean().backward()
    return logits.detach(), [(n, p.grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_segments_match_sdpa_with_the_block_mask(tok, packed, gqa):
    """Packed rows (several examples, a one-token example, padding after the last) and padded rows: the same
    logits on every real token and the same gradients as SDPA with scalora's block mask (packed) or transformers'
    padding mask; a mask that let a row's examples see each other fails it. Padding's outputs are finite."""
    rows = _rows(tok, packed)
    seg_batch = collate(rows, tok.pad_token_id, segment_ids=True)
    real = (seg_batch["attention_mask"] != 0).view(seg_batch["input_ids"].shape)
    if packed:
        assert seg_batch["attention_mask"].max() >= 2 and (~real).any()
    ref, ref_grads = _run("sdpa", gqa, collate(rows, tok.pad_token_id), real, tok)
    ours, grads = _run(attention.NAME, gqa, seg_batch, real, tok)
    config = _model(tok, "sdpa", gqa).config
    rtol, grad_rtol = logits_rtol(config), logits_rtol(config, backward=True)
    assert_rounding_close(ours[real], ref[real], rtol, what="logits")
    assert torch.isfinite(ours).all()
    for (n, g), (_, r) in zip(grads, ref_grads):
        assert_rounding_close(g, r, grad_rtol, what=n)
    if packed:  # each row one sequence: examples see each other
        crossed, _ = _run(attention.NAME, gqa, {**seg_batch, "attention_mask": real.long()[:, None, None]}, real,
                          tok)
        assert_wrong_is_far(crossed[real], ref[real], rtol, "examples seeing each other")


def test_decoding_with_a_cache_matches_sdpa(tok):
    """Generation (queries shorter than keys, a padding mask, left-padded prompts): the masked fallback gives
    SDPA's next-token logits at every step."""
    ids = torch.tensor([[tok.pad_token_id, tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != tok.pad_token_id).long()
    out = {}
    for impl in ("sdpa", attention.NAME):
        model = _model(tok, impl).eval()
        model.config.use_cache = True
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        out[impl] = torch.stack(g.logits)
        config = model.config
    assert_rounding_close(out[attention.NAME], out["sdpa"], logits_rtol(config), what="next-token logits")


def test_the_run_picks_segments_on_cpus_in_fp32_unless_compiled_or_named():
    from scalora.model import attention_implementation

    from dataclasses import replace

    cfg = RunConfig()
    fp32, bf16 = torch.float32, torch.bfloat16
    assert attention_implementation(cfg, fp32, on_cpu=True) == attention.NAME
    assert attention_implementation(cfg, bf16, on_cpu=True) is None
    assert attention_implementation(cfg, fp32, on_cpu=False) is None
    assert attention_implementation(replace(cfg, model=replace(cfg.model, compile=True)), fp32, on_cpu=True) is None
    assert attention_implementation(replace(cfg, model=replace(cfg.model, attn_implementation="eager")), fp32,
                                    on_cpu=True) == "eager"
