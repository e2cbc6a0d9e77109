"""DoRA (`use_dora=True`) against peft's on tiny transformers models: the magnitude's initialisation, logits and
every gradient (lora_A, lora_B, magnitude) on plain, GPT-2 Conv1D, 4-bit and 8-bit bases, with and without
dropout; adapter files both ways; merging (several adapters, unmerge, merge_and_unload) as peft merges.

Tolerances as the LoRA parity tests' (tests/tolerance.py: the logits' and gradients' fp32 rounding); the wrong
result each comparison must exclude: the same A and B as plain LoRA (DoRA's rescaling lost), or the base alone.
"""

import os

import peft
import pytest
import torch

import scalora
from scalora.core import quant
from conftest import assert_lora_parity, copy_lora, load_quantized, randomize_dora, tiny_model, tokens
from tolerance import assert_rounding_close, logits_rtol, operand_rtol, rel_diff, rounding_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)


def _pair(make_base, cfg=CFG, randomize=True):
    ours = scalora.get_peft_model(make_base(), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(**cfg))
    quant.keep_4bit_weights_plain(theirs)  # bitsandbytes' plain 4-bit path for both (tests/test_cpu_paths.py)
    if randomize:
        randomize_dora(ours)
        copy_lora(ours, theirs)
    return ours, theirs


def _as_lora(model, make_base):
    """The same A and B without DoRA: what a model that lost DoRA's rescaling computes."""
    plain = scalora.get_peft_model(make_base(), scalora.LoraConfig(**{**CFG, "use_dora": False}))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_" in n:
                p.copy_(params[n])
    return plain


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tokens() if ids is None else ids).logits


ARCHS = ["llama", "qwen2", "gpt2"]


