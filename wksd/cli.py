"""The ``wksd`` command: ``wksd [FLAGS]`` runs the daemon, ``wksd ctl ...`` asks it.

Only the standard library is imported here, so ``wksd ctl`` starts without
loading trio, redis or the daemon, and the daemon without the operator tool.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ctl"]:
        from .ctl import main as ctl_main

        return ctl_main(args[1:])
    from .run import run_daemon

    return run_daemon(args)
