"""The subscriber connection: messages from the other daemons sharing Redis.

Redis gives a connection in subscribe mode to nothing else, so this is the
one dedicated connection DESIGN section 5 allows besides the command link.
It subscribes to wksd's channels (``KeySpace.*_channel``) and hands each
message to the callback registered for its channel. Messages are hints (a
lock was released, a value was filled, a workflow changed): whoever waits on
them also polls slowly, so a message lost while this connection reconnects
costs latency, never correctness.

A PING every ``PING_INTERVAL`` proves the connection alive; silence longer
than that plus the command timeout means Redis is gone or frozen, and the
subscriber reconnects, with capped backoff, forever.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
import trio
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from .redis_target import RedisTarget, open_stream
from .resp import pack, reply_reader

__all__ = ["Subscriber"]

log = structlog.get_logger("wksd.redis")

#: Seconds between PINGs on a quiet subscriber connection.
PING_INTERVAL: Final = 2.0


class _Gone(Exception):
    """The subscriber connection ended; the reason is the message."""


_FAILURES: Final = (RedisError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, _Gone)


class Subscriber:
    def __init__(
        self,
        target: RedisTarget,
        handlers: Mapping[str, Callable[[bytes], None]],
        *,
        timeout: float,
        backoff_max: float = 5.0,
    ) -> None:
        self._target = target
        self._handlers = {channel.encode(): handler for channel, handler in handlers.items()}
        self._timeout = timeout
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_max, base=0.25)
        #: Set while subscribed; tests and health read it.
        self.subscribed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failures = 0
        while True:
            try:
                await self._session()
            except _FAILURES as exc:
                log.debug("subscriber reconnecting", error=str(exc))
            if self.subscribed.is_set():
                failures = 0
                self.subscribed = trio.Event()
            failures += 1
            await trio.sleep(self._backoff.compute(failures))

    async def _session(self) -> None:
        stream = await open_stream(self._target, self._timeout)
        try:
            commands: list[list[Any]] = []
            if self._target.password is not None:
                user = [self._target.username] if self._target.username else []
                commands.append(["AUTH", *user, self._target.password])
            commands.append(["CLIENT", "SETNAME", "wksd-subscriber"])
            commands.append(["SUBSCRIBE", *self._handlers])
            await stream.send_all(b"".join([pack(*c) for c in commands]))
            ended: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ping_forever, stream)
                try:
                    await self._listen(stream)
                except _FAILURES as exc:  # raised after the nursery, not in a group
                    ended = exc
                nursery.cancel_scope.cancel()
            if ended is not None:
                raise ended
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _listen(self, stream: Any) -> None:
        reader = reply_reader()
        while True:
            with trio.move_on_after(PING_INTERVAL + self._timeout) as quiet:
                data = await stream.receive_some(65536)
            if quiet.cancelled_caught:
                raise _Gone("no word from Redis")
            if not data:
                raise _Gone("Redis closed the subscriber connection")
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            raise reply  # refused login, or subscribe refused
        if not isinstance(reply, list) or not reply:
            return  # +OK of AUTH or CLIENT SETNAME
        kind = reply[0]
        if kind == b"message":
            handler = self._handlers.get(reply[1])
            if handler is not None:
                try:
                    handler(reply[2])
                except Exception:
                    log.exception("subscriber handler failed", channel=reply[1].decode())
        elif kind == b"subscribe" and reply[2] == len(self._handlers):
            self.subscribed.set()

    async def _ping_forever(self, stream: Any) -> None:
        ping = pack("PING")
        while True:
            await trio.sleep(PING_INTERVAL)
            try:
                await stream.send_all(ping)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the listener notices the end
