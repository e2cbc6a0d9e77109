"""`model.keep_base_outputs`: under gradient checkpointing the LoRA layers' frozen base outputs are kept from the
forward and handed back to the recomputation (scalora/core/lora.py `keep_base_outputs_contexts`) instead of being
computed again, on 4-bit bases. The reference is the same model checkpointed without it: the same loss and every
LoRA gradient equal to rounding (backward runs the same graph on the same values); a recomputation that got other
values back (zeros) lies outside that tolerance. The 4-bit base is called once fewer per wrapped layer and
checkpointed call; other bases are computed as before.
"""

import pytest
import torch

import scalora
from scalora.core import lora
from scalora.model import enable_checkpointing
from conftest import load_quantized, randomize_dora, tiny_model, tokens
from tolerance import assert_rounding_close, logits_rtol

CASES = [  # (bits, use_dora, lora_dropout, the orchestrator's levers)
    (4, False, 0.1, True),
    (4, True, 0.3, True),
    (4, True, 0.3, False),
    (4, True, 0.0, True),
    (16, True, 0.3, False),  # plain and 8-bit bases save their input for backward: computed again, nothing kept
    (8, False, 0.0, True),
]


def _run(make_base, cfg, keep: bool, levers: bool = False):
    model = scalora.get_peft_model(make_base(), scalora.LoraConfig(**cfg))
    if levers:  # what `scalora train` turns on (train.fast_dropout, shared_dropout, fused_lora)
        lora.use_fast_dropout(model)
        lora.share_dropout_masks(model)
        lora.use_fused_lora(model)
    randomize_dora(model)
    model.train()
    enable_checkpointing(model, keep_base_outputs=keep)
    calls = []
    for m in model.modules():
        if isinstance(m, scalora.LoraLayer):
            m.base_layer.register_forward_hook(lambda *a: calls.append(1))
    ids = tokens(batch=2, length=12)
    torch.manual_seed(7)  # the dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls), sum(isinstance(m, scalora.LoraLayer) for m in model.modules())


@pytest.mark.parametrize("bits,dora,dropout,levers", [
    c if c == (4, True, 0.3, True) else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_kept_outputs_train_as_recomputed(saved_tiny_models, monkeypatch, bits, dora, dropout, levers):
    path = saved_tiny_models["llama"]

    def make_base():
        return tiny_model("llama") if bits == 16 else load_quantized(path, bits)

    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora, lora_dropout=dropout)
    loss_ref, grads_ref, calls_ref, n_layers = _run(make_base, cfg, False, levers)
    loss, grads, calls, _ = _run(make_base, cfg, True, levers)
    assert torch.equal(loss, loss_ref)  # the same operations on the same values: the same bits
    rtol = logits_rtol(tiny_model("llama"), backward=True)

    # what a recomputation handed other values than the forward's would give (here zeros)
    original = lora.LoraLayer._base_output

    def lost(self, tag, x):
        out = original(self, tag, x)
        phase = lora._current_phase()
        return out * 0.0 if phase is not None and phase.recompute else out  # (attached as the kept output is)

    monkeypatch.setattr(lora.LoraLayer, "_base_output", lost)
    _, grads_wrong, _, _ = _run(make_base, cfg, True, levers)
    for n, g in grads_ref.items():
        assert g.abs().sum() > 0, n
        assert_rounding_close(grads[n], g, rtol, wrong=grads_wrong[n] if bits == 4 else None, what=n)

    # the 4-bit base called again in the recomputation only where its product is not kept
    kept = 1 if bits == 4 else 0
    assert calls == calls_ref - n_layers * kept


def test_nothing_kept_outside_checkpointing(saved_tiny_models):
    """Without the contexts (no checkpointing, evaluation) the layer computes as before and keeps nothing."""
    model = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 4),
                                   scalora.LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                      lora_dropout=0.1))
    model.train()
    ids = tokens(batch=1, length=8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert lora._current_phase() is None
    with lora.keep_base_outputs_contexts()[0] as phase:
        with torch.no_grad():
            model(input_ids=ids)
        assert phase.kept == {}  # nothing to recompute without gradients
        model(input_ids=ids, labels=ids)
        # one output per layer: DoRA's product on the dropped input is W x minus a sparse product, not a second one
        assert len(phase.kept) == sum(isinstance(m, scalora.LoraLayer) for m in model.modules())
    assert lora._current_phase() is None


def test_refused_where_it_cannot_work():
    """Combinations where keeping the outputs would do nothing or could not work are refused before launch, each
    with the alternative; the plain 4-bit, checkpointed run is accepted, and under DDP and ZeRO-2."""
    from scalora import dist
    from scalora.config import ConfigError, load_config

    def problems(*over):
        try:
            load_config("configs/tiny.yaml", ["model.keep_base_outputs=true", "model.gradient_checkpointing=true",
                                              *over])
        except ConfigError as e:
            return str(e)
        return ""

    assert problems() == ""
    assert "set model.gradient_checkpointing=true" in problems("model.gradient_checkpointing=false")
    assert "set quant.bits=4" in problems("quant.bits=8")
    assert "model.compile=true" in problems("model.compile=true")
    cfg = load_config("configs/tiny.yaml", ["model.keep_base_outputs=true", "model.gradient_checkpointing=true"])
    for kind in ("zero3", "fsdp"):
        assert any("launch/zero2.yaml" in p and "keep_base_outputs" in p for p in dist.topology_problems(kind, cfg))
    for kind in ("single", "ddp", "zero2"):
        assert not any("keep_base_outputs" in p for p in dist.topology_problems(kind, cfg))
