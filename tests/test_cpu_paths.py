"""Correct on every CPU: bitsandbytes' packed 4-bit CPU format never enters a training run.

bitsandbytes' `Linear4bit` repacks its weight in place for a CPU gemv kernel on the first forward that is in eval
mode with an input that needs no gradient, where its `support_avx512bf16_for_cpu` flag is set (at construction, from
the CPU: AVX512-BF16). Afterwards training forwards take the packed kernel: other outputs, no gradient to the
layer's input. scalora clears that flag on every 4-bit layer it wraps or sees (`quant.keep_4bit_weights_plain`).

Some tests here can only show the bug on such a CPU (they say so when they skip); the others check, on any CPU,
that bitsandbytes' switch still works the way scalora relies on.
"""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

import scalora
from scalora import hardware
from scalora.core import quant

from conftest import load_quantized, tokens
from helpers import adapter, losses, run
from tolerance import assert_rounding_close, bf16_loss_rtol

AVX512_BF16 = bool(has_avx512bf16())
needs_avx512bf16 = pytest.mark.skipif(
    not AVX512_BF16, reason="bitsandbytes packs 4-bit weights for its CPU kernel only on AVX512-BF16 CPUs; this "
                            "CPU lacks avx512_bf16, so the bug cannot occur here (other tests check the switch)")


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A tiny Llama whose MLP in-features (352) do not fit the packed kernel's blocks, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("odd") / "llama-352"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _four_bit_layers(model):
    return [m for m in model.modules() if quant.is_4bit(m)]


def _train_forward(model, ids):
    """Logits of a training forward and, per 4-bit layer, whether a gradient reached its input."""
    reached = {}
    handles = []
    for i, layer in enumerate(_four_bit_layers(model)):
        def hook(module, grad_input, grad_output, i=i):
            reached[i] = grad_input[0] is not None and bool(grad_input[0].abs().sum() > 0)
        handles.append(layer.register_full_backward_hook(hook))
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), reached


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"]], ids=["all-linear", "q_proj-only"])
def test_eval_forward_changes_nothing_for_training(odd_llama, targets):
    """(b) After an eval forward, training forwards give the same outputs and gradients reach every 4-bit layer's
    input, targeted or not (a frozen 4-bit layer with a packed weight would cut off the LoRA layers below it)."""
    model = scalora.get_peft_model(load_quantized(odd_llama, 4),
                                   scalora.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    model.base_model.model.enable_input_require_grads()  # so the first layer's input wants a gradient too
    ids = tokens(batch=2, length=12)
    before, reached = _train_forward(model, ids)
    assert reached and all(reached.values()), reached
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # validation: eval mode, input without grad - where bitsandbytes would repack
        model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _four_bit_layers(model))
    after, reached = _train_forward(model, ids)
    assert all(reached.values()) and len(reached) == len(_four_bit_layers(model)), reached
    assert torch.equal(before, after)


@needs_avx512bf16
def test_the_bug_is_real_here_without_scalora(odd_llama):
    """On this CPU a bare bitsandbytes model does repack in eval (shown on the 128-wide attention layers that fit the
    kernel's blocks), and its next training forward sends no gradient to the layer's input: what scalora prevents."""
    model = load_quantized(odd_llama, 4)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    layer.train()
    x.requires_grad_(True)
    y = layer(x)
    assert not y.requires_grad or x.grad is None


COMMON = ["train", "configs/tiny.yaml", "train.max_steps=6", "train.save_every=0", "data.max_eval_generate=4",
          "train.log_every=1", "log.report_to=none", "train.schedule=constant", "train.warmup_ratio=0"]


@pytest.fixture(scope="module")
def validated_once(env):
    out = env["root"] / "eval-once"
    run(env, *COMMON, "train.eval_every=0", f"train.output_dir={out}")
    return out


@pytest.mark.slow
def test_validating_during_a_run_changes_nothing_it_learns(env, validated_once):
    """(a) The same run validating (loss and exact-match generation) every 2 steps and only at the end: bitwise the
    same adapter on one process. Uses the builtin model, whose intermediate size is 352."""
    often = env["root"] / "eval-often"
    run(env, *COMMON, "train.eval_every=2", f"train.output_dir={often}")
    a, b = adapter(often), adapter(validated_once)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_bf16_compute_trains_like_fp32(env, validated_once):
    """model.dtype=bfloat16 on the CPU (autocast, bf16 base, fp32 adapter): the loss curve stays within bf16's
    rounding of fp32's (tests/tolerance.py's bf16_loss_rtol: one bf16 rounding per step) and summary.json says which
    dtype ran and why."""
    out = env["root"] / "bf16"
    run(env, *COMMON, "train.eval_every=0", "model.dtype=bfloat16", f"train.output_dir={out}")
    ref, got = losses(validated_once), losses(out)
    assert list(got) == list(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert_rounding_close(torch.tensor([got[step]]), torch.tensor([ref[step]]), bf16_loss_rtol(step),
                              what=f"step {step}")
    assert got != ref  # it did run in another dtype
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compute_dtype"] == "bfloat16" and summary["compute_dtype_reason"] == "model.dtype=bfloat16"
    fp32 = json.loads((validated_once / "summary.json").read_text())
    assert fp32["compute_dtype"] == "float32" and fp32["compute_dtype_reason"].startswith("auto: CPU")
    assert fp32["cpu"]["flags"] == hardware.cpu_features()["flags"]


# --- the compute dtype rule ----------------------------------------------------------------------------------------
AMX, AVX512 = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], ["avx2", "avx512f", "avx512_bf16"]


