"""clientlib: the client library and wire protocol of wksd.

Workers import this; it pulls in msgpack and the standard library only, never
trio or redis (DESIGN section 1).

    from clientlib import Client, cache_key

    with Client() as c:
        c.set_session("user123", {"role": "admin"}, ttl=86400)
"""

from ._calls import cache_key
from ._paths import default_socket_path, resolve_socket_path
from ._sync import Client
from ._types import CleanupResult, Health, LockResult, LockStatus, WorkflowState, WorkflowStats
from .errors import (
    BadRequest,
    Conflict,
    ConnectionLost,
    DaemonUnavailable,
    Forbidden,
    Full,
    LockHeld,
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

__all__ = [
    "BadRequest",
    "CleanupResult",
    "Client",
    "Conflict",
    "ConnectionLost",
    "DaemonUnavailable",
    "Forbidden",
    "Full",
    "Health",
    "LockHeld",
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
    "WorkflowState",
    "WorkflowStats",
    "cache_key",
    "default_socket_path",
    "resolve_socket_path",
]
