"""The one error tree of wksd, shared by the daemon and every client.

Errors are grouped by what the caller will do about them:

- ``DaemonUnavailable``: could not connect at all (is wksd running?);
- ``ConnectionLost``: the connection broke while a request was out; it may or
  may not have been applied;
- ``RequestTimeout``: no answer in time;
- ``ProtocolError``: the bytes on the wire made no sense;
- ``LockLost``: a lock held for a block of work ended before the work did,
  so another worker may have done it at the same time;
- ``RemoteError``: the daemon understood the request and refused it; the
  subclass says why, and is named after the wire code (DESIGN section 2.1).

The daemon raises the ``RemoteError`` subclasses itself, so one table
(``CODES``) maps wire codes to classes in both directions.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "CODES",
    "BadRequest",
    "ComputeFailed",
    "Conflict",
    "ConnectionLost",
    "DaemonUnavailable",
    "Forbidden",
    "Full",
    "InternalError",
    "LockHeld",
    "LockLost",
    "LockNotOwned",
    "NotFound",
    "ProtocolError",
    "RemoteError",
    "RemoteTimeout",
    "RequestTimeout",
    "TooLarge",
    "Unavailable",
    "UnknownMethod",
    "WksError",
    "error_from_wire",
]


class WksError(Exception):
    """Base class of every error clientlib raises."""


class DaemonUnavailable(WksError):
    """No connection could be made to the daemon's socket."""


class ConnectionLost(WksError):
    """The connection broke while a request was outstanding."""


class RequestTimeout(WksError):
    """The daemon did not answer within the client's timeout."""


class ProtocolError(WksError):
    """The peer sent bytes that are not a valid message."""


class LockLost(WksError):
    """The lock of an ``execute_with_lock`` block ended before the block did.

    Raised when the block ends, if the daemon reported the lock lost while
    the block ran (``lock.lost``), the connection that kept it ended, or the
    release found another owner or no lock. ``reason`` says which:
    ``expired``, ``not_owner``, ``not_found``, ``released`` or
    ``disconnected`` (see ``LockResult.lost_reason``).
    """

    def __init__(self, execution_id: str, worker_id: str, reason: str) -> None:
        super().__init__(
            f"the lock on {execution_id} held by {worker_id} was lost ({reason}); "
            "another worker may have run at the same time"
        )
        self.execution_id = execution_id
        self.worker_id = worker_id
        self.reason = reason


class ComputeFailed(WksError):
    """Another caller computing this value (``get_or_compute``) reported a failure.

    Nothing was cached; ``message`` is what that caller's ``fn`` raised.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteError(WksError):
    """The daemon answered a request with an error.

    ``code`` is the wire code (``"NOT_FOUND"``...), ``message`` a sentence for
    people, ``data`` optional structured detail.
    """

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "", data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of a response (DESIGN section 2.1)."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            wire["data"] = self.data
        return wire


class BadRequest(RemoteError):
    code = "BAD_REQUEST"


class UnknownMethod(RemoteError):
    code = "UNKNOWN_METHOD"


class NotFound(RemoteError):
    code = "NOT_FOUND"


class Conflict(RemoteError):
    code = "CONFLICT"


class LockHeld(RemoteError):
    code = "LOCK_HELD"


class LockNotOwned(RemoteError):
    code = "LOCK_NOT_OWNED"


class TooLarge(RemoteError):
    code = "TOO_LARGE"


class Forbidden(RemoteError):
    code = "FORBIDDEN"


class Full(RemoteError):
    code = "FULL"


class Unavailable(RemoteError):
    code = "UNAVAILABLE"


class RemoteTimeout(RemoteError):
    """The daemon itself gave up waiting (wire code ``TIMEOUT``)."""

    code = "TIMEOUT"


class InternalError(RemoteError):
    code = "INTERNAL"


#: Wire code -> exception class, the one table both directions use.
CODES: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownMethod,
        NotFound,
        Conflict,
        LockHeld,
        LockNotOwned,
        TooLarge,
        Forbidden,
        Full,
        Unavailable,
        RemoteTimeout,
        InternalError,
    )
}


def error_from_wire(error: Any) -> RemoteError:
    """Turn a response's ``error`` map into the matching exception.

    A malformed map or an unknown code still gives a ``RemoteError`` (the
    base class, with the code it carried), never a crash.
    """
    if not isinstance(error, dict):
        return InternalError(f"malformed error: {error!r}")
    code = error.get("code")
    message = error.get("message")
    cls = CODES.get(code) if isinstance(code, str) else None
    if cls is None:
        exc = RemoteError(str(message or ""), error.get("data"))
        exc.code = str(code)  # type: ignore[misc]
        return exc
    return cls(str(message or ""), error.get("data"))
