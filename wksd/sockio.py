"""A non-blocking socket driven by trio's low-level waits: the daemon's hot I/O.

Why not ``trio.SocketStream``: each ``receive_some`` and ``send_all`` passes
through the scheduler (a checkpoint) even when the data is already there or
the send goes through at once. On a request/response socket that is two
scheduler trips per request; measured here, a trio echo server answers in
23 µs with streams and in 12 µs like this, and that difference is most of
what separates wksd from its latency goals (README, "Benchmark").

So ``SocketIO`` tries the system call first and waits with
``trio.lowlevel.wait_readable`` / ``wait_writable`` only when it would block.
Waiting is a checkpoint, so cancellation works as usual. A peer that keeps
data always ready would never make us wait, so every ``FAIR_SHARE`` reads
that did not wait end with an explicit checkpoint: no connection can starve
the others.

The same shell serves client connections, the listening socket (``accept``)
and the Redis link (plain TCP or Unix; TLS goes through trio's SSLStream).
"""

from __future__ import annotations

import errno
import socket
from typing import Final

import trio

__all__ = ["FAIR_SHARE", "SocketIO", "accept"]

#: Reads in a row that found data waiting before one yields to other tasks.
#: A request-response client blocks every read anyway; this bounds a flood.
FAIR_SHARE: Final = 16

#: accept() errors that mean "out of a resource, try again shortly" (as trio's
#: serve_listeners treats them): a full fd table must not end the server.
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class SocketIO:
    """receive_some / send_all / aclose on a non-blocking stdlib socket."""

    __slots__ = ("_streak", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._streak = 0

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Bytes from the peer, b"" at end of input; BrokenResourceError if it broke."""
        sock = self.socket
        self._streak += 1
        if self._streak >= FAIR_SHARE:
            # Before the read, never after: a cancellation here loses nothing.
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(sock)
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte, waiting while the peer's buffer is full."""
        sock = self.socket
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            view = view[sent:]

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now; a task waiting on the socket gets ClosedResourceError."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()


async def accept(listener: socket.socket) -> socket.socket:
    """The next connection on a non-blocking listening socket."""
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            await trio.sleep(0.1)  # out of fds or memory: let connections finish
        else:
            return connection