def _biased(arch: str):
    """The tiny model with its biases (Qwen2's q/k/v, GPT-2's Conv1D; zero at init) set away from zero, so that
    DoRA's base term without the bias is tested."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_starts_at_peft_s_norms(arch):
    """The magnitude is initialised to ||W + s B A|| per output row (B = 0: W's row norms), peft's values to the
    rounding of a sum over the row; the adapter starts as a no-op (the base's logits)."""
    ours, theirs = _pair(lambda: tiny_model(arch), randomize=False)
    mags = {n: p for n, p in theirs.named_parameters() if "lora_magnitude_vector" in n}
    n_in = max(m.in_features for m in ours.modules() if isinstance(m, scalora.LoraLayer))
    checked = 0
    for n, p in ours.named_parameters():
        if "lora_magnitude_vector" in n:
            assert_rounding_close(p, mags[n], rounding_rtol(n_in), wrong=torch.ones_like(p), what=n)
            checked += 1
    assert checked == len(mags) > 0
    torch.testing.assert_close(_logits(ours), _logits(tiny_model(arch)), rtol=logits_rtol(tiny_model(arch)), atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_parity(arch):
    """Logits and the gradients of lora_A, lora_B and the magnitude equal peft's (eval mode, no dropout; the
    biases non-zero); the same A and B as plain LoRA lie outside."""
    ours, theirs = _pair(lambda: _biased(arch))
    assert_lora_parity(ours, theirs, tokens())
    assert any("lora_magnitude_vector" in n for n, p in ours.named_parameters() if p.requires_grad)
    assert_rounding_close(_logits(ours), _logits(theirs), logits_rtol(tiny_model(arch)),
                          wrong=_logits(_as_lora(ours, lambda: tiny_model(arch))), what="DoRA vs its LoRA")


@pytest.mark.parametrize("bits", [16, 4, 8])
def test_dropout_parity_in_training(saved_tiny_models, bits):
    """With dropout in training, DoRA needs the base's product on the dropped input (peft: F.linear with the
    de-quantized W; scalora on plain and 4-bit bases: the base's output on x less a sparse product with the dropped
    elements, `_DroppedProduct`; on 8-bit, peft's); the same seed gives peft's masks (torch's dropout, drawn once
    per layer in the same order): logits and gradients to rounding."""
    cfg = {**CFG, "lora_dropout": 0.3}
    path = saved_tiny_models["llama"]
    ours, theirs = _pair(lambda: tiny_model("llama") if bits == 16 else load_quantized(path, bits), cfg)
    ours.train()
    theirs.train()
    ids = tokens()
    outs = []
    for m in (ours, theirs):
        torch.manual_seed(7)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    rtol = logits_rtol(tiny_model("llama"))
    ours.eval()
    assert_rounding_close(outs[0].logits, outs[1].logits, rtol, wrong=_logits(ours, ids), what="dropped logits")
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_rounding_close(p.grad, grads[n], logits_rtol(tiny_model("llama"), backward=True), what=n)


def _without_sparse_input_gradient(mp, lora):
    """`_DroppedProduct`'s backward with its sparse term's gradient taken away (the dense one, where it computes the
    base's output, kept): sampled_addmm's result is its pattern, all zeros."""
    mp.setattr(torch.sparse, "sampled_addmm", lambda pattern, *a, **k: pattern)


def _without_dropped_product(mp, lora):
    """`_DroppedProduct` made to leave W d out: with the base's output, W x - W d returned as W x; after the base,
    W d returned as zero."""
    apply = lora._DroppedProduct.apply

    def lost(x, *args):
        r = apply(x, *args)
        return (r[0], r[0].detach()) if isinstance(r, tuple) else r.detach() * 0

    mp.setattr(lora._DroppedProduct, "apply", lost)


def _count_base_calls(layers) -> list:
    """A list that grows by one at each call of these LoRA layers' base forward, counted by wrapping the forward
    rather than by a hook (a hooked base computes its own output)."""
    calls: list = []
    for m in layers:
        m.base_layer.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(m.base_layer.forward)
    return calls


@pytest.mark.parametrize("deferred", [True, False], ids=["with-base", "after-base"])
@pytest.mark.parametrize("bits", [4, 16])
def test_sparse_dropped_product_with_scalora_s_dropout(saved_tiny_models, monkeypatch, bits, deferred):
    """The orchestrator's dropout (FastDropout, one mask for q/k/v and gate/up, lora_A on them as one matmul) with
    DoRA: W x' as the base's output on x less the sparse product on the dropped elements equals the dense product
    on the dropped input (the path test_dropout_parity_in_training checks against peft's numbers, forced here),
    logits and every gradient to rounding; a sparse backward that lost its input gradient lies outside. With-base:
    the base's output computed by `_DroppedProduct` from the W it de-quantizes (the base layer's own forward never
    runs; inside checkpointing, as the orchestrator runs it, W's transpose goes from the recomputation to the
    backward); after-base: the base's own output, then the sparse product. The 4-bit base runs once per layer and
    forward there, not twice. torch's dropout taken through its noise on ones is torch's dropout to the bit."""
    from scalora.core import lora
    from scalora.model import enable_checkpointing

    x = torch.randn(3, 5, 64)
    torch.manual_seed(2)
    want = torch.nn.Dropout(0.3)(x)
    torch.manual_seed(2)
    h, factor, mask = lora._drop_with_mask(torch.nn.Dropout(0.3), x)
    assert torch.equal(h, want) and factor == 1.0 and torch.equal(mask.keep, want != 0)

    path = saved_tiny_models["llama"]
    base = tiny_model("llama") if bits == 16 else load_quantized(path, bits)
    model = scalora.get_peft_model(base, scalora.LoraConfig(**{**CFG, "lora_dropout": 0.3}))
    lora.use_fast_dropout(model)
    assert lora.share_dropout_masks(model) == 4
    lora.use_fused_lora(model)
    randomize_dora(model)
    if deferred:
        enable_checkpointing(model)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, scalora.LoraLayer)]
    calls = _count_base_calls(layers)
    if not deferred:
        monkeypatch.setattr(lora.LoraLayer, "_base_deferred", lambda *a: False)
    ids = tokens()

    def run():
        model.zero_grad()
        calls.clear()
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = run()
    assert len(calls) == (0 if deferred else len(layers))
    with monkeypatch.context() as mp:
        mp.setattr(lora.LoraLayer, "_sparse_dropped_ok", lambda *a: False)
        ref_logits, ref_grads = run()
        # (16-bit: F.linear with W; checkpointing runs every forward twice)
        assert len(calls) == (2 if bits == 4 else 1) * (2 if deferred else 1) * len(layers)
    with monkeypatch.context() as mp:
        _without_sparse_input_gradient(mp, lora)
        _, lost = run()
    rtol = logits_rtol(tiny_model("llama"))
    assert_rounding_close(logits, ref_logits, rtol, wrong=_logits(model.eval(), ids), what="sparse dropped logits")
    grad_rtol = logits_rtol(tiny_model("llama"), backward=True)
    for n, g in ref_grads.items():
        assert_rounding_close(grads[n], g, grad_rtol, what=n)
    # the second decoder layer's sparse products feed every gradient of the first
    first = [n for n in ref_grads if ".layers.0." in n]
    assert len(first) == 21 and all(rel_diff(lost[n], ref_grads[n]) > 10 * grad_rtol for n in first)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-x", "fp32-x"])
@pytest.mark.parametrize("deferred", [True, False], ids=["with-base", "after-base"])
def test_sparse_dropped_product_in_bf16(saved_tiny_models, monkeypatch, deferred, x_dtype):
    """Under bf16 autocast on a 4-bit base computing in bf16 (`scalora train` in bf16): the sparse product runs in
    bf16 (embedding_bag, W de-quantized to bf16) and its input gradient in fp32 (sampled_addmm has no bf16 CPU
    kernel). One DoRA layer with FastDropout against the dense path: output and input gradient to two bf16
    roundings (the base's output and the sparse product's); dropout 0.8, lora_B zero and the magnitude at 10x the
    norm (m / n - 1 = 9), so that a forward without the sparse product, or a backward without its input gradient,
    lies outside by 10x. With-base: the base's output computed by `_DroppedProduct` too (its bf16 product from the
    same W); after-base: the base's own, then the sparse product. An fp32 x (what q/k/v and gate/up get from the
    norms the k-bit preparation keeps in fp32) takes the same bf16 path, the output in x's dtype as the 4-bit
    layer's own (before, W went to fp32 there: 1.74x LoRA's step against 1.53x on SmolLM2 in bf16
    [avx512_bf16-amd])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from scalora.core import lora

    if not deferred:
        monkeypatch.setattr(lora.LoraLayer, "_base_deferred", lambda *a: False)

    model = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 4, dtype=torch.bfloat16),
                                   scalora.LoraConfig(**{**CFG, "lora_dropout": 0.8}))
    lora.use_fast_dropout(model)
    randomize_dora(model)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    with torch.no_grad():  # B = 0: the output is the base's and DoRA's base term, W x + (m / n - 1) W x'
        layer.lora_B["default"].weight.zero_()
        layer.lora_magnitude_vector["default"].weight.copy_(10 * layer.dora_norm("default"))
    model.train()

    calls = _count_base_calls([layer])
    bags = []

    class Bags(TorchDispatchMode):  # the dtype of W's transpose that embedding_bag reads
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_embedding_bag"):
                bags.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    def run():
        torch.manual_seed(3)
        x = torch.randn(2, 16, layer.in_features, dtype=torch.bfloat16).to(x_dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), Bags():
            y = layer(x)
        assert y.dtype == x_dtype
        y.float().square().sum().backward()
        return y.detach().float(), x.grad.float()

    y, g = run()
    assert len(calls) == (0 if deferred else 1) and bags == [torch.bfloat16]
    with monkeypatch.context() as mp:
        mp.setattr(lora.LoraLayer, "_sparse_dropped_ok", lambda *a: False)
        y_ref, g_ref = run()
    with monkeypatch.context() as mp:
        _without_sparse_input_gradient(mp, lora)
        _, g_lost = run()
    with monkeypatch.context() as mp:
        _without_dropped_product(mp, lora)
        y_lost, _ = run()
    assert_rounding_close(y, y_ref, operand_rtol(2), wrong=y_lost, what="bf16 output")
    assert_rounding_close(g, g_ref, operand_rtol(2), wrong=g_lost, what="bf16 input gradient")


@pytest.mark.parametrize("arch,bits", [("llama", 16), ("llama", 4), ("gpt2", 16)])
def test_dropped_product_reads_w_in_the_base_s_layout(saved_tiny_models, arch, bits):
    """The base's product that `_DroppedProduct` computes beside its sparse one reads W as the base's own forward
    does (F.linear's W of (out, in), transposed as a view; Conv1D's (in, out) weight as it is), not W's contiguous
    transposed copy that the sparse product reads: in bf16 on the AVX2 kind the copy's layout took 737 ms against
    53 ms (480 x 576 by 576 x 1536), as LoRA's base product takes. Checked on the matmul's operands (aten.mm)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from scalora.core import lora

    base = tiny_model(arch) if bits == 16 else load_quantized(saved_tiny_models[arch], bits)
    model = scalora.get_peft_model(base, scalora.LoraConfig(**{**CFG, "lora_dropout": 0.3}))
    lora.use_fast_dropout(model)
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, scalora.LoraLayer))
    n_in, n_out = layer.in_features, layer.out_features
    seen = []

    class Operands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default and tuple(args[1].shape) == (n_in, n_out):
                seen.append(args[1].stride())
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, n_in)
    assert layer._base_deferred(x)
    with Operands():
        layer(x)
    assert seen == [(n_out, 1) if layer.fan_in_fan_out else (1, n_in)]


