"""The Unix-socket server: accept, read, answer, in order, per connection.

Theory of operation
-------------------
One task per connection runs ``receive_some -> protocol -> dispatch -> send``,
on ``wksd.sockio.SocketIO`` rather than trio's streams (see that module for
why: half the latency of a round trip).
The first byte picks the protocol: printable ASCII or whitespace opens a
text session (``clientlib.textmode``), a msgpack array header msgpack-RPC
(``clientlib.protocol``); any other byte gets ``protocol_error`` and the close.
A client's msgpack-RPC notification is applied in order like a request and
never answered (DESIGN 2.1).

Requests of one connection are applied one after another, in the order they
arrived. Everything decoded from one read is answered before the next read,
and the answers are written together, so a pipelining client pays one write
per batch. Backpressure is the socket itself: the daemon reads at most
``READ_CHUNK`` bytes ahead of what it has answered, and a client that stops
reading its answers stops being read.

A request that must wait (a lock with ``wait``, a value another caller is
computing) is applied in order too, and its handler returns a ``Later``: the
answer is sent by a task of the connection when it is ready, while the
connection's later requests go on (a text session answers in order, so its
later lines wait their turn). Every write, in either protocol (answers, those
that waited, pushed notifications framed by ``format_notification``), goes
through ``_Connection.send``, so bytes never interleave. While a request
waits, the connection is checked for a peer that has closed for good (not
just half-closed, as socat does at the end of its input); then the wait is
cancelled, and a result that came back anyway, or could not be sent, is
revoked (``Later.revoke``): nothing is granted to a peer that has gone.
When the connection ends, its close callbacks run (keepalive
locks are released, subscriptions and leases dropped); a peer that only
half-closed still gets its pending answers first.

End of input (a half-close) is answered like any pause: what was read is
answered, then the connection closes. Undecodable bytes get a
``protocol_error`` notification after the answers to everything before them,
then the connection closes; no other connection notices.

Neighbours are bounded. A connection over ``WKSD_MAX_CONNECTIONS`` or
``WKSD_MAX_CONNECTIONS_PER_UID`` (admin uids get ``ADMIN_RESERVE`` more), or
from a peer the access policy refuses, is not served: the requests of its
first read are answered ``FULL`` (or ``FORBIDDEN``) in its protocol, then it
is closed; one that sends nothing within ``REFUSAL_GRACE`` is closed
unanswered, and so is any beyond ``MAX_REFUSING`` being refused at once. Out
of fds (EMFILE), accept retries with a growing pause (``wksd.sockio``) while
the connections already open are served, and the warning is rate-limited
(``WARNING_INTERVAL``), as are those about refused peers. Notifications
queued for a client that does not read are bounded in count and in bytes.

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
import math
import os
import resource
import select
import socket as stdlib_socket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
import trio

from clientlib.errors import BadRequest, Full, InternalError, ProtocolError, RemoteError
from clientlib.protocol import (
    NEED_DATA,
    Decoder,
    Invalid,
    Notification,
    Request,
    encode_notification,
    encode_response,
    is_binary_start,
)
from clientlib.textmode import (
    LineBuffer,
    format_error,
    format_notification,
    format_result,
    is_text_start,
    parse_line,
)

from .access import AccessPolicy, Peer, peer_credentials
from .dispatch import Dispatcher
from .metrics import Metrics
from .session import Later
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

#: ... and their bytes: an event may be 64 KiB (``wksd.coordination.feeds.MAX_EVENT_BYTES``),
#: so a count alone let one subscriber that never reads pin 64 MB. 256 KiB is
#: four of the largest events or hundreds of typical ones, on top of what the
#: socket itself buffers (about 200 KiB on Linux); a reader that is merely slow
#: keeps up, and connections x this bounds what non-readers can pin. One
#: notification larger than this is still queued when nothing else is.
MAX_PUSH_BACKLOG_BYTES: Final = 256 * 1024

#: Connections an admin uid (WKSD_ADMIN_UIDS) may open beyond either cap, so
#: an operator can still ask for ``health`` or ``metrics`` while a runaway
#: client holds every other connection.
ADMIN_RESERVE: Final = 8

#: Connections being refused (over a cap, or a peer that is not allowed) at
#: once; each holds an fd for up to ``REFUSAL_GRACE``. Beyond this a new one
#: is closed unanswered at once: a connect flood cannot use up the fds either.
MAX_REFUSING: Final = 64

#: How long a refused connection waits for its first request so it can learn
#: why it is refused (a client speaks first, in either protocol, and at once).
REFUSAL_GRACE: Final = 2.0

#: fds the daemon needs besides its clients: stdio, the event loop's epoll
#: and wake-up pipe, the listening socket, sd_notify, the Redis link and its
#: pub/sub (Sentinels, Cluster nodes), the journal and snapshot, the metrics
#: port and its scrapes. LimitNOFILE= must be at least the connection cap
#: plus ``ADMIN_RESERVE``, ``MAX_REFUSING`` and this.
OWN_FDS: Final = 64

#: At most one warning per this many seconds for each kind of trouble a
#: neighbour can cause on purpose (a full fd table, refused connections):
#: such a warning must not become a way to flood the log.
WARNING_INTERVAL: Final = 10.0

#: Seconds the close callbacks of one connection (releasing its keepalive
#: locks, leases, ...) may take; Redis answers within its own timeout anyway.
CLOSE_CALLBACK_TIMEOUT: Final = 5.0

#: After the closing notice, how long a connection is still read: a request
#: that crossed the notice is already in the socket buffer, or arrives within a
#: scheduling delay.
DRAIN_READ_GRACE: Final = 0.05

#: While a request waits (a lock with ``wait``, a lease), how often its
#: connection is checked for a peer that has closed: a gone peer's wait ends
#: within this, at one poll() per interval per connection with waits.
PEER_CHECK_INTERVAL: Final = 0.1


_CLOSING: Final = encode_notification("closing", ["wksd is shutting down"])


class _Throttle:
    """A warning logged at most once per ``interval`` seconds, saying how many
    like it were left out since."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = -math.inf
        self._left_out = 0

    def warn(self, logger: Any, event: str, **fields: Any) -> None:
        now = trio.current_time()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + self._interval
        logger.warning(event, left_out=self._left_out, **fields)
        self._left_out = 0


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
    and ``MAX_PUSH_BACKLOG_BYTES`` queued, and is told how many were dropped
    beyond that. The queue is a plain deque the connection owns: ``close``
    empties it, so a subscriber that leaves takes its backlog with it.
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
        self.watching = False  # a task checks for the peer's hang-up while requests wait
        self.gone = False  # the peer closed while a request waited
        self._sending = False
        self._sent: trio.Event | None = None
        self._pushes: deque[bytes] = deque()  # encoded notifications not yet sent
        self._push_bytes = 0  # their length in all
        self._pusher = False  # the task that sends them has started
        self._pushed: trio.Event | None = None  # set when the idle pusher has work
        self._push_closed = False
        self._dropped = 0
        self.on_drop: Callable[[], None] | None = None  # counts a dropped notification
        # Over a connection cap, or not allowed: the reason (a metric label),
        # and the message of the FULL its requests get (None: the dispatcher's
        # FORBIDDEN).
        self.refused: str | None = None
        self.refusal: str | None = None
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

    def format_notification(self, method: str, params: list[Any]) -> bytes:
        """A notification as this session's protocol frames it: msgpack
        ``[2, method, params]``, or one JSON line in a text session."""
        if self.lines is not None:
            return format_notification(method, params)
        return encode_notification(method, params)

    async def send(self, data: bytes | bytearray) -> None:
        """Write ``data`` whole, after any other task's write in progress.

        The one way bytes reach the client: answers, answers that waited,
        pushed notifications, in either protocol."""
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

    # -- the Session interface (wksd.session.Session) -------------------------
    def push(self, method: str, params: list[Any]) -> None:
        if self._push_closed or (not self._pusher and (self.tasks is None or self.ended)):
            return
        queue = self._pushes
        if len(queue) >= MAX_PUSH_BACKLOG:
            self._drop_push()
            return
        data = self.format_notification(method, params)
        if queue and self._push_bytes + len(data) > MAX_PUSH_BACKLOG_BYTES:
            self._drop_push()
            return
        queue.append(data)
        self._push_bytes += len(data)
        if not self._pusher:
            assert self.tasks is not None
            self._pusher = True
            self.tasks.start_soon(self._send_pushes)
        elif self._pushed is not None:
            self._pushed.set()

    def _drop_push(self) -> None:
        """The client is too far behind: count the notification, do not queue it."""
        self._dropped += 1
        if self.on_drop is not None:
            self.on_drop()

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(callback)

    def stop_pushing(self) -> None:
        """No more notifications: the conversation is over (what is queued still goes)."""
        self.ended = True
        self._push_closed = True
        if self._pushed is not None:
            self._pushed.set()

    async def _send_pushes(self) -> None:
        queue = self._pushes
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while queue or not self._push_closed:
                if not queue:
                    self._pushed = trio.Event()
                    await self._pushed.wait()
                    self._pushed = None
                    continue
                data = queue.popleft()
                self._push_bytes -= len(data)
                await self.send(data)
                del data  # not held while the next wait blocks
                if self._dropped and not queue:
                    dropped, self._dropped = self._dropped, 0
                    await self.send(self.format_notification("workflow.events_dropped", [dropped]))

    async def close(self) -> None:
        """Run the close callbacks (release keepalive locks, ...), then close."""
        self._push_closed = True
        self._pushes.clear()  # the backlog of a client that left goes with it
        self._push_bytes = 0
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


