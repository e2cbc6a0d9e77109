"""The chunked loss against the plain one: same loss and gradients, and never the whole logits in memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scalora
from scalora import loss as L

from conftest import load_quantized, tokens  # tokens() draws ids below 128, inside VOCAB
from tolerance import assert_rounding_close, operand_rtol, rounding_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py


def _plain(hidden, weight, bias, labels):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_function_matches_cross_entropy(chunk, bias):
    """Loss and the gradients to the hidden states, the head weight and bias, against F.cross_entropy (fp32)."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 50, 16, 300
    args = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3,
            torch.randn(v, generator=g) if bias else None]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    results = []
    for fn in (_plain, lambda x, w, b, y: L.ChunkedLinearCrossEntropy.apply(x, w, b, y, chunk)):
        leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
        out = fn(*leaves, labels)
        (out * 0.7).backward()  # a non-unit upstream gradient, as the loop's scaling gives
        results.append((out.detach(), [a.grad for a in leaves if a is not None]))
    (ref, ref_grads), (got, got_grads) = results
    # three sums in a row (the head's over h, the log-sum-exp's over v, the tokens'), the longest over v; the same
    # in backward. Gradients that missed the upstream 0.7 lie far outside.
    rtol = rounding_rtol(max(n, h, v), depth=3)
    assert_rounding_close(got.reshape(1), ref.reshape(1), rtol, wrong=ref.reshape(1) / 0.7, what="loss")
    for a, b in zip(got_grads, ref_grads):
        assert_rounding_close(a, b, rtol, wrong=b / 0.7, what="gradient")


VOCAB = 300  # unlike every other width of the model, so that a tensor of the logits' size is the logits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("loss") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    m = scalora.get_peft_model(load_quantized(str(path), 4),
                               scalora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m.train()


def _loss_and_grads(model, batch, chunked, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = L.token_loss_sum(model, batch, chunked)
    out.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunked", [True, "auto"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chunked_model_loss_matches_the_plain_path(model, autocast, chunked):
    """A 4-bit Llama with LoRA: the loss and every LoRA gradient as the plain path's (fp32 rounding; bf16 where
    autocast computes the head in bf16, as the plain path does)."""
    ids = tokens(batch=3, length=20, seed=5)
    labels = ids.clone()
    labels[:, :6] = -100  # a masked prompt
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    ref, ref_grads = _loss_and_grads(model, batch, False, autocast)
    got, got_grads = _loss_and_grads(model, batch, chunked, autocast)
    # Only the head and the loss are computed differently (3 stages: the head's sum over the hidden size, the
    # log-sum-exp's over the vocabulary, the tokens'); their error passes unamplified through the backward of the
    # layers below, which both paths compute alike.
    rtol = operand_rtol(3) if autocast else rounding_rtol(VOCAB, depth=3)
    # the prompt not masked: a wrong loss, far outside fp32's tolerance (bf16's is too wide to show it)
    unmasked = None if autocast else _loss_and_grads(model, {**batch, "labels": ids}, True, autocast)[0].reshape(1)
    assert_rounding_close(got.reshape(1), ref.reshape(1), rtol, wrong=unmasked, what="loss")
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) > 0
    for n in ref_grads:
        assert_rounding_close(got_grads[n], ref_grads[n], rtol, what=n)


def test_chunked_path_never_holds_the_whole_logits(model, monkeypatch):
    """No tensor kept for backward, and none made in backward, has the (tokens x vocabulary) logits' size."""
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * VOCAB * 8)  # 8 rows of logits per chunk
    ids = tokens(batch=4, length=40)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    whole = ids.numel() * VOCAB  # 48,000; the largest weight is 300 x 64
    for chunked, holds_whole in ((False, True), (True, False)):
        largest = 0

        def pack(t):
            nonlocal largest
            largest = max(largest, t.numel())
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = L.token_loss_sum(model, batch, chunked)
        out.backward()
        assert (largest >= whole) is holds_whole, (chunked, largest, whole)


def test_auto_chunks_only_large_logits(model, monkeypatch):
    calls = []
    original = L.ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(L.ChunkedLinearCrossEntropy, "apply", lambda *a: calls.append(a) or original(*a))
    ids = tokens(batch=2, length=24)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    L.token_loss_sum(model, batch, "auto")
    assert not calls  # 48 x 300 fp32 logits: far below 256 MiB
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * VOCAB * 10)
    L.token_loss_sum(model, batch, "auto")
    assert len(calls) == 1 and calls[0][-1] == 10


def test_the_head_runs_on_the_labelled_positions_only(model):
    """With the prompt masked, the output head sees only the positions whose next token carries loss (auto: 6 of
    the 3 x 20; the plain path: all 60)."""
    seen = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(  # calls that make logits (not the pass-through of the hidden states)
        lambda m, i, o: seen.append(o.reshape(-1, VOCAB).shape[0]) if o.shape[-1] == VOCAB else None)
    try:
        ids = tokens(batch=3, length=20, seed=5)
        labels = torch.full_like(ids, -100)
        labels[:, -2:] = ids[:, -2:]  # a two-token answer after a masked prompt
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        L.token_loss_sum(model, batch, "auto")
        L.token_loss_sum(model, batch, False)
    finally:
        hook.remove()
    assert seen == [6, 60]
