"""`scalora train | merge | export | generate | plan | launch-file`."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import Any, NoReturn, Optional

if __name__ == "__main__" and not __package__:  # run as a file: `accelerate launch scalora/cli.py train ...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "scalora"

from .config import help_text, load_config  # noqa: E402
from .core.errors import UserError  # noqa: E402


def _split_config(args: argparse.Namespace) -> None:
    """`scalora train a.b=c` (no config file, overrides only): the first override is not a config path."""
    if args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides = [args.config] + list(args.overrides)
        args.config = None


# Set in the environment of the processes `scalora train` starts under `accelerate launch` (dist.launch_config): they
# are workers, and their inputs were checked before the launch.
RELAUNCHED = "ACCELERATE_LAUNCH"


def _train(args: argparse.Namespace) -> int:
    from . import preflight

    _split_config(args)
    cfg = load_config(args.config, args.overrides)
    in_worker = "LOCAL_RANK" in os.environ or RELAUNCHED in os.environ
    if cfg.dist.launch_config and not in_worker:
        from .dist import launch_file

        path = launch_file(cfg.dist.launch_config)
        preflight.check(cfg, cfg.dist.num_processes, preflight.launch_settings(path))
        return _relaunch(args, path, cfg.dist.num_processes)
    if in_worker:  # the launcher's settings against the config, all at once, before the model loads
        launch = preflight.launched_settings()
        preflight.check(cfg, launch["num_processes"], launch, inputs=False)
        if os.environ.get("LOCAL_RANK", "0") == "0" and RELAUNCHED not in os.environ:
            # the data and the output folder, before the model loads: read by each node's first process only (the
            # others go on and are stopped by the launcher if it fails); under dist.launch_config `scalora train`
            # checked them before it launched
            preflight.check_inputs(cfg)
    else:
        preflight.check(cfg)  # every input, before the model loads
    from .train import train

    train(cfg)
    return 0


def _relaunch(args: argparse.Namespace, launch_path: str, processes: int) -> int:
    """`scalora train` with dist.launch_config: start the same command under `accelerate launch`. A worker's error
    is shown once, as the worker printed it; the launcher's traceback that follows it is dropped."""
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_path,
           "--num_processes", str(processes), "-m", "scalora"] + (["--debug"] if args.debug else []) + ["train"]
    cmd += ([args.config] if args.config else []) + list(args.overrides)
    env = dict(os.environ, **{RELAUNCHED: "1"})
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on a CPU-only machine
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    worker_error = False
    for line in proc.stderr:
        if line.startswith("error (rank "):
            worker_error = True
        elif worker_error and not args.debug:
            continue  # the launcher's report of the failed worker: the worker's own message says it all
        sys.stderr.write(line)
    code = proc.wait()
    return 2 if worker_error and code else code


def _plan(args: argparse.Namespace) -> int:
    from . import plan

    _split_config(args)
    if args.gpus < 1 or args.nodes < 1:
        raise UserError("--gpus and --nodes must be at least 1")
    return plan.main(args)


def _merged(args: argparse.Namespace, dtype):
    """(the adapter merged into its base, tokenizer, how the base was loaded): `scalora merge` and `export`."""
    from .model import load_as_trained

    model, tokenizer, _, how = load_as_trained(args.adapter, args.base, args.config, args.full_precision,
                                               args.trust_remote_code)
    base = model.get_base_model()
    if getattr(base, "hf_quantizer", None) is not None:  # as trained: the de-quantized base weights + the adapter
        base.dequantize(dtype=dtype)
    return model.merge_and_unload().to(dtype), tokenizer, how


