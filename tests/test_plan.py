"""`scalora plan`: exact counts from configs, bitsandbytes' real storage, autograd's real saved tensors, measured peaks.

Measured peaks on CPU are resident memory. glibc keeps freed activations cached in the heap, so that the resident set
overstates what is live (0.81 vs 0.60 GiB measured for the same step); the runs here take glibc's malloc
(SCALORA_MALLOC=system, not the command's default allocator) with MALLOC_MMAP_THRESHOLD_ so that large blocks go
back to the system when freed and the resident peak is the live peak, which is what the planner predicts (on GPUs,
torch.cuda.max_memory_allocated measures the same thing).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from scalora import plan as P
from scalora.config import load_config
from scalora.model import shipped_configs

from helpers import launch, live_memory_env, run

PUBLISHED = {  # parameter counts on the model cards / safetensors indexes
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-405B": 405_853_388_800,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "huggyllama/llama-65b": 65_285_660_672,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
}


def test_shipped_configs_give_the_published_parameter_counts():
    assert set(shipped_configs()) == set(PUBLISHED)
    for name, n in PUBLISHED.items():
        assert P.model_shape(name).total_params == n, name


def _cfg(base, *over):
    return load_config(None, [f"model.name_or_path={base}", *over])


def test_counts_match_the_loaded_4bit_model(untrained_base):
    """Quantized bytes (packed + constants, with and without double quantization) and LoRA parameters equal what
    bitsandbytes and get_peft_model really allocate."""
    import bitsandbytes as bnb

    from scalora.model import build_model

    for dq in (True, False):
        cfg = _cfg(untrained_base, f"quant.double_quant={str(dq).lower()}", "lora.r=8")
        model, _, _ = build_model(cfg)
        shape = P.model_shape(untrained_base, cfg.lora.target_modules, None, cfg.lora.r)
        real_packed = real_constants = 0
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = m.weight
                real_packed += w.numel() * w.element_size()
                qs = w.quant_state
                real_constants += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * 4
                if qs.nested:
                    real_constants += (qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4)
        st = P.Settings(bits=4, double_quant=dq, compute_bytes=4)
        shardable, constants = P.base_weight_bytes(shape, st)
        assert shardable - shape.dense_params * 4 - shape.norm_params * 4 == real_packed
        assert abs(constants - real_constants) <= 0.02 * real_constants + 4096, (dq, constants, real_constants)
        assert shape.lora_params == model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("dora", [False, True])
def test_saved_activations_match_autograd(untrained_base, dora):
    """The per-layer activation model against the tensors autograd really saves (packed rows, no checkpointing);
    with DoRA, its extra saved outputs counted too (the LoRA model alone would fall short by their size)."""
    from scalora.data import build_datasets, collate
    from scalora.model import build_model
    from scalora.loss import token_loss_sum

    cfg = _cfg(untrained_base, "data.packing=true", "data.max_length=256", "model.gradient_checkpointing=false",
               f"lora.use_dora={str(dora).lower()}")
    model, tok, _ = build_model(cfg)
    rows = build_datasets(cfg.data, tok, 0).train[:4]
    batch = collate(rows, tok.pad_token_id, block_mask=True)
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, batch)
    saved = sum(storages.values())
    shape = P.model_shape(untrained_base, cfg.lora.target_modules, None, cfg.lora.r, use_dora=dora)
    T = batch["input_ids"].shape[1]
    st = P.Settings(device="cpu", compute_bytes=4, lora_dropout=cfg.lora.lora_dropout, micro_batch=4, seq_len=T,
                    gradient_checkpointing=False, packed_mask=True, use_dora=dora)
    # of the logits, only the log-softmax is saved; the other terms are peaks of the loss and its gradient
    predicted = P.activation_bytes(shape, st) - 4 * T * (P.logits_bytes_per_token(shape, st) - 4 * shape.vocab)
    assert abs(predicted - saved) / saved < 0.15, (predicted, saved)
    if dora:  # without DoRA's terms the prediction would be outside
        lora_only = P.activation_bytes(shape, P.Settings(**{**st.__dict__, "use_dora": False})) \
            - 4 * T * (P.logits_bytes_per_token(shape, st) - 4 * shape.vocab)
        assert abs(lora_only - saved) / saved >= 0.15, (lora_only, saved)


@pytest.mark.parametrize("dora", [pytest.param(False, marks=pytest.mark.slow), True])
def test_kept_outputs_counted(untrained_base, monkeypatch, dora):
    """model.keep_base_outputs: what the planner adds under checkpointing equals, to the byte, what the LoRA layers
    hold at the end of the forward (every kept output's storage): one base output per layer, DoRA with dropout
    too (its product on the dropped input is W x less a sparse product, not a second kept one)."""
    from scalora.core import lora
    from scalora.data import build_datasets, collate
    from scalora.loss import token_loss_sum
    from scalora.model import build_model

    stores = []
    make = lora.keep_base_outputs_contexts

    def recording():
        pair = make()
        stores.append(pair[0].kept)
        return pair

    monkeypatch.setattr(lora, "keep_base_outputs_contexts", recording)
    cfg = _cfg(untrained_base, "data.max_length=64", "model.keep_base_outputs=true",
               f"lora.use_dora={str(dora).lower()}")
    model, tok, _ = build_model(cfg)
    model.train()
    batch = collate(build_datasets(cfg.data, tok, 0).train[:2], tok.pad_token_id)
    token_loss_sum(model, batch)
    kept = sum(t.untyped_storage().nbytes() for store in stores for queue in store.values() for t in queue)
    shape = P.model_shape(untrained_base, cfg.lora.target_modules, None, cfg.lora.r, use_dora=dora)
    st = P.Settings(device="cpu", compute_bytes=4, lora_dropout=cfg.lora.lora_dropout, use_dora=dora,
                    keep_base_outputs=True)
    assert len(stores) == shape.n_layers and kept > 0
    assert kept == batch["input_ids"].numel() * P.kept_bytes_per_token(shape, st)
    assert kept == batch["input_ids"].numel() * shape.lora_out_features * 4  # 2x: a second product kept



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recomputed_weights_counted(untrained_base, monkeypatch, dtype):
    """DoRA with dropout under checkpointing: the de-quantized transposes that a decoder layer's recomputation hands
    to its backward (`_DroppedProduct`), recorded per recomputation, add up to what the planner counts, to the
    byte (every product inside a checkpointed call); without checkpointing the planner counts none. In bf16 (under
    autocast, as the run computes) every transpose is bf16, also for q/k/v and gate/up, whose input the fp32 norms
    give in fp32 (they were fp32 there before: more than the planner counted)."""
    from scalora.core import lora
    from scalora.data import build_datasets, collate
    from scalora.loss import token_loss_sum
    from scalora.model import build_model

    made: dict[tuple[int, bool], int] = {}
    transposed = lora._transposed

    def recording(w, dtype):
        out = transposed(w, dtype)
        phase = lora._current_phase()
        key = (None if phase is None else id(phase), phase is not None and phase.recompute)
        made[key] = made.get(key, 0) + out.untyped_storage().nbytes()
        return out

    monkeypatch.setattr(lora, "_transposed", recording)
    cfg = _cfg(untrained_base, "data.max_length=64", "lora.use_dora=true", "lora.lora_dropout=0.1",
               f"model.dtype={dtype}")
    model, tok, _ = build_model(cfg)
    model.train()
    batch = collate(build_datasets(cfg.data, tok, 0).train[:2], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = token_loss_sum(model, batch)
    loss.backward()
    shape = P.model_shape(untrained_base, cfg.lora.target_modules, None, cfg.lora.r, use_dora=True)
    st = P.Settings(device="cpu", compute_bytes=4 if dtype == "float32" else 2, lora_dropout=0.1, use_dora=True)
    recomputed = [n for (_, again), n in made.items() if again]
    assert len(recomputed) == shape.n_layers and all(phase is not None for phase, _ in made)
    assert max(recomputed) == P.recomputed_weight_bytes(shape, st) > 0
    assert P.recomputed_weight_bytes(shape, P.Settings(**{**st.__dict__, "gradient_checkpointing": False})) == 0

RUN = ["train.max_steps=1", "log.report_to=none", "data.packing=true", "train.global_batch_size=8",
       "data.max_eval_generate=0", "train.eval_every=0", "data.validation_fraction=0.02", "train.save_every=0"]
CASES = [  # (strategy, launch file, gradient checkpointing, micro-batch, max_length)
    ("single", None, True, 8, 512),
    ("single", None, False, 8, 512),
    ("ddp", "launch/ddp.yaml", True, 4, 256),
    ("zero2", "launch/zero2.yaml", True, 4, 256),
    ("zero3", "launch/zero3.yaml", False, 4, 256),
    ("fsdp", "launch/fsdp.yaml", True, 4, 256),
    # ("single+dora", None, True, 8, 512): lora.use_dora=true, measured 0.631 GiB against 0.666 predicted
    # [amx_bf16 avx512_bf16]; left out for the suite's time (DoRA's terms are 4% of that peak: a prediction without
    # them passes too; test_saved_activations_match_autograd[True] is what checks them)
]


@pytest.fixture(scope="module")
def runtime(env):
    """The imported runtime as the measured runs have it: started afresh, glibc's malloc (live_memory_env)."""
    from concurrent.futures import ThreadPoolExecutor

    e = live_memory_env(env)["env"]
    with ThreadPoolExecutor(2) as pool:  # two processes' own resident memory: measured side by side, in half the time
        both = {ds: pool.submit(P.cpu_runtime_bytes, ds, e) for ds in (False, True)}
    return {ds: f.result() for ds, f in both.items()}


@pytest.fixture(scope="module")
def peak_and_prediction(env, runtime):
    """(measured training peak per rank, predicted) of one case, run once however many tests ask (any order)."""
    done: dict[tuple, tuple[float, float]] = {}

    def measure(strategy, launch_file, gc, micro, length):
        if (strategy, gc) in done:
            return done[(strategy, gc)]
        out = env["root"] / f"plan-{strategy}-{int(gc)}"
        strategy, _, variant = strategy.partition("+")
        over = [*RUN, f"train.output_dir={out}", f"train.micro_batch_size={micro}", f"data.max_length={length}",
                f"model.gradient_checkpointing={str(gc).lower()}", f"lora.use_dora={str(variant == 'dora').lower()}"]
        e = live_memory_env(env)
        if launch_file:
            launch(e, launch_file, *over)
        else:
            run(e, "train", *over)
        summary = json.load(open(os.path.join(out, "summary.json")))
        peak = max(summary["peak_memory_gb_per_rank"]) * 2**30
        cfg = _cfg(env["base"], *over)
        shape = P.model_shape(env["base"], cfg.lora.target_modules, None, cfg.lora.r, use_dora=cfg.lora.use_dora)
        st = P.settings_from_config(cfg, "cpu", runtime["zero" in strategy], shape.hidden)
        predicted = P.estimate(shape, st, strategy, 1 if strategy == "single" else 2).total
        print(f"\nplan {strategy}{'+' + variant if variant else ''} gc={gc} micro {micro} x {length}: "
              f"measured {peak / 2**30:.3f} GiB per rank "
              f"(max of {summary['peak_memory_gb_per_rank']}), predicted {predicted / 2**30:.3f}, "
              f"ratio {predicted / peak:.3f}")
        done[(strategy + ("+" + variant if variant else ""), gc)] = peak, predicted
        return peak, predicted

    return measure


@pytest.mark.slow
@pytest.mark.parametrize("strategy,launch_file,gc,micro,length", CASES, ids=[f"{c[0]}-gc{int(c[2])}" for c in CASES])
def test_prediction_within_15_percent_of_measured_peak(peak_and_prediction, strategy, launch_file, gc, micro, length):
    peak, predicted = peak_and_prediction(strategy, launch_file, gc, micro, length)
    assert abs(predicted - peak) / peak < 0.15, (strategy, predicted / 2**30, peak / 2**30)


@pytest.mark.slow
def test_checkpointing_saving_is_predicted(peak_and_prediction):
    """The activation term alone: what gradient checkpointing saves, predicted vs measured (same model, batch)."""
    (on, p_on), (off, p_off) = peak_and_prediction(*CASES[0]), peak_and_prediction(*CASES[1])
    print(f"\ncheckpointing saves: measured {(off - on) / 2**20:.0f} MiB, predicted {(p_off - p_on) / 2**20:.0f} MiB")
    assert off - on > 50 * 2**20  # the runs are long enough for activations to show
    assert abs((p_off - p_on) - (off - on)) / (off - on) < 0.25, ((p_off - p_on) / 2**20, (off - on) / 2**20)


def test_published_points():
    """QLoRA's 65B on one 48 GB GPU (with its paged optimizer) and fsdp_qlora's 70B on two 24 GB GPUs (with CPU
    offload, and not without) come out as published; bench/published.py prints the numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("published", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                            "published.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main()
    for label, total, memory, verdict, fits, loading in results:
        assert (verdict != "no") == fits, label
    # loading counts too: layer by layer, sharded (dist.low_memory_loading, the default) the 70B loads on 24 GB;
    # the whole 4-bit base on each process first (the path without it) would not
    fsdp_offload = next(r for r in results if r[0].startswith("fsdp_qlora: Llama-2-70B"))
    assert fsdp_offload[5] < 24 * P.GiB and fsdp_offload[1] < 24 * P.GiB
    label, model, targets, st, strategy, n, mem, _ = mod.POINTS[3]
    whole = P.estimate(P.model_shape(model, targets, None, 64), dataclasses.replace(st, low_memory_loading=False),
                       strategy, n)
    assert whole.loading > 24 * P.GiB and whole.fits(mem) == "no"
    # and a 70B does not fit one 24 GB GPU however it is sharded
    shape = P.model_shape("meta-llama/Llama-3.1-70B", "all-linear", None, 16)
    assert P.estimate(shape, P.Settings(micro_batch=1, seq_len=512), "single").fits(24 * P.GiB, True) == "no"


@pytest.mark.slow
def test_plan_cli(env, tmp_path):
    p = run(env, "plan", "configs/llama3-8b.yaml", "--gpus", "2", "--gpu-memory", "24GiB",
            "--json", str(tmp_path / "plan.json"))
    assert "meta-llama/Meta-Llama-3-8B" in p.stdout and "fsdp_offload" in p.stdout
    rows = json.load(open(tmp_path / "plan.json"))
    assert {r["strategy"] for r in rows} == {"ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp",
                                             "fsdp_offload"}
    by = {r["strategy"]: r["total"] for r in rows}
    assert by["zero3"] < by["zero2"] < by["ddp"]  # sharding more saves more
    bad = run(env, "plan", "configs/llama3-8b.yaml", "--gpu-memory", "lots", check=False)
    assert bad.returncode == 2 and "24GiB" in bad.stderr
