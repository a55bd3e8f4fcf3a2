"""Prometheus metrics and a health probe over HTTP, when WKSD_METRICS_ADDR is set.

Two routes, GET (or HEAD) only: ``/metrics``, the Prometheus exposition, and
``/health``, the health document with status 200 when the daemon is healthy or
degraded and 503 when it is unhealthy, so a load balancer or a probe can act
on the status code alone. One request per connection: scrapers and probes
open a connection per request anyway. h11 parses; this module only routes.
Every status line carries its standard reason phrase (``200 OK``), which some
probes and proxies print or match on.
At most ``MAX_CONNECTIONS`` are served at once; one more gets 503 unread.
"""

from __future__ import annotations

import contextlib
import json
import socket
from functools import partial
from http import HTTPStatus
from typing import Any, Final, Protocol

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["bind_http", "serve_http"]

#: A probe's request line and headers fit in far less; a larger one is not a probe.
MAX_REQUEST_BYTES: Final = 8192
#: Scrapers and probes come one or two at a time.
LISTEN_BACKLOG: Final = 16
#: Seconds a client has to send its request before the connection is dropped,
#: so idle connections cannot pile up.
REQUEST_TIMEOUT: Final = 5.0
#: Connections served at once. Their fds come out of the daemon's own budget
#: (``wksd.server.OWN_FDS``), shared with the socket's clients: without a cap,
#: a flood of idle connections to the port (each held up to REQUEST_TIMEOUT)
#: could use up the fds the workers' connections need. Beyond it, a
#: connection gets 503 at once and is closed.
MAX_CONNECTIONS: Final = 16

_HEALTHY_ENOUGH: Final = frozenset({"healthy", "degraded"})

#: The whole answer to a connection over ``MAX_CONNECTIONS``.
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n"
)


class _Observable(Protocol):
    async def health(self) -> dict[str, Any]: ...

    async def metrics_text(self) -> str: ...


def bind_http(address: tuple[str, int]) -> socket.socket:
    """Bind the metrics port now, so a port in use stops the daemon at start."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    sock: socket.socket,
    daemon: _Observable,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    await trio.serve_listeners(
        partial(_handle, daemon, limiter), [listener], task_status=task_status
    )


async def _handle(
    daemon: _Observable, limiter: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(_BUSY)  # unread: h11 answers only what it has read
        return
    try:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        await _serve(daemon, connection, stream)
    finally:
        limiter.release()


async def _serve(
    daemon: _Observable, connection: h11.Connection, stream: trio.SocketStream
) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                request = await _read_request(connection, stream)
            except h11.RemoteProtocolError:
                await _send(connection, stream, 400, b"bad request\n", "text/plain")
                return
            if request is None:
                return
            status, body, content_type = await _route(daemon, request)
            await _send(
                connection, stream, status, body, content_type, head=request.method == b"HEAD"
            )


async def _read_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_REQUEST_BYTES)
            connection.receive_data(data)  # b"" tells h11 the peer closed
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _route(daemon: _Observable, request: h11.Request) -> tuple[int, bytes, str]:
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"GET or HEAD only\n", "text/plain"
    path = request.target.split(b"?", 1)[0]
    if path == b"/metrics":
        return 200, (await daemon.metrics_text()).encode(), CONTENT_TYPE_LATEST
    if path == b"/health":
        health = await daemon.health()
        status = 200 if health["status"] in _HEALTHY_ENOUGH else 503
        return status, json.dumps(health).encode() + b"\n", "application/json"
    return 404, b"try /metrics or /health\n", "text/plain"


async def _send(
    connection: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    content_type: str,
    head: bool = False,
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    reason = HTTPStatus(status).phrase.encode()  # "200 OK", not a bare "200 "
    data = connection.send(h11.Response(status_code=status, headers=headers, reason=reason))
    if not head:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data or b"")  # a probe that hung up is no concern
