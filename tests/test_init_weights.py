"""Initialisations from the base weight (`init_lora_weights` = "pissa", "pissa_niter_<n>", "olora", "loftq") against
peft's on tiny transformers models, on full-precision, 4-bit and 8-bit bases; the conversion of a PiSSA adapter to
plain LoRA on save; `scalora train` with PiSSA: the converted final adapter in peft, and an exact resume.

Where scalora and peft run the same operations on the same numbers (one LAPACK call on the same fp32 matrix, the
same products), the results are compared for equality: any difference is a different computation, not rounding.
Where the order of sums differs (the model at initialisation against the original model: W_res + s B A against W),
the tolerances are tests/tolerance.py's; the wrong result each must exclude is named beside it.
"""

import json
import os
import shutil

import peft
import pytest
import torch

import scalora
from scalora.core import quant
from scalora.core.errors import UserError
from scalora.core.lora import LoraLayer
from conftest import load_quantized, tiny_model, tokens
from helpers import adapter, run, train_args
from tolerance import assert_rounding_close, assert_wrong_is_far, logits_rtol, rounding_rtol

pytestmark = pytest.mark.numerics  # reruns under lower instruction sets: tests/test_isa_levels.py

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tokens() if ids is None else ids).logits


def _layers(model):
    """LoRA layers by their name in the transformers model (as in its checkpoint and in a bare copy of it)."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _as_plain_lora(path):
    """The adapter config at `path` read as plain LoRA (what a reader that ignores init_lora_weights sees)."""
    return scalora.LoraConfig.from_dict({**json.loads((path / "adapter_config.json").read_text()),
                                         "init_lora_weights": True})


def _bnb_quantized(w: torch.Tensor, like: torch.nn.Module) -> torch.Tensor:
    """`w` quantized as bitsandbytes quantizes a base layer like `like`, de-quantized to fp32."""
    import bitsandbytes as bnb

    if quant.is_4bit(like):
        p = like.weight
        q = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, blocksize=p.blocksize,
                              compress_statistics=p.compress_statistics, quant_type=p.quant_type).to("cpu")
        return bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    q = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).float()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_full_precision_init_is_peft_and_keeps_the_model(init):
    """On an fp32 Llama: A, B and the residual base weights equal peft's; the model at initialisation computes the
    original model's logits to rounding (W_res + s B A is W), and the residual base alone lies far from them."""
    cfg = dict(CFG, init_lora_weights=init)
    ours = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**cfg))
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.equal(mine[k], ref[k]), k
    assert any("lora_B" in k and mine[k].abs().sum() > 0 for k in mine)  # not LoRA's zero B
    original = _logits(tiny_model("llama"))
    with ours.disable_adapter():
        residual_only = _logits(ours)
    rtol = logits_rtol(ours.get_base_model())
    assert_rounding_close(_logits(ours), original, rtol, wrong=residual_only, what=f"{init}: model at init")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_quantized_init_uses_the_checkpoint_weights(saved_tiny_models, bits, init):
    """On a 4-bit / 8-bit base, A and B are peft's from the full-precision weights read off the checkpoint, and the
    base is that residual quantized once: what peft's PiSSA on the fp32 model, saved and loaded quantized, gives
    (peft itself refuses PiSSA on a quantized base and de-quantizes for OLoRA)."""
    cfg = dict(CFG, init_lora_weights=init)
    ours = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], bits), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**cfg))
    ref = dict(theirs.named_parameters())
    layers = _layers(ours)
    assert layers
    for name, m in layers.items():
        peft_name = "base_model.model." + name
        assert torch.equal(m.lora_A["default"].weight, ref[f"{peft_name}.lora_A.default.weight"]), name
        assert torch.equal(m.lora_B["default"].weight, ref[f"{peft_name}.lora_B.default.weight"]), name
        expected = _bnb_quantized(ref[f"{peft_name}.base_layer.weight"], m.base_layer)
        assert torch.equal(quant.dense_weight(m.base_layer), expected), name
        # the base is not the plain checkpoint quantized: the residual went in
        assert not torch.equal(expected, _bnb_quantized(tiny_model("llama").get_submodule(name).weight,
                                                        m.base_layer))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("alpha", [4, 8])
