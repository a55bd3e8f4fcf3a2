"""The Unix-socket server: accept, read, answer, in order, per connection.

Theory of operation
-------------------
One task per connection runs ``receive_some -> protocol -> dispatch -> send``,
on ``wksd.sockio.SocketIO`` rather than trio's streams (see that module for
why: half the latency of a round trip).
The first byte picks the protocol: an ASCII letter opens a text session
(``clientlib.textmode``), anything else is msgpack-RPC (``clientlib.protocol``).

Requests of one connection are applied one after another, in the order they
arrived. Everything decoded from one read is answered before the next read,
and the answers are written together, so a pipelining client pays one write
per batch. Backpressure is the socket itself: the daemon reads at most
``READ_CHUNK`` bytes ahead of what it has answered, and a client that stops
reading its answers stops being read.

A request that must wait (a lock with ``wait``, a value another caller is
computing) is applied in order too, and its handler returns a ``Later``: the
answer is sent by a task of the connection when it is ready, while the
connection's later requests go on. That task, and pushed notifications
(``Session.push``), write through ``_Connection.send``, so bytes never
interleave. When the connection ends, its close callbacks run (keepalive
locks are released, subscriptions and leases dropped); a peer that only
half-closed still gets its pending answers first.

End of input (a half-close) is answered like any pause: what was read is
answered, then the connection closes. Undecodable bytes get a
``protocol_error`` notification after the answers to everything before them,
then the connection closes; no other connection notices.

Shutdown (``drain``) stops accepting. A drain cancels a connection's wait
for input, never its work: a request whose bytes were read is answered (the
socket layer cancels a read before its ``recv`` or not at all, see
``wksd.sockio``). Each binary connection answers what it has read and, in the
same write, sends the notification ``[2, "closing", [reason]]``, so a client
knows to send its next request elsewhere (clientlib reconnects; under socket
activation the new connection waits for the next daemon). It then reads for
``DRAIN_READ_GRACE`` more, answering any request that crossed the notice on
the wire (text sessions too, without a notice). Then it shuts its reading
side: a client's later send fails (EPIPE), which tells it nothing was read,
and what arrived before is read and answered before the close. So no request
is both taken and dropped. The daemon's deadline (WKSD_SHUTDOWN_TIMEOUT)
bounds it all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket as stdlib_socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
import trio

from clientlib.errors import BadRequest, ProtocolError, RemoteError
from clientlib.protocol import (
    NEED_DATA,
    Decoder,
    Invalid,
    Request,
    encode_notification,
    encode_response,
)
from clientlib.textmode import (
    LineBuffer,
    format_error,
    format_result,
    is_text_start,
    parse_line,
)

from .access import AccessPolicy, Peer, peer_credentials
from .methods import Dispatcher, Later
from .metrics import Metrics
from .sockio import SocketIO, accept

__all__ = ["READ_CHUNK", "Server", "bind_unix_socket"]

log = structlog.get_logger("wksd.server")

#: Bytes read from a connection at a time. This is also the bound on work
#: read ahead of the answers: at most one chunk of requests is decoded and
#: waiting, however fast a client pipelines.
READ_CHUNK: Final = 65536

#: Answers are written when this many bytes have gathered, so a large
#: pipelined batch streams out instead of being held to the end.
FLUSH_BYTES: Final = 65536

#: Pending connections the kernel queues for accept(); workers of one host
#: reconnecting after a restart arrive in a burst.
LISTEN_BACKLOG: Final = 1024

#: Notifications queued for one client that is not reading, before the rest
#: are dropped (and counted, and the count sent when it catches up).
MAX_PUSH_BACKLOG: Final = 1000

#: Seconds the close callbacks of one connection (releasing its keepalive
#: locks, leases, ...) may take; Redis answers within its own timeout anyway.
CLOSE_CALLBACK_TIMEOUT: Final = 5.0

#: After the closing notice, how long a connection is still read: a request
#: that crossed the notice is already in the socket buffer, or arrives within a
#: scheduling delay.
DRAIN_READ_GRACE: Final = 0.05


_CLOSING: Final = encode_notification("closing", ["wksd is shutting down"])


class AddressInUse(OSError):
    """Another daemon answers on the socket path."""


def bind_unix_socket(path: str, mode: int) -> stdlib_socket.socket:
    """Bind and listen on ``path``, with its directory made if missing.

    An existing file is removed only if it is a socket nobody answers on
    (a stale one from a crash); a live socket or any other file is an error.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: the daemon that bound it is gone
        except BlockingIOError:  # alive, its accept queue full
            raise AddressInUse(errno.EADDRINUSE, "another wksd is serving", path) from None
        else:
            raise AddressInUse(errno.EADDRINUSE, "another wksd is serving", path)
        finally:
            probe.close()
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # Bind under a umask that leaves no moment with looser permissions.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class _Connection:
    """One client connection: its stream, its peer, its session state.

    The connection's task runs inside ``scope``. A drain cancels that scope
    only while the task waits for input (``waiting``), and ``SocketIO``
    raises a cancellation before its ``recv`` or not at all, so nothing that
    was read is ever interrupted; the goodbye then runs after it.

    Besides the connection's own task, others may write to it: a blocking
    request answered later (``Later``), and pushed notifications. ``send``
    keeps their bytes from interleaving; ``push`` never blocks the pusher: a
    client that does not read gets at most ``MAX_PUSH_BACKLOG`` notifications
    queued, and is told how many were dropped beyond that.
    """

    _ids = 0

    def __init__(self, stream: SocketIO, peer: Peer | None, policy: AccessPolicy) -> None:
        _Connection._ids += 1
        self.id = _Connection._ids
        self.stream = stream
        self.peer = peer
        self.allowed = peer is not None and policy.allows(peer)
        self.admin = peer is not None and policy.is_admin(peer)
        self.log = log.bind(
            peer_pid=peer.pid if peer else None, peer_uid=peer.uid if peer else None
        )
        self.scope = trio.CancelScope()
        self.waiting = False
        self.draining = False
        self.ended = False  # end of input, or closed for a protocol error
        self.told_closing = False
        self.decoder: Decoder | None = None  # a binary session, once its first byte says so
        self.lines: LineBuffer | None = None  # a text session
        self.tasks: trio.Nursery | None = None
        self.laters: set[trio.CancelScope] = set()  # answers still waiting; drain cancels
        self._sending = False
        self._sent: trio.Event | None = None
        self._pushes: trio.MemorySendChannel[bytes] | None = None
        self._dropped = 0
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def receive(self) -> bytes:
        """The next bytes from the client, b"" at end of input."""
        self.waiting = True
        try:
            data = await self.stream.receive_some(READ_CHUNK)
        finally:
            self.waiting = False
        if not data:
            self.ended = True
        return data

    def drain(self) -> None:
        """Stop waiting for new requests; those read are answered (module docstring)."""
        self.draining = True
        for scope in self.laters:  # waits give up and answer at once
            scope.cancel()
        if self.waiting:
            self.scope.cancel()

    async def send(self, data: bytes | bytearray) -> None:
        """Write ``data`` whole, after any other task's write in progress."""
        while self._sending:
            if self._sent is None:
                self._sent = trio.Event()
            await self._sent.wait()
        self._sending = True
        try:
            await self.stream.send_all(data)
        finally:
            self._sending = False
            if self._sent is not None:
                self._sent.set()
                self._sent = None

    # -- the Session interface (wksd.methods.Session) ------------------------
    def push(self, method: str, params: list[Any]) -> None:
        if self._pushes is None:
            if self.tasks is None or self.ended:
                return
            self._pushes, receive = trio.open_memory_channel[bytes](MAX_PUSH_BACKLOG)
            self.tasks.start_soon(self._send_pushes, receive)
        try:
            self._pushes.send_nowait(encode_notification(method, params))
        except trio.WouldBlock:
            self._dropped += 1
        except trio.ClosedResourceError:
            pass

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(callback)

    def stop_pushing(self) -> None:
        """No more notifications: the conversation is over."""
        self.ended = True
        if self._pushes is not None:
            self._pushes.close()

    async def _send_pushes(self, pushes: trio.MemoryReceiveChannel[bytes]) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for data in pushes:
                await self.send(data)
                if self._dropped and pushes.statistics().current_buffer_used == 0:
                    dropped, self._dropped = self._dropped, 0
                    await self.send(encode_notification("workflow.events_dropped", [dropped]))

    async def close(self) -> None:
        """Run the close callbacks (release keepalive locks, ...), then close."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_CALLBACK_TIMEOUT):
            for callback in self._closers:
                try:
                    await callback()
                except Exception:
                    self.log.exception("close callback failed")
        self.stream.close()

    def peer_gone(self) -> bool:
        """After end of input: did the peer close entirely (not just half-close)?"""
        poller = select.poll()
        poller.register(self.stream.socket, select.POLLHUP)
        return any(events & select.POLLHUP for _, events in poller.poll(0))


class Server:
    def __init__(
        self,
        dispatcher: Dispatcher,
        policy: AccessPolicy,
        metrics: Metrics,
        *,
        max_message_bytes: int,
    ) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self._metrics = metrics
        self._max_message_bytes = max_message_bytes
        self._connections: set[_Connection] = set()
        self._accepting: trio.CancelScope | None = None
        self._draining = False
        self._idle = trio.Event()
        self._idle.set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def serve(
        self,
        listener: stdlib_socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until ``drain``; then wait for them to finish."""
        listener.setblocking(False)
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accepting:
                task_status.started()
                while True:
                    # Known to drain() from the accept on, before its task runs.
                    connections.start_soon(self._handle, self._open(await accept(listener)))

    def stop_accepting(self) -> None:
        """No new connections from now on (the listening socket may then be closed)."""
        if self._accepting is not None:
            self._accepting.cancel()

    async def drain(self) -> None:
        """Stop accepting; return once every connection has answered and closed."""
        self._draining = True
        self.stop_accepting()
        for connection in list(self._connections):
            connection.drain()
        await self._idle.wait()

    def _open(self, sock: stdlib_socket.socket) -> _Connection:
        """Register an accepted connection (drained at once if a drain has begun)."""
        try:
            peer = peer_credentials(sock)
        except OSError:
            peer = None
        connection = _Connection(SocketIO(sock), peer, self._policy)
        self._connections.add(connection)
        self._idle = trio.Event() if len(self._connections) == 1 else self._idle
        self._metrics.connections.inc()
        self._metrics.connections_total.inc()
        if self._draining:
            connection.drain()
        return connection

    async def _handle(self, connection: _Connection) -> None:
        stream = connection.stream
        if not connection.allowed:
            peer = connection.peer
            connection.log.warning("peer not allowed", peer_gid=peer.gid if peer else None)
        try:
            try:
                async with trio.open_nursery() as tasks:
                    connection.tasks = tasks
                    try:
                        await self._converse(connection)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        tasks.cancel_scope.cancel()  # the client went away: nobody to answer
                    else:
                        if connection.ended and connection.peer_gone():
                            tasks.cancel_scope.cancel()  # gone, not half-closed
                    connection.stop_pushing()
            except Exception:
                # A bug must cost this connection, never the daemon and its
                # other clients.
                connection.log.exception("connection failed")
            await connection.close()
        finally:
            self._connections.discard(connection)
            self._metrics.connections.dec()
            if not self._connections:
                self._idle.set()
            stream.close()

    async def _converse(self, connection: _Connection) -> None:
        """Read and answer until end of input, a broken stream, or the drain's goodbye."""
        with connection.scope:
            if not connection.draining:  # else drained before its first read: the goodbye reads
                data = await connection.receive()
                while await self._feed(connection, data) and not connection.draining:
                    data = await connection.receive()
        if connection.draining and not connection.ended:
            await self._say_goodbye(connection)

    async def _call(
        self, connection: _Connection, method: str, params: list[Any], lenient: bool = False
    ) -> Any:
        return await self._dispatcher.call(
            method,
            params,
            peer=connection.peer,
            allowed=connection.allowed,
            admin=connection.admin,
            lenient=lenient,
            session=connection,
        )

    async def _feed(self, connection: _Connection, data: bytes) -> bool:
        """Answer what ``data`` completes, in the protocol its first byte chose;
        False once the conversation is over."""
        if connection.lines is not None:
            return await self._answer_text(connection, data)
        if not data:
            return False
        if connection.decoder is None:
            if is_text_start(data[0]):
                connection.lines = LineBuffer(self._max_message_bytes)
                return await self._answer_text(connection, data)
            connection.decoder = Decoder(self._max_message_bytes)
        return await self._answer(connection, data)

    async def _say_goodbye(self, connection: _Connection) -> None:
        """Tell a draining client we close; answer what crosses the notice; close."""
        if connection.decoder is not None and not connection.told_closing:
            await connection.send(_CLOSING)  # it was waiting for input when the drain began
            connection.told_closing = True
        stream = connection.stream
        while True:
            with trio.move_on_after(DRAIN_READ_GRACE) as grace:  # the wait only, never the work
                data = await stream.receive_some(READ_CHUNK)
            if grace.cancelled_caught:
                break
            if not await self._feed(connection, data):
                return
        # Bytes sent from now on are refused (the sender learns they were never
        # read); those that came before are answered.
        stream.shutdown_read()
        while data := await stream.receive_some(READ_CHUNK):
            if not await self._feed(connection, data):
                return

    async def _answer(self, connection: _Connection, data: bytes) -> bool:
        """Answer every request complete in ``data``; False if the stream broke."""
        decoder = connection.decoder
        assert decoder is not None
        decoder.receive_data(data)
        out = bytearray()
        while True:
            try:
                event = decoder.next_event()
            except ProtocolError as exc:
                self._metrics.protocol_errors.inc()
                connection.log.info("closing on protocol error", reason=str(exc))
                out += encode_notification("protocol_error", [str(exc)])
                await connection.send(out)
                connection.ended = True
                return False
            if event is NEED_DATA:
                break
            if isinstance(event, Request):
                try:
                    result = await self._call(connection, event.method, event.params)
                except RemoteError as exc:
                    out += encode_response(event.msgid, exc.to_wire(), None)
                else:
                    if isinstance(result, Later):
                        assert connection.tasks is not None
                        connection.tasks.start_soon(
                            self._answer_later, connection, event.msgid, result
                        )
                    else:
                        out += encode_response(event.msgid, None, result)
            elif isinstance(event, Invalid):
                out += encode_response(event.msgid, BadRequest(event.reason).to_wire(), None)
            else:  # a response or notification: clients send requests only
                error = BadRequest("clients send requests, [0, msgid, method, params]")
                out += encode_response(None, error.to_wire(), None)
            if len(out) >= FLUSH_BYTES:
                await connection.send(out)
                out = bytearray()
        if connection.draining and not connection.told_closing:
            out += _CLOSING  # with the last answers, so the client sees both at once
            connection.told_closing = True
        if out:
            await connection.send(out)
        return True

    async def _answer_later(self, connection: _Connection, msgid: int, later: Later) -> None:
        """Answer a request that waits (see ``Later``), when it is ready."""
        scope = trio.CancelScope()
        if connection.draining:
            scope.cancel()
        connection.laters.add(scope)
        try:
            with scope:
                try:
                    answer = encode_response(msgid, None, await later.wait())
                except RemoteError as exc:
                    answer = encode_response(msgid, exc.to_wire(), None)
            if scope.cancelled_caught:  # draining: give up now
                answer = encode_response(msgid, None, later.give_up())
        finally:
            connection.laters.discard(scope)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await connection.send(answer)  # a client that hung up needs no answer

    async def _answer_text(self, connection: _Connection, data: bytes) -> bool:
        """Answer every line complete in ``data`` (b"": the unterminated rest too);
        False once the session is over."""
        lines = connection.lines
        assert lines is not None
        stream = connection.stream
        lines.receive_data(data)
        out = bytearray()
        while True:
            try:
                line = lines.next_line() if data else lines.rest()
            except ProtocolError as exc:
                self._metrics.protocol_errors.inc()
                out += format_error(BadRequest(str(exc)))
                await stream.send_all(out)
                connection.ended = True
                return False
            if line is None:
                break
            out += await self._answer_line(connection, line)
            if len(out) >= FLUSH_BYTES:
                await stream.send_all(out)
                out = bytearray()
        if out:
            await stream.send_all(out)
        return bool(data)

    async def _answer_line(self, connection: _Connection, line: bytes) -> bytes:
        try:
            parsed = parse_line(line)
            if parsed is None:
                return b""
            method, params = parsed
            result = await self._call(connection, method, params, lenient=True)
            if isinstance(result, Later):  # a text session answers in order: wait here
                result = await result.wait()
        except RemoteError as exc:
            return format_error(exc)
        return format_result(method, result)
