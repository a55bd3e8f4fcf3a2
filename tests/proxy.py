"""A TCP proxy in front of Redis that a test can cut or stall, for one daemon only.

Killing redis-server cuts every client at once; the conflict rules need one
daemon partitioned while Redis and the others go on.
"""

from __future__ import annotations

import trio


class Proxy:
    """Forwards 127.0.0.1:``port`` to Redis until told otherwise."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._cut = False
        self._flowing = trio.Event()
        self._flowing.set()
        self._pairs: list[trio.CancelScope] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def cut(self) -> None:
        """Drop every connection now, and every new one until ``restore``."""
        self._cut = True
        for scope in self._pairs:
            scope.cancel()

    def stall(self) -> None:
        """Hold every byte in both directions, connections left open."""
        self._flowing = trio.Event()

    def restore(self) -> None:
        self._cut = False
        self._flowing.set()

    async def _serve(self, client: trio.SocketStream) -> None:
        if self._cut:
            await client.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._pairs.append(scope)
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, scope)
                nursery.start_soon(self._pump, upstream, client, scope)
        self._pairs.remove(scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, pair: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair.cancel()  # one side closed: close both, as a real connection would