def test_loftq_takes_the_quantization_error(saved_tiny_models, bits, alpha):
    """LoftQ on a 4-bit / 8-bit base: the base is the checkpoint quantized as usual, s B A the best rank-r
    approximation of the quantization error W - Q(W). At lora_alpha == r (s = 1) A and B are peft's
    (`_low_rank_decomposition`, what replace_lora_weights_loftq sets; peft leaves s out, peft#1982); at s = 2, s B A
    is that same product. The weight error left, ||W - Q(W) - s B A||, is the error's singular values past r
    (Eckart-Young), to rounding; with a zero adapter (what a lost initialisation leaves) it is all of them."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    cfg = dict(CFG, lora_alpha=alpha, init_lora_weights="loftq", loftq_config={"loftq_bits": bits, "loftq_iter": 1})
    ours = scalora.get_peft_model(load_quantized(saved_tiny_models["llama"], bits), scalora.LoraConfig(**cfg))
    plain = load_quantized(saved_tiny_models["llama"], bits)
    full = tiny_model("llama")
    for name, m in _layers(ours).items():
        w = full.get_submodule(name).weight.detach()
        q = quant.dense_weight(m.base_layer)
        assert torch.equal(q, quant.dense_weight(plain.get_submodule(name)))  # the base is left as it is
        a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        dec = _low_rank_decomposition(w - q, reduced_rank=m.r["default"])
        if s == 1:
            assert torch.equal(a, dec["R"]) and torch.equal(b, dec["L"]), name
        n = w.shape[1]
        assert_rounding_close(s * b @ a, dec["L"] @ dec["R"], rounding_rtol(m.r["default"], 2), what=f"{name} s B A")
        left = torch.linalg.vector_norm(w - q - s * b @ a)
        tail = dec["S"][m.r["default"]:].square().sum().sqrt()
        assert_rounding_close(left.reshape(1), tail.reshape(1), rounding_rtol(n, 2),
                              wrong=torch.linalg.vector_norm(w - q).reshape(1), what=f"{name} error left")


def test_replace_lora_weights_loftq_and_the_saved_file(saved_tiny_models, tmp_path):
    """peft's `replace_lora_weights_loftq` on a plain 4-bit LoRA model gives what init 'loftq' gives; a callback
    returning False rolls its layers back. The saved LoftQ adapter is plain LoRA (init True: LoftQ leaves the base as
    it is, and 'loftq' would make peft run it again on load), which peft loads onto the 4-bit base with scalora's
    logits; the LoRA initialisation's logits (B = 0: the base alone) lie far from them."""
    path = saved_tiny_models["llama"]
    loftq = scalora.get_peft_model(load_quantized(path, 4), scalora.LoraConfig(**CFG, init_lora_weights="loftq"))
    model = scalora.get_peft_model(load_quantized(path, 4), scalora.LoraConfig(**CFG))
    with torch.no_grad():
        plain = _logits(model)
    scalora.replace_lora_weights_loftq(model, callback=lambda m, name: "mlp" in name)
    want = dict(loftq.named_parameters())
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, want[n]) == (".mlp." in n), n
    scalora.replace_lora_weights_loftq(model, model_path=path)
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n
    loftq.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["init_lora_weights"] is True and conf["loftq_config"] == {}
    theirs = peft.PeftModel.from_pretrained(load_quantized(path, 4), str(tmp_path))
    quant.keep_4bit_weights_plain(theirs)
    rtol = logits_rtol(loftq.get_base_model())
    assert_rounding_close(_logits(theirs), _logits(loftq), rtol, wrong=plain, what="LoftQ adapter in peft")


