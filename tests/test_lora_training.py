"""A short training loop: only LoRA weights move and the loss falls."""

import pytest
import torch

import scalora
from conftest import load_quantized, tiny_config, tiny_model, tokens
from tolerance import (assert_losses_close, assert_rounding_close, logits_rtol, model_shape, operand_rtol, rel_diff,
                       rounding_rtol, trained_rtol)


def _train(model, steps=40, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = tokens(batch=4, length=24, seed=3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_only_lora_moves_and_loss_falls(base, saved_tiny_models):
    raw = tiny_model("llama") if base == "fp32" else load_quantized(saved_tiny_models["llama"], 4)
    model = scalora.get_peft_model(raw, scalora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # packed 4-bit weights are not parameters that require grad; keep their bytes too
    packed = {n: b.detach().clone() for n, b in model.state_dict().items() if "lora_" not in n}
    losses = _train(model)
    assert losses[-1] < 0.8 * losses[0], losses  # random tokens: ln(128)=4.85 at the start
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
    after = model.state_dict()
    assert all(torch.equal(after[n], b) for n, b in packed.items())


@pytest.mark.numerics
def test_first_layer_input_wants_no_gradient():
    """The orchestrator's model checkpoints without reentrancy, so the embeddings' output needs no gradient (peft's
    prepare_model_for_kbit_training skips `enable_input_require_grads` for it too): backward stops at the first
    layer's LoRA weights instead of computing a gradient for frozen embeddings, and every LoRA gradient is the one
    computed with it."""
    from scalora.config import load_config
    from scalora.data import build_datasets, collate
    from scalora.loss import token_loss_sum
    from scalora.model import build_model

    cfg = load_config(None, ["lora.lora_dropout=0.1"])
    model, tok, _ = build_model(cfg)
    model.train()
    batch = collate(build_datasets(cfg.data, tok, 0).train[:4], tok.pad_token_id)
    wants, grads = [], []
    for input_grads in (False, True):
        if input_grads:
            model.get_base_model().enable_input_require_grads()
        hook = model.get_input_embeddings().register_forward_hook(  # after transformers' hook, if any
            lambda mod, args, out: wants.append(out.requires_grad))
        torch.manual_seed(0)
        token_loss_sum(model, batch).backward()
        hook.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert wants == [False, True]  # without the hook, then with it
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    torch.manual_seed(1)  # other dropout masks: what a backward that recomputed with other masks would give
    token_loss_sum(model, batch).backward()
    other = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, g in grads[0].items():  # the same backward, maybe summed in another order
        assert_rounding_close(g, grads[1][n], logits_rtol(model.get_base_model(), backward=True), what=n,
                              wrong=other[n] if g.any() else None)  # lora_A's are zero while lora_B is


def _steps(compiled: bool, steps: int = 4):
    """Losses of `steps` AdamW steps, and the logits of the model (on the next batch) after the last step and the
    one before, and without the adapter."""
    from scalora.config import load_config
    from scalora.data import build_datasets, collate
    from scalora.loss import token_loss_sum
    from scalora.model import build_model

    cfg = load_config(None, ["lora.lora_dropout=0.0", f"model.compile={'true' if compiled else 'false'}"])
    torch.manual_seed(0)
    model, tok, _ = build_model(cfg)
    model.train()
    from scalora.model import decoder_layers

    assert all((getattr(layer, "_compiled_call_impl", None) is not None) == compiled
               for layer in decoder_layers(model))
    examples = build_datasets(cfg.data, tok, 0).train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, logits = [], []
    held_out = collate(examples[steps * 8:(steps + 1) * 8], tok.pad_token_id)

    def evaluate():  # at the real tokens (padding's outputs depend on the attention implementation, and compiled
        # runs pick another); the layers eager, as scalora's validation runs them (scalora/evaluate.py): what is
        # compared is the trained weights, and compiling inference graphs too took two more compiles (~9 s, [avx2])
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            logits = model(input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"]).logits
        return logits[held_out["attention_mask"].view(held_out["input_ids"].shape) != 0]

    for step in range(steps):
        batch = collate(examples[step * 8:(step + 1) * 8], tok.pad_token_id)  # a new sequence length each step
        loss = token_loss_sum(model, batch) / (batch["labels"][:, 1:] != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step >= steps - 2:
            logits.append(evaluate())
    with model.disable_adapter():
        bare = evaluate()
    return losses, logits, bare, model.get_base_model().config


@pytest.mark.slow  # ~25 s: the layers compile for the first two shapes
@pytest.mark.numerics
def test_compiled_layers_train_as_eager():
    """model.compile: the 4-bit base + LoRA + gradient checkpointing compiled per decoder layer gives the eager
    losses and trained model to fp32 rounding (tests/tolerance.py: the adapters compared by what they do, the
    model's logits after the last step; the eager model one step short lies far outside)."""
    eager, (short, eager_logits), bare, config = _steps(False)  # short: after the step before the last
    compiled, (_, compiled_logits), _, _ = _steps(True)
    assert_losses_close(compiled, eager, config)
    assert eager[-1] < eager[0]
    rtol = trained_rtol(config, len(eager), rel_diff(bare, eager_logits))
    assert_rounding_close(compiled_logits, eager_logits, rtol, wrong=short, what="logits after training")


_WIDTH_PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import scalora
from conftest import randomize_lora, tiny_model, tokens
from scalora.model import compile_layers
from tolerance import rel_diff
model = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
randomize_lora(model)
ids = tokens(batch=2, length=24, seed=5)
with torch.no_grad():
    eager = model(input_ids=ids).logits
    compile_layers(model)
    compiled = model(input_ids=ids).logits
print("RESULT", json.dumps({"simdlen": torch._inductor.config.cpp.simdlen, "rel": rel_diff(compiled, eager)}))
"""


@pytest.mark.slow  # two processes, each compiling two decoder layers (~15 s each)
def test_compiled_layers_keep_their_vector_width_apart(tmp_path):
    """model.compile in two processes sharing one inductor cache, the first at this CPU's own vector width, the
    second at AVX2's (ATEN_CPU_CAPABILITY=avx2, as on an AVX2 node sharing a cache directory): both compiled
    models' logits equal their eager logits to fp32 rounding. Without scalora.core.quant.pin_vector_width the second
    took the first's cached graph, written for 16-float vectors, compiled it with 8-float ones and gave NaN
    logits (this test failed so, torch 2.13 [avx512_bf16-amd]; a compiled DoRA layer gave values of 1e31)."""
    import json
    import os
    import subprocess
    import sys

    from scalora import hardware

    if hardware.cpu_kind(hardware.cpu_features()) in ("avx2", "baseline"):
        pytest.skip("this CPU runs AVX2 at most: no wider vector width to share a cache with")
    tests = os.path.dirname(os.path.abspath(__file__))
    shared = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}  # the first at the CPU's own width
    shared["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    results = []
    for extra in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        p = subprocess.run([sys.executable, "-c", _WIDTH_PROBE, tests], env={**shared, **extra}, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        results.append(json.loads(p.stdout.split("RESULT", 1)[1]))
    rtol = logits_rtol(tiny_config("llama"))  # the probe's model's shape
    for r in results:
        assert r["rel"] <= rtol, f"compiled logits at vector width {r['simdlen']}: {r['rel']:.3g} from eager's"
    assert [r["simdlen"] for r in results] == [512, 256], results  # the two widths did share the cache


def test_gpu_only_levers_are_refused_on_cpu(saved_tiny_models):
    """model.liger_kernel and flex attention need CUDA: on a CPU they stop with the fix, not deep in Triton/torch."""
    from scalora.config import load_config
    from scalora.core.errors import UserError
    from scalora.model import apply_liger_kernel, load_base

    if torch.cuda.is_available():
        pytest.skip("on a GPU these levers run (tests/test_cuda.py)")
    with pytest.raises(UserError, match="model.liger_kernel=false"):
        apply_liger_kernel(load_quantized(saved_tiny_models["llama"], 4))
    cfg = load_config(None, [f"model.name_or_path={saved_tiny_models['llama']}",
                             "model.attn_implementation=flex_attention"])
    with pytest.raises(UserError, match="use sdpa"):
        load_base(cfg, saved_tiny_models["llama"])


@pytest.mark.slow  # two CLI runs, one compiling (~20 s)
def test_compiled_packed_run_keeps_the_loss_curve(env, tmp_path):
    """`scalora train` with model.compile on packed data (rows padded to one shape) and LoRA dropout 0.05: the
    compiled layers draw other dropout masks than eager, so the curve is equal in distribution, not bitwise. Measured:
    losses within 3e-4 relative of eager on the throughput bench's 4m / 30m Llamas, 1.6e-3 on this tiny model (the
    loss falls 10 -> 7 in these 5 steps: a compiled path that stopped learning would be far outside 1e-2).
    Validation runs the layers eagerly (its batches' shapes differ from training's): the validation before training
    equals the eager run's bit for bit, and no layer is recompiled up to dynamo's limit (what validating through the
    compiled layers did, warning about it)."""
    import json

    from helpers import losses, run, train_args

    common = ["data.packing=true", "lora.lora_dropout=0.05", "train.max_steps=5", "train.eval_every=0",
              "train.save_every=0", "data.max_eval_generate=2"]  # generation: one-token steps with a KV cache
    run(env, *train_args(tmp_path / "eager", *common))
    p = run(env, *train_args(tmp_path / "compiled", *common, "model.compile=true"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == 5 and eager[5] < eager[1]
    assert compiled == pytest.approx(eager, rel=1e-2)

    def first_eval(out):
        return next(r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/loss" in r)

    assert first_eval(tmp_path / "compiled") == first_eval(tmp_path / "eager")
    assert "recompile_limit" not in p.stderr, p.stderr[-2000:]


def test_fast_dropout_keeps_torch_dropout_distribution():
    """FastDropout (train.fast_dropout): each element kept with probability 1 - p (resolved to 2**-16) and scaled
    by 1 / (1 - p), at every position of the four 16-bit halves a 64-bit draw gives, for any length; the identity in
    eval mode and at p = 0, and the same mask when gradient checkpointing recomputes (it draws from torch's
    generator, which checkpointing restores)."""
    from torch.utils.checkpoint import checkpoint

    from scalora.core.lora import FastDropout

    torch.manual_seed(0)
    x = torch.randn((1 << 22) + 3) + 3  # no zeros of its own; not a multiple of 4
    for p in (0.05, 0.1, 0.3, 0.5):  # below 0.15 drawn as positions (test_fast_dropout_positions_are_a_bernoulli_draw)
        drop = FastDropout(p).train()
        assert abs(drop.p_drawn - p) <= 2**-17
        y = drop(x)
        kept = y != 0
        sigma = (p * (1 - p) / (x.numel() // 4)) ** 0.5
        for half in range(4):  # a biased or short half (e.g. a draw over 63 bits) fails here
            assert abs(kept[half::4].float().mean().item() - (1 - p)) < 5 * sigma, (p, half)
        assert torch.equal(y[kept], x[kept] * (1 / (1 - drop.p_drawn)))
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))
    assert torch.equal(FastDropout(0.3).eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    w = torch.randn(64, 16, requires_grad=True)
    h = torch.randn(8, 64)
    drop = FastDropout(0.2).train()
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)
        w.grad = None
        f = (lambda t: (drop(t) @ w).square().sum())
        (checkpoint(f, h, use_reentrant=False) if use_checkpoint else f(h)).backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_fast_dropout_positions_are_a_bernoulli_draw():
    """FastDropout.drop_at_positions (DoRA's masks): the dropped positions are the mask's, in increasing order, and
    the drop a Bernoulli(p) one element by element: the rate p overall and in the last 1% (a draw that stops short
    leaves the tail kept), gaps of 1 between dropped elements with probability p and a mean gap of 1 / p (gaps
    off by one fail both), the kept elements scaled by 1 / (1 - p); the same positions when gradient
    checkpointing recomputes."""
    from torch.utils.checkpoint import checkpoint

    from scalora.core.lora import FastDropout

    torch.manual_seed(0)
    x = torch.randn(1 << 21) + 3
    for p in (0.05, 0.5, 0.9):
        drop = FastDropout(p).train()
        h, factor, keep, flat = drop.drop_at_positions(x)
        assert torch.equal(flat, (~keep).nonzero().squeeze(1)) and torch.equal(h != 0, keep)
        assert factor == 1 / (1 - drop.p_drawn) and torch.equal(h[keep], x[keep])
        n, tail = x.numel(), x.numel() // 100
        assert abs(flat.numel() / n - p) < 5 * (p * (1 - p) / n) ** 0.5, p
        assert abs((~keep[-tail:]).float().mean().item() - p) < 5 * (p * (1 - p) / tail) ** 0.5, p
        gaps = flat.diff()
        assert abs((gaps == 1).float().mean().item() - p) < 5 * (p * (1 - p) / gaps.numel()) ** 0.5, p
        assert abs(gaps.float().mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / gaps.numel()) ** 0.5, p
    h, factor, keep, flat = FastDropout(1.0).train().drop_at_positions(x)
    assert torch.equal(h, torch.zeros_like(x)) and not keep.any() and flat.numel() == x.numel()
    for p in (0.05, 0.1, 0.3):  # LoRA's masks (`drop`) are drawn this way below POSITIONS_BELOW, the same draws
        drop = FastDropout(p).train()
        torch.manual_seed(5)
        h, factor = drop.drop(x[:4099])
        torch.manual_seed(5)
        same = torch.equal(h, drop.drop_at_positions(x[:4099])[0])
        assert same == (p < FastDropout.POSITIONS_BELOW) and factor == 1 / (1 - drop.p_drawn), p
    w = torch.randn(64, 16, requires_grad=True)
    drop = FastDropout(0.2).train()
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)
        w.grad = None
        f = (lambda t: (drop.drop_at_positions(t)[0] @ w).square().sum())
        (checkpoint(f, torch.randn(8, 64), use_reentrant=False) if use_checkpoint else f(torch.randn(8, 64))
         ).backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])

@pytest.mark.parametrize("base", ["fp32", "nf4", "int8"])
@pytest.mark.numerics
def test_fused_lora_gives_peft_order_numbers(base, saved_tiny_models, monkeypatch):
    """train.fused_lora (`use_fused_lora`): the same logits and LoRA gradients as peft's order of operations, fp32
    and under bf16 autocast, in eval mode and with the fast, shared dropout (the same masks from the same seed); the
    fused path is taken (one addmm per LoRA layer whose base output is in the matmul's dtype; in training, q/k/v's
    and gate/up's lora_A as one matmul outside autocast, the other layers' lora_A called) and left for weights that
    DeepSpeed ZeRO-3 partitions."""
    from scalora.core.lora import LoraLayer, share_dropout_masks, use_fast_dropout, use_fused_lora

    from conftest import load_quantized

    import scalora

    base_model = load_quantized(saved_tiny_models["llama"], {"nf4": 4, "int8": 8}[base]) if base != "fp32" else \
        __import__("transformers").AutoModelForCausalLM.from_pretrained(saved_tiny_models["llama"])
    torch.manual_seed(0)
    model = scalora.get_peft_model(base_model, scalora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  lora_dropout=0.2, init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids = torch.randint(0, 100, (2, 16))
    addmm, addmm_, calls, a_calls, in_place = torch.addmm, torch.Tensor.addmm_, [], [], []
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda *a, **k: calls.append(1) or in_place.append(1) or addmm_(*a, **k))
    for m in layers:
        m.lora_A["default"].register_forward_hook(lambda *_: a_calls.append(1))

    def run(fused: bool, train: bool, autocast: bool):
        for m in layers:
            m.fused = fused
        model.train(train)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        return logits, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    with model.disable_adapter():
        bare = model(input_ids=ids).logits
    use_fast_dropout(model)
    grouped = 5 * share_dropout_masks(model) // 2  # 2 layers x (q/k/v, gate/up): 5 of each layer's 7
    for train, autocast in ((False, False), (True, False), (False, True), (True, True)):
        calls.clear(), a_calls.clear(), in_place.clear()
        logits, grads = run(True, train, autocast)
        # nf4 with fp32 compute (and int8 mostly) gives fp32 under autocast: those sums stay fp32, outside the addmm
        assert len(calls) == len(layers) or (autocast and base != "fp32"), (train, autocast)
        assert len(in_place) == len(calls), (train, autocast)  # into the base's output: no copy of it first
        assert len(a_calls) == len(layers) - (grouped if train and not autocast else 0), (train, autocast)
        ref, ref_grads = run(False, train, autocast)
        # every stage of the model may be summed (fp32) or rounded (bf16 autocast) differently; the backward too.
        # The adapters move the logits far beyond the tolerance.
        config = model.get_base_model().config
        depth = model_shape(config)[1]
        rtol, grad_rtol = (operand_rtol(depth), operand_rtol(2 * depth)) if autocast else \
            (logits_rtol(config), logits_rtol(config, backward=True))
        assert_rounding_close(logits, ref, rtol, wrong=bare.float(), what=f"logits {train=} {autocast=}")
        for g, r in zip(grads, ref_grads):
            assert_rounding_close(g, r, grad_rtol, what=f"gradient {train=} {autocast=}")
    assert use_fused_lora(model) == len(layers) and all(m.fused for m in layers)
    for m in layers:  # partitioned by ZeRO-3: lora_A and lora_B must be called as modules
        m.lora_A["default"].weight.ds_id = m.lora_B["default"].weight.ds_id = 0
    calls.clear(), a_calls.clear()
    assert_rounding_close(run(True, True, False)[0], run(False, True, False)[0], logits_rtol(config),
                          wrong=bare, what="ZeRO-3 partitioned")
    assert not calls and len(a_calls) == 2 * len(layers)
    for m in layers:
        del m.lora_A["default"].weight.ds_id, m.lora_B["default"].weight.ds_id
    kept = []  # a forward hook on a base layer could keep its output: that sum is not made in place
    layers[0].base_layer.register_forward_hook(lambda mod, args, out: kept.append(out.detach().clone()))
    hooked = []
    layers[0].base_layer.register_forward_hook(lambda mod, args, out: hooked.append(out))
    calls.clear(), in_place.clear()
    run(True, True, False)
    assert len(calls) == len(layers) and len(in_place) == len(layers) - 1
    assert torch.equal(hooked[0], kept[0])  # what the hook holds is still the base's output
    outs = []  # in place on the base's own (tokens, out) output, not on a view of it: no CopySlices in backward
    layers[1].register_forward_hook(lambda mod, args, out: outs.append(out))
    run(True, True, False)
    nodes, seen = [outs[0].grad_fn], []
    while nodes and len(seen) < 6:
        node = nodes.pop()
        seen.append(node.name())
        nodes += [n for n, _ in node.next_functions if n is not None]
    assert "AddmmBackward0" in seen and "CopySlices" not in seen, seen


DROPOUT_RUN = ["lora.lora_dropout=0.1", "train.max_steps=5", "train.eval_every=0", "train.save_every=0"]


@pytest.fixture(scope="module")
def torch_dropout_run(env):
    """The reference for the dropout switches: peft's path (torch's dropout, a mask per layer, peft's order)."""
    from helpers import run, train_args

    out = env["root"] / "dropout-torch"
    run(env, *train_args(out, *DROPOUT_RUN, "train.fast_dropout=false", "train.shared_dropout=false",
                         "train.fused_lora=false"))
    return out


@pytest.mark.slow  # a CLI run, and the shared reference's
@pytest.mark.parametrize("switches", [["train.shared_dropout=false", "train.fused_lora=false"], []],
                         ids=["fast", "fast+shared+fused"])
def test_fast_dropout_keeps_the_loss_curve(env, tmp_path, switches, torch_dropout_run):
    """`scalora train` with train.fast_dropout, alone and with train.shared_dropout and train.fused_lora (all three
    default), against peft's path (torch's dropout, a mask per layer, peft's order of operations), LoRA dropout 0.1:
    other masks, the same curve in distribution (the loss falls 10 -> 7 in 5 steps; a broken dropout, e.g. unscaled
    or dropping everything, is far outside 1e-2; measured 2.1e-3 with all three). The switches reach the layers: the
    curves are not bitwise equal."""
    from helpers import losses, run, train_args

    run(env, *train_args(tmp_path / "fast", *DROPOUT_RUN, *switches))
    plain, fast = losses(torch_dropout_run), losses(tmp_path / "fast")
    assert len(plain) == 5 and plain[5] < plain[1]
    assert fast == pytest.approx(plain, rel=1e-2) and fast != plain


def test_shared_dropout_masks_siblings_once(saved_tiny_models):
    """train.shared_dropout: q/k/v (and gate/up) of a layer get one mask per forward, o_proj and down_proj their
    own; each projection's LoRA input still has dropout's distribution, and gradient checkpointing's recomputation
    reproduces the same masks (same gradients with and without checkpointing). No tensor stays referenced after a
    forward (checkpointing's memory saving intact)."""
    from scalora.core.lora import LoraLayer, share_dropout_masks

    from conftest import load_quantized

    import scalora

    model = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], 4),
                                   scalora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      lora_dropout=0.3))
    assert share_dropout_masks(model) == 2 * 2  # 2 layers x (q/k/v, gate/up)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.lora_A["default"].register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, args[0]))
             for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    model.train()
    ids = torch.randint(0, 100, (2, 16))
    torch.manual_seed(0)
    model(input_ids=ids)
    attn = "base_model.model.model.layers.0.self_attn."
    mlp = "base_model.model.model.layers.0.mlp."
    zeros = {n: (t == 0) for n, t in seen.items()}
    assert torch.equal(zeros[attn + "q_proj"], zeros[attn + "k_proj"]) and torch.equal(zeros[attn + "q_proj"],
                                                                                      zeros[attn + "v_proj"])
    assert torch.equal(zeros[mlp + "gate_proj"], zeros[mlp + "up_proj"])
    assert not torch.equal(zeros[mlp + "gate_proj"][..., :16], zeros[attn + "q_proj"][..., :16])
    for h in hooks:
        h.remove()
    shares = {id(m.__dict__["dropout_share"]): m.__dict__["dropout_share"] for m in model.modules()
              if "dropout_share" in m.__dict__}
    assert all(s.key is None and s.out is None for s in shares.values())
    grads = []
    for gc in (False, True):
        model.zero_grad()
        if gc:
            model.base_model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
            model.base_model.model.enable_input_require_grads()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("arch,saved", [("llama", "model.norm"), ("gpt2", "ln_f")])
def test_loraplus_groups_are_peft_s(arch, saved):
    """LoRA+ (`train.loraplus_lr_ratio`): every trainable parameter gets the learning rate and weight decay that
    peft's create_loraplus_optimizer gives it, on a model with LoRA on every linear layer and a trained whole module
    (an RMSNorm, 1-D and decayed; GPT-2's nn.LayerNorm, 1-D and not decayed): lora_B at ratio x lr, lora_A at lr."""
    import peft
    from peft.optimizers import create_loraplus_optimizer

    from scalora.config import load_config
    from scalora.train import make_optimizer

    cfg = load_config(None, ["train.lr=1e-3", "train.loraplus_lr_ratio=16", "train.weight_decay=0.1"])
    ours = scalora.get_peft_model(tiny_model(arch), scalora.LoraConfig(r=4, target_modules="all-linear",
                                                                       modules_to_save=[saved]))
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                   modules_to_save=[saved]))

    def settings(model, optimizer):
        by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        return {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    got = settings(ours, make_optimizer(ours, cfg))
    want = settings(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                                      loraplus_weight_decay=0.1))
    assert got == want
    assert {v for k, v in got.items() if "lora_B" in k} == {(1.6e-2, 0.1)}
    assert {v for k, v in got.items() if "lora_A" in k} == {(1e-3, 0.1)}
    assert len(set(got.values())) == (2 if arch == "llama" else 3)  # GPT-2's LayerNorm: B without decay