@pytest.mark.parametrize("vendor,flags,hidden,expected,measured", [
    ("GenuineIntel", AMX, 4096, torch.bfloat16, "Intel Xeon with AMX"),
    ("GenuineIntel", AMX, 512, torch.bfloat16, "Intel Xeon with AMX"),
    ("GenuineIntel", AMX, 256, torch.float32, "Intel Xeon with AMX"),  # measured slower in bf16
    ("GenuineIntel", AMX, None, torch.float32, "Intel Xeon with AMX"),
    ("AuthenticAMD", AVX512, 576, torch.bfloat16, "AMD EPYC with AVX512-BF16, no AMX"),
    ("AuthenticAMD", AVX512, 512, torch.bfloat16, "1.52x at 512 (a Zen 5"),
    ("AuthenticAMD", AVX512, 256, torch.float32, "hidden 512 not measured on a Zen 4"),
    ("GenuineIntel", AVX512, 4096, torch.float32, "Intel Xeon with AMX turned off in oneDNN"),
    ("", AVX512, 4096, torch.float32, None),  # vendor unknown: the two vendors' speeds differ, never measured
    ("AuthenticAMD", ["avx2"], 4096, torch.float32, "AMD EPYC with AVX2 only"),  # bf16 ~25x slower
    ("GenuineIntel", ["avx2", "avx512f"], 4096, torch.float32, None),  # AVX-512 without bf16: never measured
    ("", [], 4096, torch.float32, None),
])
def test_auto_dtype_on_cpus(monkeypatch, vendor, flags, hidden, expected, measured):
    """The rule per CPU kind and hidden size; the reason names the kind and what was measured on which CPU, or that
    nothing was: never 'measured faster' for a kind nobody measured."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_features", lambda: {"model": "test CPU", "vendor": vendor, "flags": flags})
    dtype, why = hardware.compute_dtype("auto", hidden)
    assert dtype == expected, why
    assert why.startswith("auto: CPU of kind") and (", ".join(flags) or "no AVX2") in why
    if measured:
        assert measured in why and "not measured on this CPU kind" not in why
    else:
        assert "not measured on this CPU kind" in why and "measured faster" not in why
    assert hardware.compute_dtype("float32", hidden) == (torch.float32, "model.dtype=float32")


def test_a_resumed_run_keeps_its_checkpoints_dtype(tmp_path, monkeypatch):
    """model.dtype auto resumed from a checkpoint computed in another dtype (a run moved to a machine of another CPU
    kind) keeps the checkpoint's dtype and says so; a named dtype, or no checkpoint, is auto's rule as it is."""
    from scalora.config import load_config
    from scalora.model import resolve_model_path
    from scalora.train import kept_compute_dtype

    ckpt = tmp_path / "step-000003"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "compute_dtype": "bfloat16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_features", lambda: {"model": "test CPU", "vendor": "", "flags": ["avx2"]})
    cfg = load_config(None, [])
    path = resolve_model_path(cfg.model.name_or_path)  # the builtin tiny Llama
    assert kept_compute_dtype(cfg, path, None) == hardware.compute_dtype("auto", 128)
    dtype, why = kept_compute_dtype(cfg, path, str(ckpt))
    assert dtype == torch.bfloat16 and "kept from step-000003" in why and "float32" in why
    named = load_config(None, ["model.dtype=float32"])
    assert kept_compute_dtype(named, path, str(ckpt)) == (torch.float32, "model.dtype=float32")


def test_cpu_features_read_this_cpu():
    """The flags come from /proc/cpuinfo and agree with torch's own detection (cpuinfo)."""
    feats = hardware.cpu_features()
    assert set(feats["flags"]) <= set(hardware.FEATURES) and feats["model"]
    assert set(feats["flags"]) == hardware._torch_flags()
    assert ("avx512_bf16" in feats["flags"]) == AVX512_BF16  # bitsandbytes sees the same CPU


# --- the switch scalora relies on, checked on any CPU ---------------------------------------------------------------
class _NoKernel:
    """Stands in for bitsandbytes.matmul_4bit, so that a packed weight is never fed to a kernel this CPU may lack."""

    def __call__(self, x, weight, bias=None, quant_state=None):
        return torch.zeros(*x.shape[:-1], quant_state.shape[0], dtype=x.dtype)


def _layer_with_flag(flag: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 128), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = flag  # what bitsandbytes sets from the CPU at construction
    return layer