@pytest.mark.parametrize("bits,dtype", [(4, torch.bfloat16), (4, torch.float32), (8, torch.float32),
                                        (16, torch.bfloat16), (16, torch.float32)])
def test_dense_weight_converts_straight_to_the_compute_dtype(saved_tiny_models, bits, dtype):
    """`quant.dense_weight(dtype=...)`, which DoRA's products take in the compute dtype, converts what
    de-quantization gives (a bf16 4-bit base's own bf16) without an fp32 copy in between: the same values, to the
    bit, as the fp32 weight converted, whatever the base's kind and dtype, and in the dtype asked for."""
    if bits == 16:
        model = scalora.get_peft_model(tiny_model("llama").to(dtype), scalora.LoraConfig(r=2)).base_model.model
    else:
        model = load_quantized(saved_tiny_models["llama"], bits, dtype=dtype)
    layer = model.model.layers[0].mlp.down_proj
    layer = getattr(layer, "base_layer", layer)
    for want in (torch.bfloat16, torch.float16, torch.float32):
        got = quant.dense_weight(layer, dtype=want)
        assert got.dtype == want and torch.equal(got, quant.dense_weight(layer).to(want)), (bits, dtype, want)


def test_4bit_dora_keeps_no_dequantized_weight_for_backward(saved_tiny_models):
    """QDoRA with dropout in training saves no de-quantized (out, in) weight for backward (peft's F.linear with it
    does: a layer's worth of fp32 per layer between forward and backward): of the tensors autograd saves, watched
    through saved_tensors_hooks, none that is not a model parameter itself has a wrapped layer's weight shape. The
    8-bit base, which takes peft's F.linear with its de-quantized copy (bitsandbytes' int8 matmul would round the
    input to int8), shows the watch sees such a copy when one is saved."""
    ids = tokens(batch=1, length=11)  # 11 tokens: no activation shares a weight's shape

    def saved_copies(model):
        model.train()
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                shapes.append((tuple(t.shape), t.dtype))
            # detached: a hook that returns an output tensor itself ties it to its own graph node, a cycle through
            # autograd's C++ graph that Python's gc cannot free (the model, and its mapped checkpoint, stayed alive)
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, scalora.LoraLayer)}
        return [s for s, dtype in shapes if s in weights and dtype == torch.float32]

    cfg = scalora.LoraConfig(**{**CFG, "lora_dropout": 0.3})
    assert saved_copies(scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 4), cfg)) == []
    assert saved_copies(scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 8), cfg))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_parity(saved_tiny_models, bits):
    """QDoRA: on a bitsandbytes NF4 (double quantization) and an LLM.int8 base, the norm over the de-quantized
    weight: logits and gradients equal peft's."""
    path = saved_tiny_models["llama"]
    ours, theirs = _pair(lambda: load_quantized(path, bits))
    kinds = {type(m.base_layer).__name__ for m in ours.modules() if isinstance(m, scalora.LoraLayer)}
    assert kinds == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert_lora_parity(ours, theirs, tokens())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_files_both_ways(tmp_path, arch):
    """scalora's saved DoRA adapter has peft's keys (the magnitude as `...lora_magnitude_vector`) and loads in peft
    with the same logits; peft's loads in scalora."""
    from safetensors.torch import load_file

    ours, theirs = _pair(lambda: tiny_model(arch))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    rtol = logits_rtol(tiny_model(arch))
    bare = _logits(tiny_model(arch))
    in_peft = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours").eval()
    assert_rounding_close(_logits(in_peft), _logits(ours), rtol, wrong=bare, what="scalora's file in peft")
    in_ours = scalora.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "theirs")).eval()
    assert_rounding_close(_logits(in_ours), _logits(theirs), rtol, wrong=bare, what="peft's file in scalora")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_as_peft_merges(arch):
    """merge_adapter / unmerge_adapter / merge_and_unload with two DoRA adapters active: the merged weights are
    peft's (m / n * (W + s B A), n over the unmerged W, in turn) to the rounding of the row norm's sum, the merged
    logits the unmerged model's; unmerging gives W back; a merge that forgot the rescaling (the LoRA sum) lies
    outside."""
    make = lambda: tiny_model(arch)  # noqa: E731
    ours, theirs = _pair(make)
    for m in (ours, theirs):
        m.add_adapter("second", (scalora if m is ours else peft).LoraConfig(**{**CFG, "r": 2}))
    randomize_dora(ours, seed=3)
    copy_lora(ours, theirs)
    for m in (ours, theirs):
        m.base_model.set_adapter(["default", "second"])
    ours.eval()
    theirs.eval()
    unmerged = _logits(ours)
    lora_merge = _logits(_as_lora(ours, make).merge_and_unload())  # the wrong merge: LoRA's sum, no rescaling
    rtol = logits_rtol(make())
    n_in = max(m.in_features for m in ours.modules() if isinstance(m, scalora.LoraLayer))
    weight_rtol = rounding_rtol(n_in, depth=2)  # the row norm (a sum over the row), then the rescaled sum
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith("base_layer.weight")}
    ours.merge_adapter()
    theirs.merge_adapter(["default", "second"])
    ref = dict(theirs.named_parameters())
    checked = 0
    for n, p in ours.named_parameters():
        if n.endswith("base_layer.weight"):
            assert_rounding_close(p, ref[n], weight_rtol, wrong=before[n], what=n)
            checked += 1
    assert checked > 0
    assert_rounding_close(_logits(ours), unmerged, rtol, wrong=_logits(make()), what="merged logits")
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in before:
            assert_rounding_close(p, before[n], weight_rtol, what=f"unmerged {n}")
    merged = ours.merge_and_unload()
    assert_rounding_close(_logits(merged), unmerged, rtol, wrong=lora_merge,
                          what="merge_and_unload against the unmerged model (wrong: LoRA's merge)")


