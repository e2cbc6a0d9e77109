"""Fault injection for the crash-safety tests: SCALORA_FAULT_INJECT="<point>@<step>[@<rank>]".

Points: `step` (after optimizer step <step>), `ckpt-adapter`, `ckpt-optimizer`, `ckpt-manifest`, `ckpt-rename`
(inside the checkpoint write of <step>, see checkpoint.py), `nan` (the loss of <step> becomes NaN), `enospc` (the
checkpoint write of <step> fails with "No space left on device"), `bug` (an unexpected exception after <step>, as a
bug in scalora would raise). `kill` points send SIGKILL to the process itself.
With SCALORA_FAULT_ONCE=<file>, a fault fires only if <file> does not exist, and creates it (for restart tests).
Unset (always, outside tests), `hit` is one dictionary lookup. Read at each call, not at import: a process forked
from one that imported scalora already (the test suite's pre-imported interpreter, tests/zygote.py) sees its own.
"""

from __future__ import annotations

import errno
import os
import signal

def hit(point: str, step: int) -> bool:
    """Whether the configured fault is `point` at `step` on this rank (consumes a one-shot fault)."""
    spec = os.environ.get("SCALORA_FAULT_INJECT", "")
    if not spec:
        return False
    parts = spec.split("@")
    if parts[0] != point or int(parts[1]) != step:
        return False
    if len(parts) > 2 and int(os.environ.get("RANK", "0")) != int(parts[2]):
        return False
    once = os.environ.get("SCALORA_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return False
        open(once, "w").close()
    return True


def maybe_kill(point: str, step: int) -> None:
    if hit(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_disk_full(step: int) -> None:
    if hit("enospc", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