def test_pissa_niter_is_seeded_and_keeps_the_model():
    """pissa_niter_<n>: torch's randomized SVD from a fixed seed (peft's draws from the global stream, so its
    factors differ from run to run): the same weights give the same adapter whatever the caller's random state, A
    and B are torch.svd_lowrank's from that seed, and the model at init is the original to rounding."""
    cfg = scalora.LoraConfig(**CFG, init_lora_weights="pissa_niter_2")
    torch.manual_seed(123)
    one = scalora.get_peft_model(tiny_model("llama"), cfg)
    torch.manual_seed(456)
    two = scalora.get_peft_model(tiny_model("llama"), cfg)
    p2 = dict(two.named_parameters())
    for k, p in one.named_parameters():
        assert torch.equal(p, p2[k]), k
    full = tiny_model("llama")
    name, m = next(iter(_layers(one).items()))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        v, s, u = torch.svd_lowrank(full.get_submodule(name).weight.detach(), 4, niter=2)
    s = s / m.scaling["default"]
    assert torch.equal(m.lora_B["default"].weight, v @ torch.diag(torch.sqrt(s)))
    assert torch.equal(m.lora_A["default"].weight, torch.diag(torch.sqrt(s)) @ u.t())
    with one.disable_adapter():
        residual_only = _logits(one)
    assert_rounding_close(_logits(one), _logits(full), logits_rtol(full), wrong=residual_only,
                          what="pissa_niter: model at init")


def test_dora_magnitude_after_pissa_is_peft():
    """DoRA with PiSSA: the magnitude is taken after the initialisation (the norms of W_res + s B A, i.e. of W), as
    peft takes it; LoRA's zero-B magnitude order would give the residual's norms instead."""
    cfg = dict(CFG, init_lora_weights="pissa", use_dora=True)
    ours = scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**cfg))
    ref = dict(theirs.named_parameters())
    for name, m in _layers(ours).items():
        mag = m.lora_magnitude_vector["default"].weight
        want = ref[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        w = m.base_layer.weight.float()
        assert_rounding_close(mag, want, rounding_rtol(m.in_features), what=f"{name} magnitude",
                              wrong=torch.linalg.vector_norm(w, dim=1))


def _perturb(model, seed=3):
    """A "trained" adapter: A and B moved by 5% of their size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("dora", [False, True])
def test_conversion_to_lora_on_save(tmp_path, dora):
    """A PiSSA adapter after "training" (A, B moved), saved with path_initial_model_for_weight_conversion as in peft:
    a plain LoRA adapter (r 4 -> 8, alpha 8 -> 16, init True) that peft applies to the original base with the trained
    model's logits. Saved without conversion, its file keeps init 'pissa', and loading it onto the original base
    derives the residual again, in scalora and in peft alike; read as plain LoRA on the original base (what vLLM
    would do with it) it is far off. With DoRA the converted file keeps the (trained) magnitude: W + s B' A' is the
    trained W_res + s B A, so its norms are too (peft's own conversion drops the magnitude)."""
    cfg = scalora.LoraConfig(**CFG, init_lora_weights="pissa", use_dora=dora)
    model = scalora.get_peft_model(tiny_model("llama"), cfg)
    model.save_pretrained(tmp_path / "init")
    _perturb(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model.save_pretrained(tmp_path / "pissa")
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["init_lora_weights"]) == (8, 16, True)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in keys) == dora
    rtol = logits_rtol(model.get_base_model())
    converted = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "lora"))
    as_plain_lora = scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "pissa"),
                                                      config=_as_plain_lora(tmp_path / "pissa"))
    assert_rounding_close(_logits(converted), trained, rtol, wrong=_logits(as_plain_lora),
                          what="converted adapter in peft on the original base")
    reloaded = scalora.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "pissa"))
    assert_rounding_close(_logits(reloaded), trained, rtol, what="pissa adapter reloaded by scalora")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "pissa"))
    assert_rounding_close(_logits(theirs), trained, rtol, what="pissa adapter reloaded by peft")