def test_quantized_merge_dequantized(saved_tiny_models):
    """merge_and_unload(dequantize=True) on an NF4 base: the de-quantized weights with DoRA merged, the model's
    logits to rounding; the streamed GGUF merge uses the same rule (LoraLayer.merged_weight)."""
    path = saved_tiny_models["llama"]
    model = scalora.get_peft_model(load_quantized(path, 4), scalora.LoraConfig(**CFG))
    randomize_dora(model)
    adapted = _logits(model)
    merged = model.merge_and_unload(dequantize=True)
    assert not any(quant.is_4bit(m) for m in merged.modules())
    assert_rounding_close(_logits(merged), adapted, logits_rtol(merged), wrong=_logits(load_quantized(path, 4)),
                          what="de-quantized DoRA merge")


def test_disable_set_and_delete_adapter():
    """disable_adapter gives the base exactly; set_adapter makes only that adapter's A, B and magnitude trainable;
    delete_adapter removes its magnitude too."""
    model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    model.add_adapter("other", scalora.LoraConfig(**CFG))
    randomize_dora(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(tiny_model("llama")), rtol=0, atol=0)
    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    assert any("lora_magnitude_vector.other" in n for n in trainable)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_meta_base_waits_for_its_weights():
    """On a base on the meta device (the layer-by-layer loader's skeleton) the magnitude is left pending, a forward
    before it is computed is refused, and init_weights.finish computes what a loaded base gives."""
    from scalora.core.init_weights import finish

    from accelerate import init_empty_weights

    loaded = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG))
    with init_empty_weights(include_buffers=False):
        skeleton = type(tiny_model("llama"))(tiny_model("llama").config).eval()
    model = scalora.get_peft_model(skeleton, scalora.LoraConfig(**CFG))
    layers = [m for m in model.modules() if isinstance(m, scalora.LoraLayer)]
    assert layers and all(m.dora_pending == {"default"} for m in layers)
    state = tiny_model("llama").state_dict()
    wrapped = {n: state[n.replace(".base_layer", "")] for n, p in model.get_base_model().named_parameters()
               if p.is_meta}
    model.get_base_model().load_state_dict(wrapped, assign=True, strict=False)
    with pytest.raises(RuntimeError, match="never computed"):
        _logits(model)
    assert finish(model) == len(layers)
    ref = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        if "lora_magnitude_vector" in n:
            torch.testing.assert_close(p, ref[n], rtol=0, atol=0)


