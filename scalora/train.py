"""`scalora train`: one training loop for every topology; accelerate decides single process, DDP, ZeRO or FSDP.

Batches are drawn by the loop itself: step s of epoch e takes positions [k*G, (k+1)*G) of a permutation seeded by
(seed, e), and rank r of W takes its 1/W slice. The global batch G is the same for any W, and the data position of a
checkpoint is just its step.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import uuid
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import checkpoint, dist, faults, sharding
from .config import RunConfig
from .data import IGNORE, Datasets, build_datasets, collate, count_loss_tokens, instruction_prompt
from .hardware import cpu_features
from .model import build_model, resolve_model_path, run_compute_dtype
from .tracking import Tracker, choose_tracker, plot_losses


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(step: int, n: int, G: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (every process computes the same list)."""
    per_epoch = n // G
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[k * G:(k + 1) * G]


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig):
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, cfg: RunConfig, total: int):
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


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled tokens (fp32 logits).

    The labels are shifted, not the logits: in fp32 (CPUs) a sliced view of the logits was copied whole by the
    reshape, one more (B, T-1, V) fp32 tensor, the largest of the step for big vocabularies.
    """
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T): token t predicts t+1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # a no-op in fp32; the one upcast copy in bf16 / fp16
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def _device_batch(rows: list[dict], pad_id: int, device, block_mask: bool) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in collate(rows, pad_id, block_mask=block_mask).items()}


@torch.no_grad()
def evaluate(model, accelerator, rows: list[dict], micro: int, pad_id: int) -> dict[str, float]:
    """Per-token validation loss and perplexity, the rows split across processes."""
    model.eval()
    loss = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    mine = rows[accelerator.process_index::accelerator.num_processes]
    for i in range(0, len(mine), micro):
        chunk = mine[i:i + micro]
        loss += token_loss_sum(model, _device_batch(chunk, pad_id, accelerator.device, True))
        count += count_loss_tokens(chunk)
    loss, count = accelerator.reduce(loss, "sum"), accelerator.reduce(count, "sum")
    model.train()
    mean = (loss / count.clamp(min=1)).item()
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50))}


def answer_prompt(record: dict, fmt: str, tokenizer, cfg: RunConfig) -> Optional[tuple[list[int], str]]:
    """(prompt ids, reference answer) for exact-match scoring, or None for plain-text data."""
    d = cfg.data
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


@torch.no_grad()
def exact_match(model, accelerator, data: Datasets, tokenizer, cfg: RunConfig) -> Optional[float]:
    """Share of validation answers generated greedily that equal the reference, after stripping spaces."""
    n = cfg.data.max_eval_generate
    pairs = [p for r in data.validation_records[:n] if (p := answer_prompt(r, data.format, tokenizer, cfg))]
    if not pairs:
        return None
    net = accelerator.unwrap_model(model)
    net.eval()
    use_cache = net.get_base_model().config.use_cache
    net.get_base_model().config.use_cache = True
    hits = torch.zeros((), device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for ids, ref in pairs[accelerator.process_index::accelerator.num_processes]:
        max_new = len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + 2
        with accelerator.autocast():  # as in training: the k-bit preparation keeps norms in fp32
            out = net.generate(input_ids=torch.tensor([ids], device=accelerator.device), max_new_tokens=max_new,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        hits += tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == ref
        total += 1
    net.get_base_model().config.use_cache = use_cache
    net.train()
    hits, total = accelerator.reduce(hits, "sum"), accelerator.reduce(total, "sum")
    return (hits / total.clamp(min=1)).item()


# Keys that may change between a run and its continuation: how long to train and how to start.
_CONTINUATION_KEYS = ("resume", "overwrite", "max_steps", "epochs", "output_dir")  # a run folder may be moved


def _same_run(previous: dict, mine: dict) -> bool:
    """Whether a saved config describes the same run (the log and dist sections may differ)."""
    if any(previous.get(s) != mine[s] for s in ("model", "quant", "lora", "data")):
        return False
    strip = lambda d: {k: v for k, v in (d or {}).items() if k not in _CONTINUATION_KEYS}  # noqa: E731
    return strip(previous.get("train")) == strip(mine["train"])


_RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "summary.json", "loss.png", "config.yaml")


def prepare_output_dir(cfg: RunConfig, out: str) -> tuple[Optional[str], bool]:
    """Refuse a folder that holds another run. Returns (checkpoint to resume from, whether to clear the old run).

    Clearing (train.overwrite=true) is left to the caller, after the model and data have loaded, so that a bad
    input never costs the previous run.
    """
    saved = os.path.join(out, "config.yaml")
    if os.path.exists(saved):
        import yaml

        with open(saved) as f:
            previous = yaml.safe_load(f) or {}
        same = _same_run(previous, cfg.to_dict())
        if cfg.train.overwrite:
            return None, True
        if not same:
            raise ValueError(f"{out} holds a run with a different config ({saved}); choose another train.output_dir, "
                             "or pass train.overwrite=true to replace it")
        if cfg.train.resume == "auto":
            return checkpoint.latest(out), False
        raise ValueError(f"{out} already holds this run; pass train.resume=auto to continue it or "
                         "train.overwrite=true to start again")
    return None, False


def _clear_previous_run(out: str) -> None:
    for name in _RUN_FILES:
        p = os.path.join(out, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the configured fine-tune; returns the summary (also written to OUTPUT/summary.json)."""
    threads = dist.configure_threads(cfg.dist.threads_per_process)
    out = cfg.train.output_dir
    dtype, dtype_why = run_compute_dtype(cfg, resolve_model_path(cfg.model.name_or_path))
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    tracker_name = choose_tracker(cfg)
    os.makedirs(out, exist_ok=True)
    accelerator = dist.make_accelerator(cfg.train.global_batch_size, cfg.train.micro_batch_size, mixed,
                                        tracker_name, out)
    main = accelerator.is_main_process
    dist.check_topology(accelerator, cfg)
    stopper = _StopSignal()
    resume_from, clear_old = prepare_output_dir(cfg, out)
    if resume_from:
        _check_checkpoint_config(cfg, resume_from)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    t_start = time.time()
    # transformers refuses a device_map under ZeRO-3, which places the partitions itself.
    device_map = None if dist.topology(accelerator) == "zero3" else {"": accelerator.device}
    model, tokenizer, base_path = build_model(cfg, device_map=device_map, dtype=dtype)
    data = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    G, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if len(data.train) < G:
        raise ValueError(f"the training set has {len(data.train)} {'rows' if cfg.data.packing else 'examples'}, "
                         f"fewer than train.global_batch_size={G}: lower the batch size or add data")
    per_epoch = len(data.train) // G
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    trainable, all_params = model.get_nb_trainable_parameters()  # before sharding splits them
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    dist.fill_deepspeed_config(accelerator, micro, cfg.train.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP and DeepSpeed replace them
    load_peak = dist.reset_peak_memory()  # from here on, the peak is training's (what `scalora plan` predicts)
    config_yaml = os.path.join(out, "config.yaml")
    if main:
        if clear_old:
            _clear_previous_run(out)
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
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = tokenizer.pad_token_id
    block_mask = not (cfg.model.attn_implementation or "").startswith("flash")
    log = _Printer(main, total, start)
    log.line(f"scalora: {os.path.basename(base_path)} | {cfg.quant.bits}-bit base, LoRA r={cfg.lora.r} | "
             f"{data.stats['train_examples']} train / {data.stats['validation_examples']} validation examples "
             f"({data.format}{', packed' if cfg.data.packing else ''}) | {world} process(es) x {threads} threads | "
             f"{total} steps of {G} | {'resuming from ' + resume_from if resume_from else 'new run'} | "
             f"compute {str(dtype).removeprefix('torch.')} ({dtype_why})")
    if data.stats["truncated"] or data.stats["dropped"]:
        log.line(f"data: {data.stats['truncated']} examples truncated, {data.stats['dropped']} dropped "
                 f"(data.max_length={cfg.data.max_length}, data.too_long={cfg.data.too_long})")
    log.line(f"trainable params: {trainable:,d} || all params: {all_params:,d} || "
             f"trainable%: {100 * trainable / all_params:.4f}")

    first_eval: dict[str, float] = {}
    if start == 0 and data.validation:
        first_eval = _validate(model, accelerator, data, tokenizer, cfg, micro, pad_id)
        tracker.log(first_eval, step=0)
        log.line(_fmt(0, first_eval))

    model.train()
    tokens_seen, t0, window_tokens, window_t = 0, time.time(), 0, time.time()
    last_eval: dict[str, float] = dict(first_eval)
    skipped, eval_step = 0, 0
    for step in range(start, total):
        rows = [data.train[i] for i in global_batch(step, len(data.train), G, cfg.train.seed)]
        n_tokens = count_loss_tokens(rows)  # the whole global batch's, known on every rank without a collective
        mine = rows[rank * (G // world):(rank + 1) * (G // world)]
        step_loss = torch.zeros((), device=accelerator.device)
        for i in range(0, len(mine), micro):
            # Dropout is seeded by the micro-batch's place in the global batch: the same examples get the same
            # masks on any number of processes, and a resumed run needs no saved RNG state.
            torch.manual_seed(_micro_seed(cfg.train.seed, step, (rank * (G // world) + i) // micro))
            with accelerator.accumulate(model):
                batch = _device_batch(mine[i:i + micro], pad_id, accelerator.device, block_mask)
                loss_sum = token_loss_sum(model, batch)
                if faults.hit("nan", step + 1):
                    loss_sum = loss_sum * float("nan")
                # Gradient of the global batch's mean token loss: DDP averages over W ranks and accelerate divides
                # by the accumulation steps A, so each micro-batch contributes sum * W * A / N.
                accelerator.backward(loss_sum * world * accelerator.gradient_accumulation_steps / max(1, n_tokens))
                step_loss += loss_sum.detach()
                grad_norm = None
                if accelerator.sync_gradients and (cfg.train.max_grad_norm > 0 or cfg.train.on_nonfinite == "skip"):
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
                if grad_norm is not None and cfg.train.on_nonfinite == "skip" and not math.isfinite(grad_norm):
                    skipped += 1
                    log.line(f"step {step + 1}: non-finite gradient norm, optimizer step skipped "
                             f"({skipped} so far; train.on_nonfinite=skip)")
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        faults.maybe_kill("step", done)
        step_loss = accelerator.reduce(step_loss, "sum")
        if not torch.isfinite(step_loss) and cfg.train.on_nonfinite == "stop":
            raise NonFiniteLoss(f"step {done}: the training loss is {step_loss.item()} (non-finite); stopped with "
                                f"nothing written after the last checkpoint. Resume with a lower train.lr, or set "
                                f"train.on_nonfinite=skip to skip such steps")
        batch_tokens = sum(len(r["input_ids"]) for r in rows)
        tokens_seen += batch_tokens
        window_tokens += batch_tokens
        if cfg.train.log_every and (done % cfg.train.log_every == 0 or done == total):
            mean_loss = (step_loss / max(1, n_tokens)).item()
            now = time.time()
            metrics = {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": window_tokens / max(1e-9, now - window_t),
                       "train/tokens": tokens_before + tokens_seen,
                       "train/peak_memory_gb": dist.peak_memory_bytes() / 2**30}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            window_tokens, window_t = 0, now
            tracker.log(metrics, step=done)
            log.step(done, metrics)
        else:
            log.tick(done)
        if data.validation and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
            last_eval, eval_step = _validate(model, accelerator, data, tokenizer, cfg, micro, pad_id), done
            tracker.log(last_eval, step=done)
            log.line(_fmt(done, last_eval))
        stop = stopper.requested(accelerator)
        if done != total and (stop or cfg.train.save_every and done % cfg.train.save_every == 0):
            path = _save(accelerator, model, optimizer, done, run_id, tokens_before + tokens_seen,
                         last_eval if eval_step == done else {}, config_yaml, cfg)
            if stop:
                log.line(f"{stopper.name} received: checkpoint {path} written at step {done}; resume with the same "
                         "command (train.resume=auto)")
                accelerator.wait_for_everyone()
                tracker.finish()
                return {"steps": done, "stopped_by": stopper.name, "checkpoint": path}

    if data.validation and start < total:
        last_eval, eval_step = _validate(model, accelerator, data, tokenizer, cfg, micro, pad_id), total
        tracker.log(last_eval, step=total)
        log.line(_fmt(total, last_eval))
    if start < total:
        _save(accelerator, model, optimizer, total, run_id, tokens_before + tokens_seen,
              last_eval if eval_step == total else {}, config_yaml, cfg)
    checkpoint.save_final_adapter(accelerator, model, os.path.join(out, "final"))
    opt_elements = accelerator.gather(torch.tensor([sharding.local_optimizer_state_elements(optimizer)],
                                                   device=accelerator.device)).tolist()
    elapsed = time.time() - t0
    peak = dist.peak_memory_bytes()
    summary = {"steps": total, "resumed_from_step": start, "train_tokens": tokens_seen,
               "train_seconds": round(elapsed, 2), "total_seconds": round(time.time() - t_start, 2),
               "tokens_per_s": round(tokens_seen / max(1e-9, elapsed), 1), "processes": world,
               "topology": dist.topology(accelerator), "optimizer_state_elements_per_rank": opt_elements,
               "trainable_params": trainable, "skipped_steps": skipped,
               "compute_dtype": str(dtype).removeprefix("torch."), "compute_dtype_reason": dtype_why,
               "cpu": cpu_features(),
               "peak_memory_gb": round(peak / 2**30, 3),
               "peak_memory_gb_per_rank": [round(float(b) / 2**30, 3) for b in accelerator.gather(
                   torch.tensor([float(peak)], device=accelerator.device)).tolist()],
               "process_peak_memory_gb": round(max(load_peak, peak) / 2**30, 3),
               "first_eval": first_eval, "final_eval": last_eval, "adapter": os.path.join(out, "final")}
    if main:
        import json

        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        png = plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        log.line(_summary_text(summary, png))
    accelerator.wait_for_everyone()
    tracker.finish()  # accelerate's end_training also ends the process group: last
    return summary


class NonFiniteLoss(RuntimeError):
    pass


def _micro_seed(seed: int, step: int, micro_index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro_index) % (2**63 - 1)


def _save(accelerator, model, optimizer, step, run_id, tokens, step_eval, config_yaml, cfg) -> str:
    state = {"run_id": run_id, "tokens": tokens, "eval_loss": step_eval.get("eval/loss")}
    return checkpoint.save(accelerator, model, optimizer, step, state, config_yaml, cfg.train.output_dir,
                           cfg.train.save_total_limit, cfg.train.keep_best)


def _check_checkpoint_config(cfg: RunConfig, path: str) -> None:
    import yaml

    with open(os.path.join(path, "config.yaml")) as f:
        previous = yaml.safe_load(f) or {}
    if not _same_run(previous, cfg.to_dict()):
        raise ValueError(f"checkpoint {path} was written by a run with a different config ({path}/config.yaml); "
                         "resume with that config, or pass train.overwrite=true to start a new run here")


class _StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask for a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self) -> None:
        import signal

        self.name: Optional[str] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        import signal

        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Whether any rank was signalled (agreed by all ranks, so that all of them save and stop together)."""
        flag = torch.tensor(float(self.name is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        if flag.item() and self.name is None:
            self.name = "SIGTERM"
        return bool(flag.item())


def _validate(model, accelerator, data, tokenizer, cfg, micro, pad_id) -> dict[str, float]:
    metrics = evaluate(model, accelerator, data.validation, micro, pad_id)
    if cfg.data.max_eval_generate:
        em = exact_match(model, accelerator, data, tokenizer, cfg)
        if em is not None:
            metrics["eval/exact_match"] = em
    return metrics


def _fmt(step: int, m: dict[str, float]) -> str:
    parts = [f"step {step}: validation loss {m['eval/loss']:.4f}, perplexity {m['eval/perplexity']:.2f}"]
    if "eval/exact_match" in m:
        parts.append(f"exact match {m['eval/exact_match']:.1%}")
    return ", ".join(parts)


def _summary_text(s: dict[str, Any], png: Optional[str]) -> str:
    lines = [f"done: {s['steps']} steps, {s['train_tokens']:,} tokens in {s['train_seconds']:.1f} s "
             f"({s['tokens_per_s']:,.0f} tokens/s), peak memory {s['peak_memory_gb']:.2f} GiB"]
    f, l = s["first_eval"], s["final_eval"]
    if f and l:
        lines.append(f"validation loss {f['eval/loss']:.4f} -> {l['eval/loss']:.4f}")
        if "eval/exact_match" in f and "eval/exact_match" in l:
            lines.append(f"validation exact match {f['eval/exact_match']:.1%} -> {l['eval/exact_match']:.1%}")
    lines.append(f"adapter (PEFT format): {s['adapter']}" + (f" | loss plot: {png}" if png else ""))
    return "\n".join(lines)


class _Printer:
    """A tqdm bar on a terminal (rank 0 only); one plain line per logging step otherwise, with an ETA."""

    def __init__(self, main: bool, total: int, start: int) -> None:
        self.main, self.total, self.start, self.t0 = main, total, start, time.time()
        self.bar = None
        if main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def tick(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def step(self, done: int, m: dict[str, float]) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.tick(done)
            self.bar.set_postfix(loss=f"{m['train/loss']:.4f}", lr=f"{m['train/lr']:.2e}",
                                 tok_s=f"{m['train/tokens_per_s']:.0f}")
            return
        eta = (time.time() - self.t0) / max(1, done - self.start) * (self.total - done)
        print(f"step {done}/{self.total} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | "
              f"{m['train/tokens_per_s']:,.0f} tokens/s | eta {eta:.0f} s", flush=True)
