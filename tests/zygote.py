"""`scalora ARGS` (or `python SCRIPT ARGS`) in a fresh process without paying the imports again: a pre-imported
interpreter that forks.

Most of the suite's time went to starting processes: `python -m scalora train` on the tiny model spent ~4 of its ~8 s
importing torch, transformers, bitsandbytes (which sets up torch.compile at import) and peft [amx_bf16 avx512_bf16].
This server imports them once; each run is a `fork()` of it that sets its own environment, working directory and
standard streams and then calls the console script's function (`scalora.cli.run`), so every run is still a process
of its own: its own exit status, signals, memory, accelerate and torch state, what a SIGKILL leaves behind.

The server starts with the environment the session's runs share, the allocator the `scalora` command preloads
included (LD_PRELOAD, scalora/malloc.py), so forked runs use the allocator a user's command does.

What a fork cannot give is what a process reads when it starts: glibc's MALLOC_* tuning, the instruction-set caps
torch and oneDNN read on first use, variables libraries read at import (HF_*, TRANSFORMERS_*, ...). `Zygote.run`
starts an ordinary subprocess instead when the environment asked for differs from the server's in such a variable
(FRESH_PREFIXES): so do the memory measurements, which set MALLOC_MMAP_THRESHOLD_.

Protocol: one JSON line per request on a socket pair, one JSON line back. The server runs no Python thread but its
own and no native thread beyond the one `import torch` starts (an idle helper; torch's DataLoader forks workers after
it the same way); both are checked before each fork, since forking a busy thread's held lock would hang the child.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

FRESH_PREFIXES = ("MALLOC_", "SCALORA_MALLOC", "LD_", "PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "ONEDNN_",
                  "DNNL_", "TORCH", "CUDA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "BNB_",
                  "ACCELERATE_")


def _child(req: dict, conn: socket.socket) -> None:
    """In the forked process: become `scalora ARGV` as started by the request, then never return."""
    try:
        conn.close()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            new = os.open(path, flags)
            os.dup2(new, fd)
            os.close(new)
        if req.get("script"):
            _run_script(req["script"], req["argv"])
        sys.argv = [sys.argv[0], *req["argv"]]
        from scalora.cli import run

        run(req["argv"])  # ends the process (os._exit)
    except BaseException:  # noqa: BLE001 - report whatever happened, then leave
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(70)


def _run_script(script: str, argv: list[str]) -> None:
    """`python SCRIPT ARGV` in the forked process: the script as __main__ with its folder first on sys.path, an
    uncaught exception printed with status 1, then the end of a normal exit (scalora.cli.exit_now)."""
    import runpy
    import traceback

    from scalora.cli import exit_now

    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as the interpreter reports it
        traceback.print_exc()
        code = 1
    exit_now(code)


def serve(fd: int) -> None:
    import scalora.cli  # noqa: F401 - the imports every run shares: torch, transformers, bitsandbytes, peft
    import scalora.train  # noqa: F401 - and what `train` loads: accelerate, safetensors, the model code
    import deepspeed  # noqa: F401 - what accelerate and the loss plot import later, without starting threads
    import matplotlib

    matplotlib.use("Agg")  # as scalora.tracking does
    import matplotlib.pyplot  # noqa: F401
    # not datasets: importing pyarrow starts a thread of its own

    native = len(os.listdir("/proc/self/task"))
    conn = socket.socket(fileno=fd)
    stream = conn.makefile("rw")
    status: dict[int, int] = {}
    for line in stream:
        req = json.loads(line)
        if req["op"] == "spawn":
            tasks = len(os.listdir("/proc/self/task"))
            if threading.active_count() != 1 or tasks > native:
                reply = {"error": f"the server runs {threading.active_count()} Python threads and {tasks} native "
                                  f"ones ({native} after its imports): a fork could copy a held lock"}
            else:
                pid = os.fork()
                if pid == 0:
                    _child(req, conn)
                reply = {"pid": pid}
        else:  # "poll": the exit status once the child ended (Popen's convention: -N for signal N), else null
            pid = req["pid"]
            if pid not in status:
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
            reply = {"returncode": status.get(pid)}
        stream.write(json.dumps(reply) + "\n")
        stream.flush()


class Process:
    """The part of subprocess.Popen the tests use, for a forked run."""

    def __init__(self, zygote: "Zygote", pid: int, out: str, err: str):
        self._zygote, self.pid, self._out, self._err, self.returncode = zygote, pid, out, err, None

    def poll(self):
        if self.returncode is None:
            self.returncode = self._zygote._ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(["scalora"], timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped by the server, so the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)

    def stdout_lines(self):
        """The child's standard output line by line as it is written, until it ends."""
        with open(self._out, errors="replace") as f:
            pending = ""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        yield pending
                        pending = ""
                elif self.poll() is not None:
                    rest = pending + f.read()
                    yield from rest.splitlines(keepends=True)
                    return
                else:
                    time.sleep(0.01)

    def output(self) -> tuple[str, str]:
        with open(self._out, errors="replace") as o, open(self._err, errors="replace") as e:
            return o.read(), e.read()


class Zygote:
    """The client: started on first use, one per test session."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.env, self.cwd, self._proc = env, cwd, None
        self._tmp = tempfile.mkdtemp(prefix="zygote-")
        self._n = itertools.count(1)  # output file numbers (next() on it is atomic: runs may be started from threads)
        self._lock = threading.Lock()  # one request at a time on the socket: runs may be started from threads

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], env=self.env, cwd=self.cwd)
        theirs.close()
        self._sock, self._stream = ours, ours.makefile("rw")

    def _ask(self, req: dict) -> dict:
        with self._lock:
            if self._proc is None:
                self._start()
            self._stream.write(json.dumps(req) + "\n")
            self._stream.flush()
            line = self._stream.readline()
        if not line:
            raise RuntimeError(f"the pre-imported interpreter ended ({self._proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def forks(self, env: dict[str, str]) -> bool:
        """Whether a run with `env` can be a fork: it differs from the server's only in what is read at run time."""
        keys = set(env) | set(self.env)
        return not any(env.get(k) != self.env.get(k) for k in keys if k.startswith(FRESH_PREFIXES))

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str | None = None,
              script: str | None = None) -> Process:
        n = next(self._n)
        out, err = (os.path.join(self._tmp, f"{n}.{s}") for s in ("out", "err"))
        for path in (out, err):
            open(path, "w").close()
        pid = self._ask({"op": "spawn", "argv": argv, "env": env, "cwd": cwd or os.getcwd(), "stdout": out,
                         "stderr": err, "script": script})["pid"]
        return Process(self, pid, out, err)

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 600,
            cwd: str | None = None, script: str | None = None) -> subprocess.CompletedProcess:
        """`scalora ARGV` (or `python SCRIPT ARGV`) to its end, as subprocess.run(..., capture_output=True,
        text=True) returns it."""
        command = [script] if script else ["-m", "scalora"]
        if not self.forks(env):
            return subprocess.run([sys.executable, *command, *argv], env=env, capture_output=True, text=True,
                                  timeout=timeout, cwd=cwd)
        proc = self.spawn(argv, env, cwd, script)
        try:
            proc.wait(timeout)
        finally:
            proc.kill()
        out, err = proc.output()
        return subprocess.CompletedProcess([*command, *argv], proc.returncode, out, err)

    def close(self) -> None:
        """Ends the server (it stops at the end of its input) and removes the runs' captured output."""
        import shutil

        if self._proc is not None:
            self._stream.close()
            self._sock.close()
            self._proc.wait(timeout=60)
        shutil.rmtree(self._tmp, ignore_errors=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
