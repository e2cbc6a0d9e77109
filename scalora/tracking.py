"""What a run shows: progress on the terminal, `metrics.jsonl` always, Weights & Biases or TensorBoard through
accelerate's trackers, a loss plot and the closing summary.

Logging never stops training: a tracker that fails to start or to log is turned off with one warning.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any, Optional

from .config import RunConfig


def choose_tracker(cfg: RunConfig) -> Optional[str]:
    """The accelerate tracker name, or None. wandb runs offline without an API key (a folder `wandb sync` uploads)."""
    report = cfg.log.report_to
    if report == "none":
        return None
    if report == "wandb":
        try:
            import wandb  # noqa: F401
        except Exception:
            warnings.warn("log.report_to=wandb but wandb is not installed (pip install wandb); logging to "
                          "metrics.jsonl only")
            return None
        mode = cfg.log.wandb_mode
        if mode == "auto":  # a WANDB_MODE the user exported wins; otherwise online only with a key
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # only the main process starts W&B (accelerate's tracker), so only it asks whether the server answers
        why = wandb_unreachable() if mode == "online" and os.environ.get("RANK", "0") == "0" else None
        if why:  # offline at once instead of W&B's own ~15 s of retries and then no W&B run at all
            runs = os.path.join(cfg.train.output_dir, "wandb", "offline-run-*")
            warnings.warn(f"the W&B server cannot be reached ({why}); this run logs to W&B offline: upload it later "
                          f"with `wandb sync {runs}`")
            mode = "offline"
        os.environ["WANDB_MODE"] = mode
        return "wandb"
    if report == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except Exception:
            try:
                import tensorboardX  # noqa: F401
            except Exception:
                warnings.warn("log.report_to=tensorboard but neither tensorboard nor tensorboardX is installed; "
                              "logging to metrics.jsonl only")
                return None
        return "tensorboard"
    return None


def wandb_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the W&B server (WANDB_BASE_URL, else api.wandb.ai) refuses or does not answer a connection, or None where
    it answers or the check cannot tell (a proxy is set: the connection would go through it). Measured with nothing
    listening: W&B's own init spent 14.6 s (key check, run set-up, WANDB_INIT_TIMEOUT=4) before failing."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                        "all_proxy")):
        return None
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:  # refused, timed out, no route, no such host
        return f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


class Tracker:
    def __init__(self, accelerator, cfg: RunConfig, out_dir: str, tracker: Optional[str], run_id: str) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.active = tracker is not None
        if not self.active:
            return
        name = cfg.log.run_name or os.path.basename(os.path.abspath(out_dir))
        init_kwargs = {"wandb": {"name": name, "tags": cfg.log.tags or None, "group": cfg.log.group,
                                 "dir": out_dir, "id": run_id, "resume": "allow"}}
        try:
            accelerator.init_trackers(cfg.log.project, config=_flat(cfg.to_dict()), init_kwargs=init_kwargs)
        except Exception as e:  # unreachable server, bad key, broken install: train on, offline metrics only
            warnings.warn(f"the {tracker} tracker could not start ({type(e).__name__}: {e}); training continues "
                          f"and metrics go to {self.path}")
            self.active = False

    def truncate_after(self, step: int) -> None:
        """On resume, drop metric and sample lines written after the checkpoint, so the history equals an
        uninterrupted run."""
        if not self.main:
            return
        for path in (self.path, os.path.join(os.path.dirname(self.path), "samples.jsonl")):
            if not os.path.exists(path):
                continue
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            keep.append(line)
                    except ValueError:  # a line cut short by a kill
                        pass
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.active:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as e:
                warnings.warn(f"tracker logging failed ({e}); continuing with metrics.jsonl only")
                self.active = False

    def finish(self) -> None:
        if self.active:
            try:
                self.accelerator.end_training()
            except Exception as e:
                warnings.warn(f"tracker did not close cleanly: {e}")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def plot_losses(metrics_path: str, out_png: str) -> Optional[str]:
    """Train and validation loss (and exact match where measured) against the step, written to `out_png`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        warnings.warn("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    fig = loss_figure(rows)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def loss_figure(rows: list[dict[str, Any]]):
    """The loss plot of metrics.jsonl's rows: a log-scale loss axis where the losses span a decade or more (a
    fine-tune's loss often falls from ~3 to ~0.05, and a linear axis flattens everything after the first steps),
    the legend below the axes, where it covers no line."""
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    em = [(r["step"], r["eval/exact_match"]) for r in rows if "eval/exact_match" in r]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    losses = [v for _, v in train + val if v == v and v > 0]
    log_scale = bool(losses) and max(losses) >= 10 * min(losses)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token" + (" (log scale)" if log_scale else ""))
    ax.grid(alpha=0.3, which="both" if log_scale else "major")
    handles, labels = ax.get_legend_handles_labels()
    if em:
        ax2 = ax.twinx()
        ax2.plot(*zip(*em), "s--", label="validation exact match", color="tab:green")
        ax2.set_ylabel("exact match")
        ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_title("scalora training run")
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return fig


def summary_text(s: dict[str, Any], png: Optional[str]) -> str:
    other = s.get("validation_seconds", 0) + s.get("checkpoint_seconds", 0)
    lines = [f"done: {s['steps']} steps, {s['train_tokens']:,} tokens in {s['train_seconds']:.1f} s of training "
             f"({s['tokens_per_s']:,.0f} tokens/s; validation and checkpoints another {other:.1f} s), peak memory "
             f"{s['peak_memory_gb']:.2f} GiB"]
    f, l = s["first_eval"], s["final_eval"]
    if f and l:
        lines.append(f"validation loss {f['eval/loss']:.4f} -> {l['eval/loss']:.4f}")
        if "eval/exact_match" in f and "eval/exact_match" in l:
            lines.append(f"validation exact match {f['eval/exact_match']:.1%} -> {l['eval/exact_match']:.1%}")
    lines.append(f"adapter (PEFT format): {s['adapter']}" + (f" | loss plot: {png}" if png else ""))
    return "\n".join(lines)


class Progress:
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
