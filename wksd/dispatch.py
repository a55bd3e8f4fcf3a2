"""The dispatcher: wire params in, typed arguments out, typed results turned back.

Each method is one ``Method`` row (the table itself is ``wksd.methods``): its
name, its parameters with the check that turns a raw msgpack value into a
typed Python value (or raises ``BadRequest`` naming the parameter), the
handler that receives them, and ``present``, which turns the handler's typed
result into its wire map. Raw params never travel past ``Dispatcher.call``,
and no wire map is made before it.

Access is denied unless the caller says otherwise: ``call`` refuses a peer
that is not stated to be ``allowed``, and an admin method to one not stated
to be ``admin``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from clientlib.errors import BadRequest, Forbidden, InternalError, RemoteError, UnknownMethod

from .access import Peer
from .metrics import Metrics
from .session import Later, Session

__all__ = ["REQUIRED", "Check", "Dispatcher", "Method", "Param"]

log = structlog.get_logger("wksd.dispatch")

#: The default of a parameter that has none: the request must give it.
REQUIRED: Final[Any] = object()

#: A parameter check: (the parameter's name, the raw value) -> the typed value,
#: or ``BadRequest`` naming the parameter.
Check = Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    check: Check
    default: Any = REQUIRED
    #: A string parameter: in the text protocol, where a bare ``123`` is typed
    #: as a number but meant as an identifier, an integer is read as its digits.
    textual: bool = False


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    params: tuple[Param, ...]
    handler: Callable[..., Awaitable[Any]]
    admin: bool = False
    #: The handler's first argument is the connection's ``Session``.
    session: bool = False
    #: The handler's typed result -> its wire map (None: the result is sent as it is).
    present: Callable[[Any], Any] | None = None

    def bind(self, raw: Sequence[Any], lenient: bool = False) -> list[Any]:
        """Check ``raw`` params against the signature; the typed arguments.

        Omitted or nil optional params take their defaults. ``lenient`` is
        for the text protocol: integers are accepted for ``textual`` params.
        """
        if len(raw) > len(self.params):
            raise BadRequest(f"{self.name} takes at most {len(self.params)} params, got {len(raw)}")
        args = []
        for index, param in enumerate(self.params):
            value = raw[index] if index < len(raw) else None
            if value is None:
                if param.default is REQUIRED:
                    raise BadRequest(f"{self.name}: {param.name} is required")
                args.append(param.default)
                continue
            if lenient and type(value) is int and param.textual:
                value = str(value)
            args.append(param.check(param.name, value))
        return args


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
        allowed: bool = False,
        admin: bool = False,
        lenient: bool = False,
        session: Session | None = None,
    ) -> Any:
        """Run one request; its wire answer (perhaps a ``Later``), or the ``RemoteError``.

        ``allowed`` and ``admin`` are what the access policy says of the peer;
        unless stated, it may call nothing.
        """
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
            result = self._presented(method, await self._run(method, params, lenient, session))
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

    @staticmethod
    async def _run(
        method: Method, params: Sequence[Any], lenient: bool, session: Session | None
    ) -> Any:
        """The handler's typed result, from the checked params."""
        args = method.bind(params, lenient)
        if not method.session:
            return await method.handler(*args)
        if session is None:
            raise BadRequest(f"{method.name} needs a connection of its own")
        return await method.handler(session, *args)

    @staticmethod
    def _presented(method: Method, result: Any) -> Any:
        """``result`` as the wire carries it (a ``Later``'s answers too)."""
        if method.present is None:
            return result
        if isinstance(result, Later):
            return result.then(method.present)
        return method.present(result)

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