def test_bitsandbytes_flag_still_gates_packing(monkeypatch):
    """(c) The mechanism scalora turns off: with the flag set, an eval forward without grad repacks the weight; with
    it cleared, it does not. If bitsandbytes renames or changes this, this test fails and quant.py needs a look."""
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb, "matmul_4bit", _NoKernel())
    assert hasattr(bnb.nn.Linear4bit(8, 8), "support_avx512bf16_for_cpu")
    for flag in (True, False):
        layer = _layer_with_flag(flag).eval()
        with torch.no_grad():
            layer(torch.randn(2, 128))
        assert bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)) is flag


def test_scalora_clears_the_flag_and_unpacks(monkeypatch):
    """(c) Wrapping clears the flag on every 4-bit layer and undoes a packing that already happened (with a warning:
    bitsandbytes' packing rounds the block scales, which cannot be undone), and eval forwards no longer repack."""
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb, "matmul_4bit", _NoKernel())
    layers = [_layer_with_flag(True), _layer_with_flag(True)]
    net = torch.nn.Sequential(*layers)
    plain_bytes = [m.weight.data.clone() for m in layers]
    dense = [quant.dense_weight(m) for m in layers]
    net.eval()
    with torch.no_grad():
        net(torch.randn(2, 128))  # both layers are now packed
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    with pytest.warns(UserWarning, match="2 4-bit layer.*rounded their block scales to bfloat16"):
        model = scalora.get_peft_model(net, scalora.LoraConfig(r=2, target_modules=["0"]))  # "1" stays bare
    assert isinstance(net[0], scalora.LoraLayer) and net[1] is layers[1]
    for m, b, d in zip(layers, plain_bytes, dense):
        assert m.support_avx512bf16_for_cpu is False
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, b)  # the 4-bit codes come back exactly
        # bitsandbytes' packing rounded the block scales to bf16 and re-quantized the nested ones: not undone, only
        # bounded (measured 0.55% relative at most)
        torch.testing.assert_close(quant.dense_weight(m), d, rtol=1e-2, atol=0)
        assert not torch.equal(quant.dense_weight(m), d)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 128))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


# Runs in a fresh process (the caches read their capacity once): bf16 matmuls of 240 shapes, then what the heap and
# glibc's mmaps hold after the second 120 beyond what they held after the first 120.
_CACHE_PROBE = """
import ctypes, sys, torch
if sys.argv[1] == "capped":
    from scalora.hardware import limit_onednn_cache
    limit_onednn_cache()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                               "keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def held():
    m = libc.mallinfo2()
    return (m.hblkhd + m.uordblks) / 2**20
torch.set_num_threads(1)
w, marks = torch.randn(256, 128, requires_grad=True), []
for i in range(240):
    x = torch.randn(64 + i, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(x, w)
    y.float().sum().backward()
    if i in (119, 239):
        marks.append(held())
print(marks[1] - marks[0])
"""


def _cache_growth_mib(mode: str, env: dict) -> float:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


@pytest.mark.slow  # four fresh processes, ~12 s
def test_onednn_caches_stay_bounded_across_matmul_shapes():
    """A bf16 run with padded batches brings new matmul shapes every micro-batch. Uncapped, oneDNN's primitive cache
    and ideep's computation cache keep what each shape built (a 30m run's live peak grew to 1.22x a peft loop's,
    BENCHMARKS.md section 6); `limit_onednn_cache` caps both, so that after the caps fill, new shapes add nothing.
    Measured here with glibc returning freed blocks at once (the live memory), against the same loop uncapped."""
    import os

    from scalora.hardware import ONEDNN_CACHE_VARS

    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARS}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks above 64 KiB go back to the system: what is held is live
    uncapped = _cache_growth_mib("uncapped", env)
    if uncapped < 40:
        pytest.skip(f"bf16 matmuls here keep no per-shape state ({uncapped:.1f} MiB over 120 new shapes uncapped; "
                    "measured 213 MiB on an AVX512-BF16 CPU, where they go through oneDNN)")
    capped = _cache_growth_mib("capped", env)
    assert capped < 8, f"{capped:.1f} MiB more after 120 new shapes with the caps ({uncapped:.1f} MiB without)"
    for name in ONEDNN_CACHE_VARS:  # either cap alone leaves the other cache growing
        one = dict(env, **{name: "64"})
        assert _cache_growth_mib("uncapped", one) > 4 * capped + 20, f"{name} alone bounded the growth"


def test_onednn_cache_is_capped_unless_the_environment_sets_it(monkeypatch):
    """`scalora train` and `load_as_trained` cap the caches before their first matmul, and keep a value the user
    set."""
    import inspect
    import os

    from scalora import model, train
    from scalora.hardware import ONEDNN_CACHE, ONEDNN_CACHE_VARS, limit_onednn_cache

    for name in ONEDNN_CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    limit_onednn_cache()
    assert [os.environ[name] for name in ONEDNN_CACHE_VARS] == [ONEDNN_CACHE] * 2 and ONEDNN_CACHE == "64"
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "500")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    limit_onednn_cache()
    assert os.environ["LRU_CACHE_CAPACITY"] == "500" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    body = inspect.getsource(train.train)
    assert body.index("limit_onednn_cache()") < body.index("setup(cfg)")  # before the model's first matmul
    body = inspect.getsource(model.load_as_trained)
    assert body.index("limit_onednn_cache()") < body.index("from_pretrained")