class _PeerGone(trio.BrokenResourceError):
    """The peer closed while one of its requests waited: nobody to answer."""


class Server:
    def __init__(
        self,
        dispatcher: Dispatcher,
        policy: AccessPolicy,
        metrics: Metrics,
        *,
        max_message_bytes: int,
        max_connections: int = 4096,
        max_connections_per_uid: int = 1024,
    ) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self._metrics = metrics
        self._max_message_bytes = max_message_bytes
        self._max_connections = max_connections
        self._max_per_uid = max_connections_per_uid
        self._connections: set[_Connection] = set()
        self._admitted = 0  # connections served, counted against the caps
        self._per_uid: dict[int, int] = {}  # the same, by peer uid
        self._refusing = 0  # connections being told they are refused
        self._warnings: dict[str, _Throttle] = {}
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
        self._check_fd_limit()
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accepting:
                task_status.started()
                while True:
                    sock = await accept(listener, self._accept_failed)
                    # Known to drain() from the accept on, before its task runs.
                    connection = self._open(sock)
                    if connection is not None:
                        connections.start_soon(self._handle, connection)

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

    def _open(self, sock: stdlib_socket.socket) -> _Connection | None:
        """Register an accepted connection (drained at once if a drain has begun);
        None if it was closed at once, too many being refused already."""
        try:
            peer = peer_credentials(sock)
        except OSError:
            peer = None
        self._metrics.connections_total.inc()
        connection = _Connection(SocketIO(sock), peer, self._policy)
        connection.on_drop = self._metrics.pushes_dropped.inc
        refused = self._refusal(connection)
        if refused is None:
            assert peer is not None  # allowed peers have credentials
            self._admitted += 1
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        else:
            reason, message = refused
            if self._refusing >= MAX_REFUSING:
                self._metrics.connections_refused.labels("busy").inc()
                self._warn("busy", "connection closed unanswered: too many being refused")
                sock.close()
                return None
            self._metrics.connections_refused.labels(reason).inc()
            self._warn(
                reason,
                "peer not allowed" if message is None else "connection refused",
                connection.log,
                peer_gid=peer.gid if peer else None,
                reason=message or "not on the allow-lists",
            )
            self._refusing += 1
            connection.refused, connection.refusal = reason, message
        self._connections.add(connection)
        self._idle = trio.Event() if len(self._connections) == 1 else self._idle
        self._metrics.connections.inc()
        if self._draining:
            connection.drain()
        return connection

    def _refusal(self, connection: _Connection) -> tuple[str, str | None] | None:
        """Why ``connection`` is not served: a reason (for the metric) and the
        FULL message its requests get (None: FORBIDDEN); None if it is served."""
        peer = connection.peer
        if peer is None or not connection.allowed:
            return "forbidden", None
        extra = ADMIN_RESERVE if connection.admin else 0
        if self._admitted >= self._max_connections + extra:
            return "total", (
                f"wksd has {self._admitted} connections open, its limit "
                "(WKSD_MAX_CONNECTIONS); close some or try again later"
            )
        if self._per_uid.get(peer.uid, 0) >= self._max_per_uid + extra:
            return "per_uid", (
                f"uid {peer.uid} has {self._per_uid[peer.uid]} connections open to wksd, "
                "the limit for one uid (WKSD_MAX_CONNECTIONS_PER_UID); close some"
            )
        return None

    def _release(self, connection: _Connection) -> None:
        """Uncount a connection that has closed."""
        if connection.refused is not None:
            self._refusing -= 1
            return
        assert connection.peer is not None
        uid = connection.peer.uid
        self._admitted -= 1
        left = self._per_uid[uid] - 1
        if left:
            self._per_uid[uid] = left
        else:
            del self._per_uid[uid]

    async def _handle(self, connection: _Connection) -> None:
        stream = connection.stream
        try:
            try:
                async with trio.open_nursery() as tasks:
                    connection.tasks = tasks
                    try:
                        if connection.refused is not None:
                            await self._refuse(connection)
                        else:
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
            self._release(connection)
            self._metrics.connections.dec()
            if not self._connections:
                self._idle.set()
            stream.close()

    async def _refuse(self, connection: _Connection) -> None:
        """Answer the requests of a refused connection's first read (FULL or
        FORBIDDEN, in its protocol), then end it: it is told why, and its fd
        is not held."""
        with connection.scope, trio.move_on_after(REFUSAL_GRACE):
            if not connection.draining:
                await self._feed(connection, await connection.receive())
        connection.ended = True

    def _warn(self, kind: str, event: str, logger: Any = log, **fields: Any) -> None:
        throttle = self._warnings.get(kind)
        if throttle is None:
            throttle = self._warnings[kind] = _Throttle(WARNING_INTERVAL)
        throttle.warn(logger, event, **fields)

    def _accept_failed(self, exc: OSError) -> None:
        """accept() ran out of fds or memory; it retries (``wksd.sockio.accept``)."""
        self._metrics.accept_errors.inc()
        self._warn(
            "accept",
            "cannot accept connections: " + os.strerror(exc.errno or 0),
            errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            connections=len(self._connections),
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )

    def _check_fd_limit(self) -> None:
        """Make sure the fd limit leaves room for the connection caps: raise the
        soft limit if it is short (systemd's unit sets LimitNOFILE= instead), or
        warn, since accept() would fail with EMFILE before a cap is reached."""
        needed = self._max_connections + ADMIN_RESERVE + MAX_REFUSING + OWN_FDS
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return
        if hard == resource.RLIM_INFINITY or hard >= needed:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            except (OSError, ValueError):
                pass  # e.g. SystemCallFilter=~@resources: EPERM
            else:
                log.info("raised the fd limit for the connection caps", fd_limit=needed)
                return
        log.warning(
            "fd limit below what the connection caps need; raise LimitNOFILE= or "
            "lower WKSD_MAX_CONNECTIONS",
            fd_limit=soft,
            needed=needed,
            max_connections=self._max_connections,
        )

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
        if connection.refusal is not None:  # over a connection cap (Server._refusal)
            raise Full(connection.refusal)
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
            if not is_binary_start(data[0]):
                # Neither a line nor a msgpack-RPC message (DESIGN 2.2).
                await self._protocol_error(
                    connection, bytearray(), f"undecodable first byte 0x{data[0]:02x}"
                )
                return False
            connection.decoder = Decoder(self._max_message_bytes)
        return await self._answer(connection, data)

    async def _protocol_error(self, connection: _Connection, out: bytearray, reason: str) -> None:
        """Send ``out`` and a ``protocol_error`` notification; the stream is over."""
        self._metrics.protocol_errors.inc()
        connection.log.info("closing on protocol error", reason=reason)
        out += encode_notification("protocol_error", [reason])
        connection.ended = True
        await connection.send(out)

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
                await self._protocol_error(connection, out, str(exc))
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
                        out += self._response(connection, event.msgid, result)
            elif isinstance(event, Notification):
                await self._apply_notification(connection, event)
            elif isinstance(event, Invalid):
                out += encode_response(event.msgid, BadRequest(event.reason).to_wire(), None)
            else:  # a response: the daemon sends no requests, so none is expected
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

    async def _apply_notification(self, connection: _Connection, event: Notification) -> None:
        """A client's notification: applied in order, never answered (DESIGN 2.1).

        One that fails is counted and logged at debug level. One that would
        wait (a lock with ``wait``) is applied without waiting: nobody hears
        its answer, so a queued waiter would only hold the queue up.
        """
        try:
            result = await self._call(connection, event.method, event.params)
        except RemoteError as exc:
            reason = exc.code
        else:
            if not isinstance(result, Later):
                return
            with trio.CancelScope() as scope:
                scope.cancel()  # the wait's cleanup runs; a grant made at once stands
                with contextlib.suppress(RemoteError):
                    await result.wait()
            if not scope.cancelled_caught:
                return
            reason = "WAIT"
        self._metrics.notifications_dropped.labels(reason).inc()
        connection.log.debug(
            "client notification not applied", method=event.method[:100], reason=reason
        )

    def _response(self, connection: _Connection, msgid: int, result: Any) -> bytes:
        """The response bytes; an INTERNAL error for a result msgpack cannot hold
        (an integer over 64 bits, nesting beyond msgpack's limit, from stored data)."""
        try:
            return encode_response(msgid, None, result)
        except (TypeError, ValueError, OverflowError) as exc:
            connection.log.warning("answer cannot be encoded", error=type(exc).__name__)
            error = InternalError(f"the answer cannot be encoded in msgpack: {exc}"[:200])
            return encode_response(msgid, error.to_wire(), None)

    async def _wait_for(self, connection: _Connection, later: Later) -> tuple[Any, bool]:
        """What ``later`` answers, and whether it may need revoking.

        A drain cuts the wait short with ``give_up()``. A peer that closes
        meanwhile (``_watch_peer``) ends it with ``_PeerGone``; a result that
        came back for it anyway is revoked first.
        """
        scope = trio.CancelScope()
        if connection.draining:
            scope.cancel()
        connection.laters.add(scope)
        if not connection.watching and connection.tasks is not None:
            connection.watching = True
            connection.tasks.start_soon(self._watch_peer, connection)
        try:
            with scope:
                result = await later.wait()
        finally:
            connection.laters.discard(scope)
        if scope.cancelled_caught:
            if connection.gone:
                raise _PeerGone("the peer closed while its request waited")
            return later.give_up(), False
        if connection.gone:
            await self._revoke(connection, later, result)
            raise _PeerGone("the peer closed while its request waited")
        return result, True

    async def _watch_peer(self, connection: _Connection) -> None:
        """While requests of ``connection`` wait: cancel them once its peer has
        closed (not merely half-closed, like socat at the end of its input)."""
        try:
            while connection.laters and not connection.gone:
                if connection.peer_gone():
                    connection.gone = True
                    self._metrics.waits_abandoned.inc(len(connection.laters))
                    connection.log.debug("peer closed during a wait", waits=len(connection.laters))
                    for scope in connection.laters:
                        scope.cancel()
                    return
                await trio.sleep(PEER_CHECK_INTERVAL)
        finally:
            connection.watching = False

    async def _revoke(self, connection: _Connection, later: Later, result: Any) -> None:
        """Undo what an undeliverable answer granted (a lock, see ``Later``)."""
        if later.revoke is None or result is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_CALLBACK_TIMEOUT):
            try:
                await later.revoke(result)
            except Exception:
                connection.log.exception("revoking an undelivered answer failed")

    async def _deliver(
        self, connection: _Connection, data: bytes | bytearray, later: Later, result: Any
    ) -> None:
        """Send an answer that waited; revoke what it grants if it cannot be sent."""
        delivered = False
        try:
            await connection.send(data)
            delivered = True
        finally:
            if not delivered:
                await self._revoke(connection, later, result)

    async def _answer_later(self, connection: _Connection, msgid: int, later: Later) -> None:
        """Answer a request that waits (see ``Later``), when it is ready."""
        try:
            result, revocable = await self._wait_for(connection, later)
        except _PeerGone:
            return  # nobody to answer; the connection's task sees its end
        except RemoteError as exc:
            answer, result, revocable = encode_response(msgid, exc.to_wire(), None), None, False
        else:
            answer = self._response(connection, msgid, result)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # A client that hung up needs no answer, but gets nothing it was granted.
            await self._deliver(connection, answer, later, result if revocable else None)

    async def _answer_text(self, connection: _Connection, data: bytes) -> bool:
        """Answer every line complete in ``data`` (b"": the unterminated rest too);
        False once the session is over."""
        lines = connection.lines
        assert lines is not None
        lines.receive_data(data)
        out = bytearray()
        while True:
            try:
                line = lines.next_line() if data else lines.rest()
            except RemoteError as exc:  # a line over the limit: cannot be framed further
                self._metrics.protocol_errors.inc()
                out += format_error(exc)
                connection.ended = True
                await connection.send(out)
                return False
            if line is None:
                break
            await self._answer_line(connection, line, out)
            if len(out) >= FLUSH_BYTES:
                await connection.send(out)
                out.clear()
        if out:
            await connection.send(out)
        return bool(data)

    async def _answer_line(self, connection: _Connection, line: bytes, out: bytearray) -> None:
        """Append the answer to one line to ``out`` (nothing for a blank line).

        A request that waits is answered in order: what ``out`` holds is sent
        first, then the wait's answer the moment it is ready (``_PeerGone``
        ends the session if the peer closes meanwhile).
        """
        try:
            parsed = parse_line(line)
            if parsed is None:
                return
            method, params = parsed
            result = await self._call(connection, method, params, lenient=True)
            if isinstance(result, Later):
                if out:
                    await connection.send(out)
                    out.clear()
                later = result
                result, revocable = await self._wait_for(connection, later)
                await self._deliver(
                    connection,
                    self._text_answer(connection, method, result),
                    later,
                    result if revocable else None,
                )
                return
        except RemoteError as exc:
            out += format_error(exc)
            return
        out += self._text_answer(connection, method, result)

    def _text_answer(self, connection: _Connection, method: str, result: Any) -> bytes:
        try:
            return format_result(method, result)
        except (TypeError, ValueError, RecursionError) as exc:
            connection.log.warning("answer cannot be encoded", error=type(exc).__name__)
            return format_error(InternalError(f"the answer cannot be encoded: {exc}"[:200]))