def _merge(args: argparse.Namespace) -> int:
    import torch

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder for the merged model (it is created if missing)")
    merged, tokenizer, how = _merged(args, getattr(torch, args.dtype))
    merged.save_pretrained(args.out)  # safetensors
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out}: base loaded {how}, {args.dtype} weights "
          "(load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from . import gguf_export

    target = args.gguf or args.gguf_adapter
    if bool(args.gguf) == bool(args.gguf_adapter):
        raise UserError("give one of --gguf OUT.gguf (the merged model) or --gguf-adapter OUT.gguf (the adapter "
                        "alone, for a base you already have as GGUF)")
    if os.path.isdir(target):
        raise UserError(f"{target} is a folder; give the path of the .gguf file to write")
    if args.type not in gguf_export.TYPES:
        raise UserError(f"--type {args.type}: choose one of {', '.join(gguf_export.TYPES)}")
    if args.gguf_adapter:
        from .model import load_as_trained

        model = load_as_trained(args.adapter, args.base, args.config, args.full_precision, args.trust_remote_code)[0]
        types = gguf_export.write_gguf_adapter(model, target, args.type)
        print(f"GGUF LoRA adapter written to {target}: {len(types)} tensors ({gguf_export.describe(types)}); run it "
              f"on the base's GGUF with llama.cpp (llama-cli -m BASE.gguf --lora {target}) or Ollama (a Modelfile "
              f"with FROM BASE.gguf and ADAPTER {os.path.abspath(target)})")
        return 0
    from . import streamed
    from .model import trained_setup

    setup = trained_setup(args.adapter, args.base, args.config, args.full_precision, args.trust_remote_code)
    reason = streamed.whole_model_reason(setup[0], setup[1], args.adapter)
    if reason is None:  # one decoder layer held at a time
        merged = streamed.open_merged(args.adapter, *setup)
        how = merged.how + ", merged one layer at a time"
        types = gguf_export.write_gguf_tensors(merged.config, merged.architecture, merged.tokenizer, target,
                                               args.type, merged.keys, merged.tensors)
    else:
        model, tokenizer, how = _merged(args, torch.float32)
        how += f", merged whole ({reason})"
        types = gguf_export.write_gguf(model, tokenizer, target, args.type)
    print(f"GGUF written to {target}: base loaded {how}, {len(types)} tensors "
          f"({gguf_export.describe(types)}); run it with llama.cpp (llama-cli -m {target}) or Ollama (a Modelfile "
          f"with FROM {os.path.abspath(target)})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .model import load_as_trained

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    model, tokenizer, _, how = load_as_trained(args.adapter, args.base, args.config, args.full_precision)
    print(f"base loaded {how}", file=sys.stderr)
    embedding = model.get_base_model().get_input_embeddings().weight
    dtype, device = embedding.dtype, embedding.device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        # as in training: the norms are fp32 beside a bf16 / fp16 base
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                 temperature=args.temperature or None, pad_token_id=tokenizer.pad_token_id)
        print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


def _launch_file(args: argparse.Namespace) -> int:
    from .dist import launch_file, shipped_launch_files

    if not args.name:
        print("\n".join(shipped_launch_files()))
        return 0
    print(os.path.abspath(launch_file(args.name)))
    return 0


