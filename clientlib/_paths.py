"""Where the daemon's socket lives by default (DESIGN section 6).

Both functions take what they look at as arguments (the environment, and
whether a path exists), defaulting to the process's own, so the rules are
tested without depending on the host's ``/run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

__all__ = ["SYSTEM_SOCKET", "default_socket_path", "resolve_socket_path"]

#: The system unit's socket (systemd/wksd.socket): the last default.
SYSTEM_SOCKET = "/run/wksd/wksd.sock"


def _candidates(environ: Mapping[str, str]) -> list[str]:
    found = []
    runtime = environ.get("RUNTIME_DIRECTORY")
    if runtime:
        # systemd joins several RuntimeDirectory= entries with ':'.
        found.append(os.path.join(runtime.split(":")[0], "wksd.sock"))
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        found.append(os.path.join(xdg, "wksd", "wksd.sock"))
    found.append(SYSTEM_SOCKET)
    return found


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The daemon's default: ``$RUNTIME_DIRECTORY/wksd.sock``, else
    ``$XDG_RUNTIME_DIR/wksd/wksd.sock``, else ``/run/wksd/wksd.sock``."""
    return _candidates(os.environ if environ is None else environ)[0]


def resolve_socket_path(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
    """The path a client connects to.

    An explicit ``path`` wins, then ``$WKSD_SOCKET``. Otherwise the daemon's
    default chain is walked and the first socket that ``exists`` is taken: a
    worker run by systemd has a ``$RUNTIME_DIRECTORY`` of its own, which is
    not the daemon's, and must still find ``/run/wksd/wksd.sock``. When none
    exists, the first candidate is returned so the error names it.
    ``environ`` defaults to ``os.environ``.
    """
    if path is not None:
        return os.fspath(path)
    environ = os.environ if environ is None else environ
    explicit = environ.get("WKSD_SOCKET")
    if explicit:
        return explicit
    candidates = _candidates(environ)
    for candidate in candidates:
        if exists(candidate):
            return candidate
    return candidates[0]
