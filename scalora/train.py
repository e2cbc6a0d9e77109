"""`scalora train`: one training loop for every topology; accelerate decides single process, DDP, ZeRO or FSDP.

    setup()       the accelerator, the model, the data, the optimizer, the resume point
    train()       the loop: one optimizer step per global batch, then logging, validation, checkpoints
    train_step()  the micro-batches of one global batch on this rank

Batches are drawn by the loop itself: step s of epoch e takes positions [k*G, (k+1)*G) of a permutation seeded by
(seed, e), and rank r of W takes its 1/W slice. The global batch G is the same for any W, and the data position of a
checkpoint is just its step.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import attention, checkpoint, dist, faults, malloc, sharding
from .config import RunConfig
from .core.errors import UserError
from .data import Datasets, build_datasets, count_loss_tokens, device_batch, needs_block_mask
from .evaluate import describe, validate
from .gguf_base import gguf_source
from .hardware import cpu_features, limit_onednn_cache
from .loss import token_loss_sum
from .core.init_weights import changes_base
from .model import base_folder, build_model, prequantized_storage, run_compute_dtype
from .tracking import Progress, Tracker, choose_tracker, plot_losses, summary_text


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(step: int, n: int, G: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (every process computes the same list)."""
    per_epoch = n // G
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[k * G:(k + 1) * G]