def _add_base_options(p: argparse.ArgumentParser) -> None:
    """How `merge` and `export` load the base under the adapter (scalora.model.load_as_trained's arguments)."""
    p.add_argument("--base", help="base model folder or hub id (default: the run's model, or base_model_name_or_path "
                                  "of the adapter)")
    p.add_argument("--config", help="the run config the adapter was trained with (default: config.yaml beside it)")
    p.add_argument("--full-precision", action="store_true",
                   help="merge into the original full-precision base weights instead of the (de-quantized) base the "
                        "adapter was trained on")
    p.add_argument("--trust-remote-code", action="store_true", help="run the base repository's own code")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalora", description="QLoRA fine-tuning with PEFT-format adapters.")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also: SCALORA_DEBUG=1, which reaches launched processes)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a LoRA adapter on a quantized base",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a LoRA adapter. CONFIG is a YAML file (configs/*.yaml); without it the "
                                   "embedded default runs (a tiny model built here and a shipped data set).",
                       epilog="overrides: section.key=value, e.g. train.lr=1e-4 lora.r=16\n\nkeys:\n" + help_text())
    t.add_argument("config", nargs="?", help="run config YAML (default: the embedded default)")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.set_defaults(func=_train)

    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain transformers model")
    m.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output folder for the merged model")
    _add_base_options(m)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default float32)")
    m.set_defaults(func=_merge)

    x = sub.add_parser("export", help="write GGUF for llama.cpp and Ollama: the merged model, or the adapter alone",
                       description="The adapter merged into its base (as trained, like `scalora merge`, or "
                                   "--full-precision), written as GGUF with llama.cpp's tensor names and metadata, "
                                   "the tokenizer and chat template included.")
    x.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    x.add_argument("--gguf", help="the .gguf file to write: the merged model")
    x.add_argument("--gguf-adapter", help="the .gguf file to write: the LoRA adapter alone (llama.cpp's --lora, "
                                          "Ollama's ADAPTER), for a base you already have as GGUF")
    x.add_argument("--type", default="f16", help="f32, f16 (default), bf16 or q8_0: the 2-D weights' type (norms "
                                                "stay f32)")
    _add_base_options(x)
    x.set_defaults(func=_export)

    pl = sub.add_parser("plan", help="predict the per-device memory of a run, by strategy, before running it",
                        description="Predict a run's memory per device from the model's config.json alone (no "
                                    "weights): base weights and quantization constants, LoRA weights, gradients, "
                                    "optimizer state, activations, overhead; one row per strategy (single, DDP, "
                                    "ZeRO-2/3, FSDP, CPU offload), and which ones fit.")
    pl.add_argument("config", nargs="?", help="run config YAML (default: the embedded default)")
    pl.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    pl.add_argument("--gpus", type=int, default=1, help="devices per node (default 1)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    pl.add_argument("--gpu-memory", default="24GiB", help="memory per device, e.g. 24GiB, 80GB (default 24GiB)")
    pl.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                    help="plan for GPUs (bf16, default) or for this CPU (fp32, runtime measured here)")
    pl.add_argument("--json", help="also write the table as JSON to this file")
    pl.set_defaults(func=_plan)

    lf = sub.add_parser("launch-file", help="print the path of a shipped accelerate launch file (none: list them)",
                        description="accelerate launch --config_file \"$(scalora launch-file fsdp)\" -m scalora train "
                                    "CONFIG.yaml")
    lf.add_argument("name", nargs="?", help="single, ddp, zero2, zero3, zero3_offload or fsdp")
    lf.set_defaults(func=_launch_file)

    g = sub.add_parser("generate", help="generate text with base + adapter")
    g.add_argument("adapter", help="adapter folder")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--prompts-file", help="file with one prompt per line")
    g.add_argument("--base", help="base model (default: from the adapter's config)")
    g.add_argument("--config", help="the run config the adapter was trained with (default: config.yaml beside it)")
    g.add_argument("--full-precision", action="store_true",
                   help="load the original base weights in fp32 instead of the base as the run trained it")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.set_defaults(func=_generate)
    return p


# --- the error boundary: every command, every process ----------------------------------------------------------
_FILE_ERRORS = {FileNotFoundError: "does not exist", IsADirectoryError: "is a folder where a file was expected",
                NotADirectoryError: "is not a folder", PermissionError: "cannot be accessed (permission denied)",
                FileExistsError: "exists already (and is not a folder)"}


def user_message(e: BaseException) -> Optional[tuple[str, int]]:
    """(message, exit status) for an error the user caused and can fix: 2 for bad input, 3 for a non-finite loss.
    None for anything else: a failure scalora did not foresee, reported with its traceback."""
    import errno

    from .train import NonFiniteLoss

    if isinstance(e, NonFiniteLoss):
        return str(e), 3
    if isinstance(e, UserError):
        return str(e), 2
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"the disk is full ({e.filename or 'while writing'}): free space and run the same command again "
                "(a run resumes from its last checkpoint)"), 2
    for kind, what in _FILE_ERRORS.items():
        if isinstance(e, kind):  # scalora's own carry a whole message; the operating system's name the file
            return (f"{e.filename}: {what}" if e.filename else str(e)), 2
    if isinstance(e, ValueError):  # a library refusing a value the config passed on (e.g. an attention kernel)
        return f"{e} (this came from a library scalora called; --debug shows where)", 2
    return None


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crash", "NCCL communicator was "
              "aborted", "Broken pipe")


def _peer_failed(e: BaseException) -> bool:
    """A collective broken because another process of the run died: that process's own message is the one to read."""
    import torch

    if _rank() is None:
        return False
    return isinstance(e, getattr(torch.distributed, "DistError", ())) or \
        (isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_GONE))


def _rank() -> Optional[tuple[int, int]]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _print_error(message: str) -> None:
    """The message, once: under a launcher every process that fails prints it, named by rank, unless another
    process of this launcher on this node printed the same message already."""
    rank = _rank()
    if rank is None:
        print(f"error: {message}", file=sys.stderr)
        return
    import fcntl
    import tempfile

    message = " ".join(line.strip() for line in message.splitlines())  # one line: the launcher's output interleaves
    key = f"{os.getppid()}-{os.environ.get('MASTER_PORT', '')}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    with open(os.path.join(tempfile.gettempdir(), f"scalora-errors-{key}"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if message + "\0" in f.read():
            return
        f.write(message + "\0")
        f.flush()
    print(f"error (rank {rank[0]} of {rank[1]}): {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SCALORA_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _peer_failed(e) and not debug:
            return 1  # silent: the process that failed first printed why (or the launcher reports how it died)
        known = user_message(e)
        if debug or known is None:
            import traceback

            traceback.print_exc()
        if known is None:
            _print_error(f"an unexpected {type(e).__name__} (traceback above): this is a bug in scalora. Please "
                         "report it with the command, the traceback and `pip freeze`, to scalora's issue tracker")
            return 1
        _print_error(known[0])
        return known[1]


def run(argv: Optional[list[str]] = None) -> NoReturn:
    """The `scalora` command: `main`, then the process ends without tearing the interpreter down.

    Python's teardown frees every module and object one by one; with torch, transformers and torch.compile's modules
    loaded that took 0.8 s after every command (measured: `import scalora.cli` then exit, 3.97 s against 3.19 s with
    this exit, Intel Xeon amx_bf16), paid again by each process of a launched run. Nothing is skipped that keeps data:
    every file scalora writes is closed before `main` returns, and what a normal exit runs first (threading's exit
    calls and the joining of threads that are not daemons, then the atexit handlers: wandb's finish, logging's
    flush, multiprocessing's and torch.compile's workers) runs here too, then the standard streams are flushed."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    exit_now(code)


def exit_now(code: Any) -> NoReturn:
    """End the process as a normal exit with status `code` would, less the interpreter's teardown (see `run`)."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        sys.exit(code)  # the interpreter's own exit where its sequence is not at hand
    # What the interpreter runs first at exit, in its order: threading's own atexit calls (concurrent.futures tells
    # its pools' workers to stop: joining those threads without it waits forever; torch.compile's workers showed it),
    # then every thread that is not a daemon joined; then the atexit handlers.
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()