def test_bad_combinations_are_refused(saved_tiny_models):
    """LoftQ on a full-precision base (nothing to compensate), unknown initialisations, LoftQ's iterations."""
    with pytest.raises(UserError, match="not quantized"):
        scalora.get_peft_model(tiny_model("llama"), scalora.LoraConfig(**CFG, init_lora_weights="loftq"))
    with pytest.raises(UserError, match="pissa_niter_<n>"):
        scalora.LoraConfig(init_lora_weights="pisa")
    with pytest.raises(UserError, match="loftq_iter"):
        scalora.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 5})
    from scalora.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="quant.bits=16 has none"):
        build_config({"quant": {"bits": 16}, "lora": {"init_lora_weights": "loftq"}})
    with pytest.raises(ConfigError, match="loftq_bits=8 but quant.bits=4"):
        build_config({"lora": {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}})


@pytest.mark.slow
def test_train_with_pissa_converts_the_final_adapter_and_resumes_exactly(env, tmp_path):
    """`scalora train` with PiSSA on the 4-bit tiny base (layer-by-layer loading: the residual quantized from the
    checkpoint's weights): the final adapter is plain LoRA of rank 2r whose second half is the initial adapter, and a
    run killed after step 3 and resumed recomputes the same residual base: the same final adapter, bit for bit.
    The last checkpoint's adapter keeps the residual form: loaded onto the fp32 original base, scalora derives the
    residual again, and the converted final adapter in peft gives the same logits to rounding (the 4-bit base's
    quantization aside: the comparison is on the fp32 base, where the conversion is exact)."""
    from transformers import AutoModelForCausalLM

    extra = ("lora.init_lora_weights=pissa",)
    ref = tmp_path / "ref"
    run(env, *train_args(ref, *extra))
    out = tmp_path / "killed"
    e = {**env, "env": dict(env["env"], SCALORA_FAULT_INJECT="step@3")}
    p = run(e, *train_args(out, *extra), check=False)
    assert p.returncode == -9 and not os.path.exists(out / "final")
    p = run(env, *train_args(out, *extra))
    assert "resuming from" in p.stdout
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conf = json.loads((ref / "final" / "adapter_config.json").read_text())
    assert (conf["r"], conf["init_lora_weights"]) == (32, True)

    base = lambda: AutoModelForCausalLM.from_pretrained(env["base"]).eval()  # noqa: E731
    last = sorted((ref / "checkpoints").iterdir())[-1] / "adapter"
    assert json.loads((last / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = _logits(scalora.PeftModel.from_pretrained(base(), str(last)), ids)
    final = _logits(peft.PeftModel.from_pretrained(base(), str(ref / "final")), ids)
    unconverted = _logits(scalora.PeftModel.from_pretrained(base(), str(last), config=_as_plain_lora(last)), ids)
    assert_rounding_close(final, trained, logits_rtol(base()), wrong=unconverted,
                          what="converted final adapter (peft) vs the last checkpoint's (scalora)")
    assert_wrong_is_far(_logits(base(), ids), trained, logits_rtol(base()), what="the base alone")
    shutil.rmtree(out)

    # exporting: the last checkpoint's adapter merged one layer at a time (the residual derived as each layer is
    # read) equals the whole-model merge bit for bit, and differs from a merge that took it for plain LoRA; the
    # final (converted) adapter is exported on the full-precision base, where it is exact
    import argparse

    from scalora import cli, streamed
    from scalora.model import trained_setup

    setup = trained_setup(str(last))
    assert setup[3].startswith("as trained (4-bit")
    got = dict(streamed.open_merged(str(last), *setup).tensors())
    args = argparse.Namespace(adapter=str(last), base=None, config=None, full_precision=False,
                              trust_remote_code=False)
    whole = cli._merged(args, torch.float32)[0].state_dict()
    assert got.keys() == whole.keys()
    for k, v in got.items():
        assert torch.equal(v.float(), whole[k].float()), k
    plain = scalora.PeftModel.from_pretrained(base(), str(last), config=_as_plain_lora(last)).merge_and_unload()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], plain.state_dict()[q], atol=1e-3)
    assert trained_setup(str(ref / "final"))[3].startswith("full precision: the adapter was trained from pissa")