@pytest.mark.slow  # two CLI runs
def test_loraplus_run_moves_lora_b_ratio_times_as_far(env, tmp_path):
    """`scalora train` with train.loraplus_lr_ratio=16, one step from the same start as a run without: lora_B starts
    at zero and lora_A gets no gradient in the first step (B = 0), so the step moves only B, by -lr x m / (sqrt(v)
    + eps) elementwise, from the same gradients in both runs (the same clipping too). lora_B's rate is 16 x lr, a
    power of two: B is 16 times the plain run's, element for element, to fp32 rounding (the update's few roundings
    scale exactly with it), and so is its norm (tests/tolerance.py's rounding_rtol over the update's stages); LoRA+
    not applied (ratio 1) lies far outside. A stays where both runs started."""
    from helpers import adapter, run, train_args

    common = ["train.max_steps=1", "train.eval_every=0", "train.save_every=0", "train.warmup_ratio=0",
              "lora.lora_dropout=0"]
    run(env, *train_args(tmp_path / "plain", *common))
    run(env, *train_args(tmp_path / "plus", *common, "train.loraplus_lr_ratio=16"))
    plain, plus = adapter(tmp_path / "plain"), adapter(tmp_path / "plus")
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys and all(torch.equal(plain[k], plus[k]) for k in plain if "lora_A" in k)
    got = torch.cat([plus[k].flatten() for k in b_keys])
    expected = 16 * torch.cat([plain[k].flatten() for k in b_keys])
    assert_rounding_close(got, expected, rounding_rtol(1, depth=4), wrong=expected / 16,
                          what="lora_B after one LoRA+ step against 16 x the plain step (wrong: ratio 1)")
