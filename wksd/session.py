"""The session contract: what a method handler may know of its connection.

``Session`` is the connection as a handler sees it (an id, pushes, close
callbacks); ``Later`` is a handler's answer that is not ready yet. The server
implements the first and honours the second; the coordination services use
both and know nothing else of the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Later", "Session"]


class Session(Protocol):
    """What a handler may know of the connection a request came on."""

    @property
    def id(self) -> int: ...

    def push(self, method: str, params: list[Any]) -> None:
        """Queue a notification to this client; never blocks."""
        ...

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` when the connection closes (in the order registered)."""
        ...


class Later:
    """A handler's answer that is not ready yet: a blocking wait.

    The request has been applied in order (the waiter is queued); the server
    answers it when ``wait()`` returns, while it goes on with the
    connection's later requests. If the connection is drained first, it
    answers ``give_up()`` instead, at once. If the answer cannot be delivered
    (the peer has gone by the time ``wait()`` returns), the server calls
    ``revoke(result)`` to undo what the result granted: a lock is never left
    to a peer that will never hear it has it.
    """

    __slots__ = ("give_up", "revoke", "wait")

    def __init__(
        self,
        wait: Callable[[], Awaitable[Any]],
        give_up: Callable[[], Any],
        revoke: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        self.wait = wait
        self.give_up = give_up
        self.revoke = revoke

    def then(self, present: Callable[[Any], Any]) -> Later:
        """This wait with its answers turned by ``present`` (the method table's
        wire maps), for the server to send.

        ``revoke`` still gets the answer as ``wait`` gave it: the turned one
        is only what the server holds. A ``Later`` is waited for once.
        """
        answered: list[Any] = []

        async def wait() -> Any:
            answered.append(await self.wait())
            return present(answered[0])

        def give_up() -> Any:
            return present(self.give_up())

        revoke = self.revoke
        if revoke is None:
            return Later(wait, give_up)

        async def revoke_answered(_sent: Any) -> None:
            await revoke(answered[0])

        return Later(wait, give_up, revoke_answered)
