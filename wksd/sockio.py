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

A read is cancelled before its ``recv`` or not at all, so whatever bytes a
caller got are its own to finish with (the server's drain relies on it). A
task can be woken with data ready and be cancelled before it runs on: trio
then returns from the wait normally, and the cancellation would strike the
caller's work on the bytes just read. So after a wait a pending cancellation
is raised before the ``recv`` and the bytes stay in the socket. That check
(``checkpoint_if_cancelled``) costs 0.3 µs on the path that waits anyway,
where a cancel scope around each wait would cost 5.7 µs. ``accept`` does the
same: a cancelled accept loop takes no connection it would not serve. Out of
fds (EMFILE), it leaves the connection in the kernel's backlog and retries
with a growing pause, and tells its caller, who logs it.

The same shell serves client connections, the listening socket (``accept``)
and the Redis link (plain TCP or Unix; TLS goes through trio's SSLStream).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["ACCEPT_RETRY_MAX", "ACCEPT_RETRY_MIN", "FAIR_SHARE", "SocketIO", "accept"]

#: Reads in a row that found data waiting before one yields to other tasks.
#: A request-response client blocks every read anyway; this bounds a flood.
FAIR_SHARE: Final = 16

#: accept() errors that mean "out of a resource, try again shortly" (as trio's
#: serve_listeners treats them): a full fd table must not end the server.
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

#: accept() errors about the one connection being taken (it was aborted before
#: we got to it), as trio's SocketListener ignores them: take the next one.
_GONE_ERRORS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})

#: First pause before retrying an accept that ran out of fds: a connection
#: closing frees one within milliseconds on a busy daemon.
ACCEPT_RETRY_MIN: Final = 0.01

#: Longest pause between retries: a client queued in the backlog is served at
#: most this late after an fd frees, and an idle full table costs two
#: accept() calls a second.
ACCEPT_RETRY_MAX: Final = 0.5


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
                # Woken, perhaps cancelled since: cancel now, before the read.
                await trio.lowlevel.checkpoint_if_cancelled()
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

    def shutdown_read(self) -> None:
        """Take no more bytes: what the peer sent before is still read, then b"".

        On a Unix socket the peer's later sends fail (EPIPE), so it knows
        they were never read.
        """
        with contextlib.suppress(OSError):  # the peer is gone already
            self.socket.shutdown(socket.SHUT_RD)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now; a task waiting on the socket gets ClosedResourceError."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()


async def accept(
    listener: socket.socket, on_resource_error: Callable[[OSError], None] | None = None
) -> socket.socket:
    """The next connection on a non-blocking listening socket.

    Out of fds or memory (EMFILE, ENFILE, ...), the connection stays queued in
    the kernel's backlog: ``on_resource_error`` hears of each failure, and the
    accept is retried after a pause that doubles from ``ACCEPT_RETRY_MIN`` to
    ``ACCEPT_RETRY_MAX``. So a full fd table costs a few wake-ups a second,
    never a spin, and once a connection closes the queue moves again.
    """
    pause = ACCEPT_RETRY_MIN
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            await trio.lowlevel.checkpoint_if_cancelled()  # as in receive_some
        except OSError as exc:
            if exc.errno in _GONE_ERRORS:
                await trio.lowlevel.checkpoint()  # that one left; take the next
                continue
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            if on_resource_error is not None:
                on_resource_error(exc)
            await trio.sleep(pause)  # let connections finish and free their fds
            pause = min(2 * pause, ACCEPT_RETRY_MAX)
        else:
            return connection
