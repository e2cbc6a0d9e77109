"""The `scalora` command's entry point (and `python -m scalora`'s): the allocator first (scalora/malloc.py), which
may start the process again, then the command itself (scalora/cli.py). Imports only the standard library before
that, so that a started-again process has loaded nothing twice."""

from __future__ import annotations

import sys


def main() -> None:
    from . import malloc

    malloc.start_with_allocator(sys.argv[1:])
    from .cli import run

    run()