def make_optimizer(model: torch.nn.Module, cfg: RunConfig):
    """AdamW (torch's or bitsandbytes' 8-bit) over the model's trainable parameters; with LoRA+
    (`train.loraplus_lr_ratio` > 0) in the groups of `loraplus_groups`. The schedule scales every group alike."""
    t = cfg.train
    if t.optimizer == "adamw":
        cls = torch.optim.AdamW
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    if not t.loraplus_lr_ratio:
        return cls([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    return cls(loraplus_groups(model, t.lr, t.loraplus_lr_ratio, t.weight_decay), lr=t.lr,
               weight_decay=t.weight_decay)


def loraplus_groups(model: torch.nn.Module, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups (arXiv 2402.12354) by peft's rule (`create_loraplus_optimizer`): a trainable
    parameter named lora_B, or any 1-D one, is in B at lr x ratio, the rest in A at lr; in B, biases and the
    weights of nn.LayerNorm modules take no weight decay (peft: transformers' get_parameter_names with
    ALL_LAYERNORM_LAYERS). scalora wraps no embeddings, so peft's embedding group never arises; empty groups are
    left out."""
    layernorm = {f"{m_name}.{p_name}" if m_name else p_name
                 for m_name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                 for p_name, _ in m.named_parameters(recurse=False)}
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # (a ZeRO-3 parameter sharded while loading holds an empty 1-D tensor: the whole shape is full_shape's)
        if "lora_B" in name or len(sharding.full_shape(p)) == 1:
            (b_no_decay if "bias" in name or name in layernorm else b).append(p)
        else:
            a.append(p)
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay},
              {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
              {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_scheduler(optimizer, cfg: RunConfig, total: int):
    """Warmup then cosine / linear / constant. Kept over transformers.get_scheduler, whose warmup starts at lr 0 (a
    first optimizer step that changes nothing); here step k of w warms up at (k + 1) / (w + 1)."""
    warmup = int(cfg.train.warmup_ratio * total)
    kind = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Run:
    """What `setup` builds and the loop works with."""

    cfg: RunConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    data: Datasets
    params: list
    total: int
    start: int
    run_id: str
    tokens_before: int
    tracker: Tracker
    log: Progress
    stopper: dist.StopSignal
    config_yaml: str
    info: dict[str, Any] = field(default_factory=dict)  # what only the summary needs


def kept_compute_dtype(cfg: RunConfig, path: str, resume_from: Optional[str]) -> tuple[torch.dtype, str]:
    """`run_compute_dtype`, except that a run resumed with model.dtype auto keeps the dtype its checkpoint was
    computed in (auto's rule depends on the CPU kind, and a run moved to a machine of another kind would otherwise
    switch dtype halfway)."""
    dtype, why = run_compute_dtype(cfg, path)
    if resume_from is None or cfg.model.dtype != "auto":
        return dtype, why
    kept = checkpoint.read_state(resume_from).get("compute_dtype")
    if kept is None or getattr(torch, kept) == dtype:
        return dtype, why
    return getattr(torch, kept), (f"auto: kept from {os.path.basename(resume_from)}, computed in {kept} (on this "
                                  f"machine auto alone would pick {str(dtype).removeprefix('torch.')}: {why})")


def setup(cfg: RunConfig) -> Run:
    """Everything before the first step: processes, model, data, optimizer, the run folder, the resume point."""
    threads = dist.configure_threads(cfg.dist.threads_per_process)
    out = cfg.train.output_dir
    path = base_folder(cfg)
    resume_from, clear_old = checkpoint.prepare_output_dir(cfg, out)
    dtype, dtype_why = dist.launcher_precision(cfg.model.dtype, *kept_compute_dtype(cfg, path, resume_from))
    tracker_name = choose_tracker(cfg)
    os.makedirs(out, exist_ok=True)
    accelerator = dist.make_accelerator(cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                        dist.mixed_precision(dtype), tracker_name, out)
    dist.check_topology(accelerator, cfg, prequantized_storage(cfg, path), dtype)
    stopper = dist.StopSignal()
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    accum = dist.accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, accelerator.num_processes)
    dist.fill_deepspeed_config(accelerator, cfg, accum, dtype)
    t_start = time.time()
    early_peak, before_load = dist.reset_peak_memory(), dist.resident_memory_bytes()
    model, tokenizer, base_path = build_model(cfg, device_map=dist.device_map(accelerator), dtype=dtype,
                                              shard_layer=dist.layer_sharder(accelerator, cfg, dtype),
                                              device=accelerator.device)
    build_peak = dist.reset_peak_memory()
    load_memory = build_peak - before_load  # what loading the model added to this process, at most
    with accelerator.main_process_first():  # rank 0 fills the tokenization cache, the others read it
        data = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    total = _total_steps(cfg, len(data.train))
    trainable, all_params = model.get_nb_trainable_parameters()  # before sharding splits them
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP and DeepSpeed replace them
    # PiSSA / OLoRA left the residual in the base: the final adapter is converted to plain LoRA on the original
    # base with the adapter as initialised (computed again, the same, by a resumed run)
    initial = sharding.gather_params(accelerator.unwrap_model(model)) \
        if changes_base(cfg.lora.init_lora_weights) else None
    if malloc.tbb_active():
        malloc.release_cached()  # what loading freed (23 MB of SmolLM2-135M's bf16 load)
    # from here on, the peak is training's (what `scalora plan` predicts)
    load_peak = max(build_peak, dist.reset_peak_memory())
    config_yaml = os.path.join(out, "config.yaml")
    if accelerator.is_main_process:
        if clear_old:
            checkpoint.clear_previous_run(out)
        cfg.save(config_yaml)
    accelerator.wait_for_everyone()

    start, run_id, tokens_before = 0, uuid.uuid4().hex[:12], 0
    if resume_from:
        state = checkpoint.load(accelerator, model, optimizer, resume_from)
        start, run_id, tokens_before = state["step"], state.get("run_id", run_id), state.get("tokens", 0)
        for _ in range(start):
            scheduler.step()
    tracker = Tracker(accelerator, cfg, out, tracker_name, run_id)
    tracker.truncate_after(start if resume_from else -1)  # a run killed before its first checkpoint restarts clean
    info = dict(threads=threads, base_path=base_path, trainable=trainable, all_params=all_params,
                load_peak=load_peak, load_memory=load_memory, process_peak=max(early_peak, load_peak), t_start=t_start,
                dtype=str(dtype).removeprefix("torch."), dtype_why=dtype_why, resume_from=resume_from,
                initial_adapter=initial)
    run = Run(cfg, accelerator, model, optimizer, scheduler, tokenizer, data, params, total, start, run_id,
              tokens_before, tracker, Progress(accelerator.is_main_process, total, start), stopper, config_yaml,
              info)
    _log_header(run)
    return run


def _total_steps(cfg: RunConfig, n_train: int) -> int:
    G = cfg.train.global_batch_size
    if n_train < G:
        raise UserError(f"the training set has {n_train} {'rows' if cfg.data.packing else 'examples'}, "
                         f"fewer than train.global_batch_size={G}: lower the batch size or add data")
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * (n_train // G)))


def _log_header(run: Run) -> None:
    cfg, data, info, log = run.cfg, run.data, run.info, run.log
    resume = "resuming from " + info["resume_from"] if info["resume_from"] else "new run"
    gguf = gguf_source(cfg.model.name_or_path, cfg.model.gguf_file)  # named as given, not as the cache folder
    base = gguf[1] if gguf else os.path.basename(info["base_path"])
    log.line(f"scalora: {base} | {cfg.quant.bits}-bit base, LoRA r={cfg.lora.r} | "
             f"{data.stats['train_examples']} train / {data.stats['validation_examples']} validation examples "
             f"({data.format}{', packed' if cfg.data.packing else ''}) | {run.accelerator.num_processes} process(es) "
             f"x {info['threads']} threads, malloc {malloc.active()} | {run.total} steps of "
             f"{cfg.train.global_batch_size} | {resume} | compute {info['dtype']} ({info['dtype_why']})")
    if data.stats["truncated"] or data.stats["dropped"]:
        log.line(f"data: {data.stats['truncated']} examples truncated, {data.stats['dropped']} dropped "
                 f"(data.max_length={cfg.data.max_length}, data.too_long={cfg.data.too_long})")
    log.line(f"trainable params: {info['trainable']:,d} || all params: {info['all_params']:,d} || "
             f"trainable%: {100 * info['trainable'] / info['all_params']:.4f}")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the configured fine-tune; returns the summary (also written to OUTPUT/summary.json)."""
    limit_onednn_cache()
    run = setup(cfg)
    t, data, log = cfg.train, run.data, run.log
    first_eval = _validate(run, 0) if run.start == 0 and data.validation else {}
    last_eval, eval_step, skipped = dict(first_eval), 0, 0
    tokens_seen, t0, window_tokens, window_t = 0, time.time(), 0, time.time()
    paused = _Paused()
    window_paused = 0.0  # paused.total() when the progress window began
    run.model.train()
    for step in range(run.start, run.total):
        rows = [data.train[i] for i in global_batch(step, len(data.train), t.global_batch_size, t.seed)]
        n_tokens = count_loss_tokens(rows)  # the whole global batch's, known on every rank without a collective
        step_loss, grad_norm, skip = train_step(run, step, rows, n_tokens)
        skipped += skip
        done = step + 1
        faults.maybe_kill("step", done)
        if faults.hit("bug", done):
            raise RuntimeError(f"fault injected after step {done} (SCALORA_FAULT_INJECT=bug@{done})")
        if not torch.isfinite(step_loss) and t.on_nonfinite == "stop":
            raise NonFiniteLoss(f"step {done}: the training loss is {step_loss.item()} (non-finite); stopped with "
                                f"nothing written after the last checkpoint. Resume with a lower train.lr, or set "
                                f"train.on_nonfinite=skip to skip such steps")
        batch_tokens = sum(len(r["input_ids"]) for r in rows)
        tokens_seen, window_tokens = tokens_seen + batch_tokens, window_tokens + batch_tokens
        if t.log_every and (done % t.log_every == 0 or done == run.total):
            now = time.time()
            metrics = {"train/loss": (step_loss / max(1, n_tokens)).item(),
                       "train/lr": run.scheduler.get_last_lr()[0],
                       "train/tokens_per_s": window_tokens / max(1e-9, now - window_t - (paused.total() -
                                                                                          window_paused)),
                       "train/tokens": run.tokens_before + tokens_seen,
                       "train/peak_memory_gb": dist.peak_memory_bytes() / 2**30}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            window_tokens, window_t, window_paused = 0, now, paused.total()
            run.tracker.log(metrics, step=done)
            log.step(done, metrics)
        else:
            log.tick(done)
        if data.validation and t.eval_every and done % t.eval_every == 0 and done != run.total:
            with paused("validation"):
                last_eval, eval_step = _validate(run, done), done
        stop = run.stopper.requested(run.accelerator)
        if done != run.total and (stop or t.save_every and done % t.save_every == 0):
            with paused("checkpoints"):
                path = _save(run, done, run.tokens_before + tokens_seen, last_eval if eval_step == done else {})
            if stop:
                return _stopped(run, done, path)
    training = time.time() - t0 - paused.total()
    if data.validation and run.start < run.total:
        with paused("validation"):
            last_eval, eval_step = _validate(run, run.total), run.total
    if run.start < run.total:
        with paused("checkpoints"):
            _save(run, run.total, run.tokens_before + tokens_seen, last_eval if eval_step == run.total else {})
    return _finish(run, tokens_seen, training, paused.seconds, skipped, first_eval, last_eval)


class _Paused:
    """Seconds spent validating and writing checkpoints, by kind: left out of tokens/s (the progress line's window
    and the summary's), which measure training alone; the summary reports them beside it."""

    def __init__(self) -> None:
        self.seconds = {"validation": 0.0, "checkpoints": 0.0}

    @contextlib.contextmanager
    def __call__(self, kind: str):
        started = time.time()
        try:
            yield
        finally:
            self.seconds[kind] += time.time() - started

    def total(self) -> float:
        return sum(self.seconds.values())


def train_step(run: Run, step: int, rows: list[dict], n_tokens: int) -> tuple[torch.Tensor, Optional[float], int]:
    """Forward and backward over this rank's micro-batches of the global batch, then one optimizer step.
    Returns (the global batch's summed token loss, the gradient norm if clipped, 1 if the step was skipped)."""
    cfg, accelerator = run.cfg, run.accelerator
    G, micro, world, rank = cfg.train.global_batch_size, cfg.train.micro_batch_size, accelerator.num_processes, \
        accelerator.process_index
    mine = rows[rank * (G // world):(rank + 1) * (G // world)]
    attn = accelerator.unwrap_model(run.model).config._attn_implementation  # what the model was built with
    block_mask, segment_ids = needs_block_mask(attn), attn == attention.NAME
    # Compiled layers recompile for each new sequence length (~15-30 s each, measured on CPU); packed rows are
    # ~95% full, so padding them to max_length costs little and keeps one shape.
    pad_to = cfg.data.max_length if cfg.model.compile and cfg.data.packing else None
    step_loss = torch.zeros((), device=accelerator.device)
    grad_norm, skipped = None, 0
    # Padded micro-batches are each a new shape, so the allocator's cache of the last one's blocks mostly goes unused
    # and only raises the peak: handed back after each (scalora/malloc.py release_cached). Packed rows are nearly one
    # shape and reuse it: there the release cost 0.86x the tokens/s (30m, bench/throughput.py) and is not made.
    release = malloc.release_cached if malloc.tbb_active() and not cfg.data.packing else (lambda: None)
    for i in range(0, len(mine), micro):
        # Dropout is seeded by the micro-batch's place in the global batch: the same examples get the same masks on
        # any number of processes, and a resumed run needs no saved RNG state.
        torch.manual_seed(_micro_seed(cfg.train.seed, step, (rank * (G // world) + i) // micro))
        with accelerator.accumulate(run.model):
            batch = device_batch(mine[i:i + micro], run.tokenizer.pad_token_id, accelerator.device, block_mask,
                                 pad_to, segment_ids)
            loss_sum = token_loss_sum(run.model, batch, cfg.train.chunked_loss)
            if faults.hit("nan", step + 1):
                loss_sum = loss_sum * float("nan")
            # Gradient of the global batch's mean token loss: DDP averages over W ranks and accelerate divides by the
            # accumulation steps A, so each micro-batch contributes sum * W * A / N.
            accelerator.backward(loss_sum * world * accelerator.gradient_accumulation_steps / max(1, n_tokens))
            step_loss += loss_sum.detach()
            if accelerator.sync_gradients and (cfg.train.max_grad_norm > 0 or cfg.train.on_nonfinite == "skip"):
                grad_norm = accelerator.clip_grad_norm_(run.params, cfg.train.max_grad_norm or float("inf"))
            if grad_norm is not None and cfg.train.on_nonfinite == "skip" and not math.isfinite(grad_norm):
                skipped = 1
                run.log.line(f"step {step + 1}: non-finite gradient norm, optimizer step skipped "
                             f"(train.on_nonfinite=skip)")
            else:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            release()  # the micro-batch's activations (and a step's gradients)
    run.scheduler.step()
    return accelerator.reduce(step_loss, "sum"), grad_norm, skipped


def _micro_seed(seed: int, step: int, micro_index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro_index) % (2**63 - 1)


def _validate(run: Run, step: int) -> dict[str, float]:
    """Validation metrics, logged; the first generated answers go to OUTPUT/samples.jsonl at every validation and
    into the log before training and at the end, so that a user sees what the model says, not only a score."""
    samples: list[dict[str, str]] = []
    metrics = validate(run.model, run.accelerator, run.data, run.tokenizer, run.cfg, samples)
    run.tracker.log(metrics, step=step)
    run.log.line(describe(step, metrics))
    if samples and run.accelerator.is_main_process:
        import json

        with open(os.path.join(run.cfg.train.output_dir, "samples.jsonl"), "a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")
        if step in (0, run.total):
            for sample in samples:
                q = sample["question"] if len(sample["question"]) <= 80 else sample["question"][:77] + "..."
                mark = "=" if sample["generated"] == sample["reference"] else "!="
                run.log.line(f"  sample: {q!r} -> {sample['generated'][:80]!r} ({mark} {sample['reference'][:80]!r})")
    return metrics


def _save(run: Run, step: int, tokens: int, step_eval: dict[str, float]) -> str:
    state = {"run_id": run.run_id, "tokens": tokens, "eval_loss": step_eval.get("eval/loss"),
             "compute_dtype": run.info["dtype"]}
    t = run.cfg.train
    return checkpoint.save(run.accelerator, run.model, run.optimizer, step, state, run.config_yaml, t.output_dir,
                           t.save_total_limit, t.keep_best)


def _stopped(run: Run, step: int, path: str) -> dict[str, Any]:
    run.log.line(f"{run.stopper.name} received: checkpoint {path} written at step {step}; resume with the same "
                 "command (train.resume=auto)")
    run.accelerator.wait_for_everyone()
    run.tracker.finish()
    return {"steps": step, "stopped_by": run.stopper.name, "checkpoint": path}


def _finish(run: Run, tokens_seen: int, elapsed: float, paused: dict[str, float], skipped: int, first_eval: dict,
            last_eval: dict) -> dict[str, Any]:
    """The final adapter, summary.json, the loss plot."""
    accelerator, info, out = run.accelerator, run.info, run.cfg.train.output_dir
    checkpoint.save_final_adapter(accelerator, run.model, os.path.join(out, "final"), info["initial_adapter"])
    if info["initial_adapter"] is not None:
        run.log.line(f"{out}/final: the {run.cfg.lora.init_lora_weights} adapter converted to plain LoRA on the "
                     f"original base (r {run.cfg.lora.r} -> {2 * run.cfg.lora.r}); the checkpoints' adapters keep "
                     "the residual form (loading one derives the residual base again)")
    opt_elements = accelerator.gather(torch.tensor([sharding.local_optimizer_state_elements(run.optimizer)],
                                                   device=accelerator.device)).tolist()
    peak = dist.peak_memory_bytes()
    summary = {"steps": run.total, "resumed_from_step": run.start, "train_tokens": tokens_seen,
               "train_seconds": round(elapsed, 2), "validation_seconds": round(paused["validation"], 2),
               "checkpoint_seconds": round(paused["checkpoints"], 2),
               "total_seconds": round(time.time() - info["t_start"], 2),
               "tokens_per_s": round(tokens_seen / max(1e-9, elapsed), 1), "processes": accelerator.num_processes,
               "topology": dist.topology(accelerator), "optimizer_state_elements_per_rank": opt_elements,
               "trainable_params": info["trainable"], "skipped_steps": skipped,
               "compute_dtype": info["dtype"], "compute_dtype_reason": info["dtype_why"], "cpu": cpu_features(),
               "malloc": malloc.active(),  # "tbbmalloc" or "system" (scalora/malloc.py)
               "peak_memory_gb": round(peak / 2**30, 3),
               "peak_memory_gb_per_rank": _per_rank_gb(accelerator, peak),
               "process_peak_memory_gb": round(max(info["process_peak"], peak) / 2**30, 3),
               "loading_peak_memory_gb_per_rank": _per_rank_gb(accelerator, info["load_peak"]),
               # what loading the model added to the process (its peak while loading less what it held before)
               "loading_model_memory_gb_per_rank": _per_rank_gb(accelerator, info["load_memory"]),
               "first_eval": first_eval, "final_eval": last_eval, "adapter": os.path.join(out, "final")}
    if accelerator.is_main_process:
        import json

        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        png = plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        run.log.line(summary_text(summary, png))
    accelerator.wait_for_everyone()
    run.tracker.finish()  # accelerate's end_training also ends the process group: last
    return summary


def _per_rank_gb(accelerator, n_bytes: int) -> list[float]:
    return [round(float(b) / 2**30, 3) for b in accelerator.gather(
        torch.tensor([float(n_bytes)], device=accelerator.device)).tolist()]