@pytest.mark.slow  # two CLI runs
def test_scalora_train_with_dora(env, tmp_path):
    """`scalora train ... lora.use_dora=true` (NF4 base, one process): the loss falls; the layer-by-layer loader
    (the default on a CPU), which computes each layer's magnitude once its weights are in, trains the adapter
    from_pretrained's path trains (dist.low_memory_loading=false), bit for bit; the adapter holds peft's keys and
    loads in peft on the same 4-bit base with scalora's logits."""
    from helpers import adapter, losses, run, train_args

    common = ["lora.use_dora=true", "train.max_steps=4", "train.eval_every=0", "train.save_every=0"]
    run(env, *train_args(tmp_path / "layerwise", *common))
    run(env, *train_args(tmp_path / "whole", *common, "dist.low_memory_loading=false"))
    got = losses(tmp_path / "layerwise")
    assert got[4] < got[1]
    a, b = adapter(tmp_path / "layerwise"), adapter(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_magnitude_vector") for k in a)
    base = env["base"]
    ours = scalora.PeftModel.from_pretrained(load_quantized(base, 4), str(tmp_path / "layerwise" / "final")).eval()
    theirs = peft.PeftModel.from_pretrained(load_quantized(base, 4), str(tmp_path / "layerwise" / "final")).eval()
    quant.keep_4bit_weights_plain(theirs)
    ids = tokens()
    with theirs.disable_adapter():
        bare = _logits(theirs, ids)
    assert_rounding_close(_logits(ours, ids), _logits(theirs, ids), logits_rtol(ours.get_base_model()), wrong=bare,
                          what="trained DoRA adapter, scalora vs peft")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_norm_makes_no_weight_sized_tensor(arch):
    """DoRA's norm ||W + s B A|| per output row from the expanded square (W A^T and A A^T): the fp64 direct
    computation's values to fp32 rounding of a sum over the row, with the adapter moved well away from zero
    (||s B A|| about half of ||W|| per row); without the cross term or the s^2 ||B A||^2 term it lies outside. And
    no operation inside makes an out x in tensor (B A and W + s B A did: three weight-sized fp32 tensors for a
    moment, W included, where the planner now counts one). GPT-2's Conv1D: W in its (in, out) layout turned."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(**CFG))
    layer = next(m for m in model.modules() if isinstance(m, scalora.LoraLayer))
    w = layer.dense_weight()
    g = torch.Generator().manual_seed(0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=g))
        b.copy_(torch.randn(b.shape, generator=g))
        s = layer.scaling["default"]
        b.mul_(0.5 * w.norm() / (s * (b @ a).norm()))
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor))
            return out

    with Sizes():
        norm = layer.dora_norm("default", w)
    assert sizes and max(sizes) < w.numel(), (max(sizes), tuple(w.shape))
    w64, a64, b64 = w.double(), a.double(), b.double()
    exact = torch.linalg.vector_norm(w64 + s * (b64 @ a64), dim=1)
    no_cross = (w64.norm(dim=1) ** 2 + (s * (b64 @ a64)).norm(dim=1) ** 2).sqrt()
    no_square = (w64.norm(dim=1) ** 2 + 2 * s * (w64 * (b64 @ a64)).sum(1)).clamp_min(0).sqrt()
    rtol = rounding_rtol(layer.in_features, depth=2)  # the row sums, then the sum of the three terms
    assert_rounding_close(norm.double(), exact, rtol, wrong=no_cross, what="norm (wrong: no cross term)")
    assert_rounding_close(norm.double(), exact, rtol, wrong=no_square, what="norm (wrong: no s^2 ||B A||^2)")


@pytest.mark.slow  # inductor compiles the layer's forward and backward (~10-20 s on 2 cores)
def test_compiled_dora_layer_equals_eager(saved_tiny_models):
    """A DoRA layer on a 4-bit base under torch.compile (what model.compile does to each decoder layer): the norm
    computed inside the graph (the cache is for eager), no sparse product (its positions' count is data). Output
    and the gradients of x, A, B and the magnitude equal eager's to fp32 rounding of the layer's sums; the same A
    and B as plain LoRA (DoRA's rescaling lost) lie outside."""
    model = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 4), scalora.LoraConfig(**CFG))
    randomize_dora(model)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    layer.train()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]

    x0 = torch.randn(2, 16, layer.in_features, generator=torch.Generator().manual_seed(3))

    def run(fn):
        x = x0.clone().requires_grad_()
        y = fn(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        return [y.detach(), *grads]

    from torch._dynamo.utils import counters

    from scalora.core.quant import pin_vector_width

    torch._dynamo.reset()
    counters.clear()
    pin_vector_width()  # as model.compile does
    eager, compiled = run(layer), run(torch.compile(layer))
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly as a whole
    plain = _as_lora(model, lambda: load_quantized(saved_tiny_models["llama"], 4))
    with torch.no_grad():
        lost = plain.base_model.model.model.layers[0].mlp.gate_proj(x0)
    rtol = rounding_rtol(layer.in_features, depth=3)  # the base's and B A's sums, then the backward's
    assert_rounding_close(compiled[0], eager[0], rtol, wrong=lost, what="compiled DoRA output")
    for got, want, what in zip(compiled[1:], eager[1:], ("x", "lora_A", "lora_B", "magnitude")):
        assert_rounding_close(got, want, rtol, what=f"compiled DoRA gradient of {what}")


def test_norm_follows_adapter_updates_however_made():
    """The norm is computed once per A / B values (the micro-batches of a step and checkpointing's recomputation
    share it), and again after any change: an optimizer step (in place), and a write through `.data` (no version
    count, as sharding engines copy updated values in). After each, logits equal peft's on the same weights; a
    norm kept from before lies outside."""
    ours, theirs = _pair(lambda: _biased("llama"))
    rtol = logits_rtol(tiny_model("llama"))
    ids = tokens()
    first = _logits(ours, ids)
    for change in ("optimizer", "data"):
        for m in (ours, theirs):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n or "lora_A" in n:
                        (p.data.mul_(1.5) if change == "data" else p.add_(0.05 * torch.ones_like(p)))
        stale = scalora.get_peft_model(_biased("llama"), scalora.LoraConfig(**CFG))  # new A, B; old norm
        copy_lora(ours, stale)
        for (n, mod), (_, old) in zip(stale.named_modules(), ours.named_modules()):
            if isinstance(mod, scalora.LoraLayer):
                mod.__dict__["_dora_norm_cache"] = {"default": (None,) * 3 + (old._dora_norm_cache["default"][3],)}
                mod._cached_dora_norm = (lambda m: lambda name: m._dora_norm_cache[name][3])(mod)
        assert_rounding_close(_logits(ours, ids), _logits(theirs, ids), rtol, wrong=_logits(stale, ids),
                              what=f"after an update by {change}")
    assert rel_diff(_logits(ours, ids), first) > 1e-3


_ZERO3_NORM = r"""
import os, sys
import deepspeed, torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
sys.path.insert(0, "tests")
import scalora
from conftest import randomize_dora, tiny_model
from scalora.dist import skip_inference_shm_op

skip_inference_shm_op()  # as scalora's engine start does (no inference op compiled)
deepspeed.init_distributed(dist_backend="gloo")
model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       use_dora=True))
randomize_dora(model)
layers = {n: m for n, m in model.named_modules() if isinstance(m, scalora.LoraLayer)}
expected = {n: m.dora_norm("default") for n, m in layers.items()}
params = [p for p in model.parameters() if p.requires_grad]
config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.0), config=config)
for n, m in layers.items():
    watched = (m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.weight)
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in watched), n
    got = m._cached_dora_norm("default")
    assert torch.equal(got, expected[n]), (n, (got - expected[n]).abs().max())
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in watched), n  # partitioned again
    assert m._cached_dora_norm("default") is got  # the cache keyed by the gathered tensors' identity
print("checked", len(layers))
"""


@pytest.mark.slow  # DeepSpeed's import and engine in a process of its own
def test_norm_gathers_zero3_partitioned_weights(tmp_path):
    """The norm read outside a forward under ZeRO-3 (where DeepSpeed's hooks have not gathered A, B and W, e.g. with
    its persistence threshold at 0): `_cached_dora_norm` gathers them for the moment and partitions them again,
    giving the norm of the whole weights, to the bit (the same values, the same operations). One process on gloo:
    every parameter partitioned, none whole outside a forward."""
    import subprocess
    import sys

    from helpers import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-c", _ZERO3_NORM], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "checked 14" in p.stdout
