"""The method table: wire params in, typed arguments out (STYLE habit 2).

Each method of DESIGN section 3 is one ``Method`` row: its name, its
parameters with the check that turns a raw msgpack value into a typed Python
value (or raises ``BadRequest`` naming the parameter), and the handler that
receives them. Raw params never travel past ``Dispatcher.call``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from clientlib.errors import BadRequest, Forbidden, InternalError, RemoteError, UnknownMethod

from .access import Peer
from .domain.values import MAX_SAFE_INTEGER, MAX_TEXT_BYTES
from .domain.workflows import FINISHED
from .metrics import Metrics
from .session import Later, Session

__all__ = ["Dispatcher", "Method", "Param"]

log = structlog.get_logger("wksd.dispatch")

#: Identifiers are non-empty strings of at most this many bytes (DESIGN 3).
MAX_ID_BYTES: Final = 256
#: TTLs above ten years are surely mistakes; they would pin a key for good.
MAX_TTL_SECONDS: Final = 10 * 365 * 86400

_REQUIRED: Final = object()

Check = Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    check: Check
    default: Any = _REQUIRED


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    params: tuple[Param, ...]
    handler: Callable[..., Awaitable[Any]]
    admin: bool = False
    #: The handler's first argument is the connection's ``Session``.
    session: bool = False

    def bind(self, raw: Sequence[Any], lenient: bool = False) -> list[Any]:
        """Check ``raw`` params against the signature; the typed arguments.

        Omitted or nil optional params take their defaults. ``lenient`` is
        for the text protocol, where a bare ``123`` is typed as a number but
        meant as an identifier: integers are accepted for string params.
        """
        if len(raw) > len(self.params):
            raise BadRequest(f"{self.name} takes at most {len(self.params)} params, got {len(raw)}")
        args = []
        for index, param in enumerate(self.params):
            value = raw[index] if index < len(raw) else None
            if value is None:
                if param.default is _REQUIRED:
                    raise BadRequest(f"{self.name}: {param.name} is required")
                args.append(param.default)
                continue
            if lenient and type(value) is int and param.check in _STRING_CHECKS:
                value = str(value)
            args.append(param.check(param.name, value))
        return args


# -- parameter checks ----------------------------------------------------------
def identifier(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    if len(value) > MAX_ID_BYTES:  # more characters than bytes allowed: too long anyway
        raise BadRequest(f"{name} is longer than {MAX_ID_BYTES} bytes")
    if not value.isascii():
        try:
            size = len(value.encode())
        except UnicodeEncodeError:  # a lone surrogate, from a text line's "\ud83d"
            raise BadRequest(f"{name} must be valid Unicode (no lone surrogates)") from None
        if size > MAX_ID_BYTES:
            raise BadRequest(f"{name} is longer than {MAX_ID_BYTES} bytes")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > MAX_TEXT_BYTES // 4:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            size = len(value.encode(errors="surrogatepass"))  # stored as JSON escapes
        if size > MAX_TEXT_BYTES:
            raise BadRequest(f"{name} is longer than {MAX_TEXT_BYTES} bytes")
    return value


_STRING_CHECKS: Final = (identifier, text)


def ttl(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"{name} must be a number of seconds greater than 0")
    if value > MAX_TTL_SECONDS:
        raise BadRequest(f"{name} must be at most {MAX_TTL_SECONDS} seconds")
    return float(value)


def mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a map")
    return value


def anything(name: str, value: Any) -> Any:
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def seconds(high: float) -> Check:
    """A duration from 0 up to ``high`` seconds (0 allowed: "do not wait")."""

    def check(name: str, value: Any) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= high:
            raise BadRequest(f"{name} must be a number of seconds from 0 to {high}")
        return float(value)

    return check


def bounded(low: int, high: int) -> Check:
    def check(name: str, value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise BadRequest(f"{name} must be an integer from {low} to {high}")
        return value

    return check


def integer(low: int) -> Check:
    def check(name: str, value: Any) -> int:
        if type(value) is not int or not low <= value <= MAX_SAFE_INTEGER:
            raise BadRequest(f"{name} must be an integer from {low} to {MAX_SAFE_INTEGER}")
        return value

    return check


def finish_status(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in FINISHED:  # a list is unhashable
        raise BadRequest(f"{name} must be one of {', '.join(sorted(FINISHED))}")
    return value


# -- the dispatcher ----------------------------------------------------------------
class Dispatcher:
    """Looks a method up, checks access and params, runs it, counts it."""

    def __init__(
        self,
        methods: Sequence[Method],
        metrics: Metrics,
        *,
        commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``commit`` runs after each handler, before its answer is returned:
        the durable log's, so nothing is answered before it is journaled."""
        self.methods = {method.name: method for method in methods}
        self._stats = metrics.requests
        self._commit = commit

    async def call(
        self,
        name: str,
        params: Sequence[Any],
        *,
        peer: Peer | None = None,
        allowed: bool = True,
        admin: bool = True,
        lenient: bool = False,
        session: Session | None = None,
    ) -> Any:
        """Run one request; its result (perhaps a ``Later``), or the ``RemoteError``."""
        started = time.perf_counter()
        method = self.methods.get(name)
        label = name if method is not None else "other"
        code = "OK"
        try:
            if not allowed:
                raise Forbidden("this uid and its groups are not allowed to use wksd")
            if method is None:
                raise UnknownMethod(f"no method {name!r}")
            if method.admin and not admin:
                raise Forbidden(f"{name} is for admins only")
            args = method.bind(params, lenient)
            if not method.session:
                result = await method.handler(*args)
            elif session is None:
                raise BadRequest(f"{name} needs a connection of its own")
            else:
                result = await method.handler(session, *args)
            if self._commit is not None:
                await self._commit()
                if isinstance(result, Later):
                    result = Later(self._committed(result.wait), result.give_up, result.revoke)
            return result
        except RemoteError as exc:
            code = exc.code
            raise
        except Exception as exc:
            code = InternalError.code
            # The type and place only: parameters may hold secrets.
            log.error("handler failed", method=label, error=type(exc).__name__, exc_info=True)
            raise InternalError("internal error; see the daemon's log") from exc
        finally:
            self._stats.observe(label, code, time.perf_counter() - started)

    def _committed(self, wait: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """``wait``, then the commit: a lock granted after a wait is journaled
        before it is answered."""
        commit = self._commit
        assert commit is not None

        async def wait_then_commit() -> Any:
            result = await wait()
            # Shielded: a cancellation here would lose a result (a granted
            # lock) that the server must deliver or revoke.
            with trio.CancelScope(shield=True):
                await commit()
            return result

        return wait_then_commit
