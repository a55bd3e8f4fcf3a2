"""clientlib: the client library and wire protocol of wksd.

Workers import this; it pulls in msgpack and the standard library only, never
trio or redis (DESIGN section 1).

    from clientlib import Client, cache_key

    with Client() as c:
        c.set_session("user123", {"role": "admin"}, ttl=86400)

``AsyncClient`` (trio or asyncio, needs anyio: the ``async`` extra) is loaded
on first use, so ``import clientlib`` still imports no event loop; without
anyio, asking for it raises an ``ImportError`` that says what to install.

The in-process daemon for testing workers is ``wksd.testing``: it is the
daemon, and this package imports nothing of it.
"""

from typing import TYPE_CHECKING, Any

from ._calls import cache_key, canonical_cache_key
from ._paths import default_socket_path, resolve_socket_path
from ._sync import Client, WorkflowSubscription
from ._types import (
    CleanupResult,
    Health,
    LockResult,
    LockStatus,
    WorkflowEvent,
    WorkflowState,
    WorkflowStats,
)
from .errors import (
    BadRequest,
    ComputeFailed,
    Conflict,
    ConnectionLost,
    DaemonUnavailable,
    Forbidden,
    Full,
    LockHeld,
    LockLost,
    LockNotOwned,
    NotFound,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    TooLarge,
    Unavailable,
    UnknownMethod,
    WksError,
)

if TYPE_CHECKING:
    from ._async import AsyncClient

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CleanupResult",
    "Client",
    "ComputeFailed",
    "Conflict",
    "ConnectionLost",
    "DaemonUnavailable",
    "Forbidden",
    "Full",
    "Health",
    "LockHeld",
    "LockLost",
    "LockNotOwned",
    "LockResult",
    "LockStatus",
    "NotFound",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "TooLarge",
    "Unavailable",
    "UnknownMethod",
    "WksError",
    "WorkflowEvent",
    "WorkflowState",
    "WorkflowStats",
    "WorkflowSubscription",
    "cache_key",
    "canonical_cache_key",
    "default_socket_path",
    "resolve_socket_path",
]


def __getattr__(name: str) -> Any:
    """Import ``AsyncClient`` (and with it anyio) only when it is asked for."""
    if name == "AsyncClient":
        from ._async import AsyncClient

        globals()[name] = AsyncClient  # later look-ups skip this function
        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
