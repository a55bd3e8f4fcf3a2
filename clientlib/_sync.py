"""The blocking client: one Unix-socket connection, one request at a time.

A ``Client`` is a thin shell over ``clientlib._connection.ClientConnection``,
which holds the connection's rules (msgids, the closing notice, what may be
sent again, lock pushes); this module only moves bytes, and ``_Socket`` is
its one piece of code that touches the OS, translating each OS error once.
The methods are declared in ``clientlib._api``.

A ``Client`` connects lazily, on the first call, and reconnects by itself: if
the daemon restarted since the last call, sending on the old connection fails
before the daemon could have read anything, so the request is sent once more
on a fresh connection. A connection that breaks *after* a request went out
raises ``ConnectionLost`` instead, because the request may have been applied.
A daemon that is shutting down says so (the ``closing`` notification, sent
with its last answers); the client then connects afresh before its next
request instead of sending it into a closing connection.

A ``Client`` may be shared between threads; calls are serialised by a lock.

Lost locks. A sync client reads its socket only when it is used, so it learns
that a keepalive lock was lost (the daemon's ``lock.lost`` push, or the
connection ending; see ``clientlib._held``) at one of these moments, and no
other: during any call on the client, from any thread (the pushes that
arrived before the call's answer are read first); when ``LockResult.lost`` is
read (a non-blocking read of whatever has arrived, skipped if another thread
is in a call, which reads it anyway); and so at the latest during the
release that ends ``execute_with_lock``. The ``on_lost`` callback runs then,
in that thread, after the call's answer is read and outside the client's
lock, so it may call the client.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

from ._api import ClientAPI
from ._calls import Call
from ._connection import Answer, ClientConnection, Ended, Failure, LocksLost, Push
from ._flows import Computation, Feed, LockBlock
from ._held import fire
from ._types import LockResult, WorkflowEvent
from .errors import ConnectionLost, DaemonUnavailable, RequestTimeout, WksError
from .protocol import _NeedData

__all__ = ["Client", "WorkflowSubscription"]

T = TypeVar("T")

#: Bytes asked of the socket per read; responses are usually far smaller.
_READ_CHUNK: Final = 65536


class _OSErrors:
    """What an OS error of one socket operation becomes: the one place this
    transport translates them, as httpcore's ``map_exceptions`` does.

    Any ``OSError`` raises ``error(f"{doing}: {why}")``; with ``timed_out``, a
    timeout of the kernel's (``SO_RCVTIMEO`` or ``SO_SNDTIMEO`` ran out, which
    Python raises as ``BlockingIOError``) raises ``RequestTimeout(timed_out)``
    instead. The OS error is the cause. (A class, made once per socket, not a
    generator: it is entered twice for every request.)
    """

    __slots__ = ("_doing", "_error", "_timed_out")

    def __init__(self, error: type[WksError], doing: str, timed_out: str | None = None) -> None:
        self._error = error
        self._doing = doing
        self._timed_out = timed_out

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, BlockingIOError) and self._timed_out is not None:
            raise RequestTimeout(self._timed_out) from exc
        if isinstance(exc, OSError):
            raise self._error(f"{self._doing}: {exc.strerror or exc}") from exc


class _Socket:
    """One blocking connection to the daemon's socket: all of this client's I/O."""

    def __init__(self, path: str, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _OSErrors(DaemonUnavailable, f"cannot connect to wksd at {path}"):
                sock.settimeout(timeout)
                sock.connect(path)
                # From here on a blocking socket with the timeout kept by the
                # kernel (SO_RCVTIMEO/SO_SNDTIMEO): one system call per recv,
                # where Python's own timeout polls first, which costs a good
                # part of a round trip.
                sock.settimeout(None)
                seconds = int(timeout)
                timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        took_none = f"wksd took no request within {timeout} s"
        self._sending = _OSErrors(ConnectionLost, f"sending to {path} failed", took_none)
        no_answer = f"no answer from wksd within {timeout} s"
        self._receiving = _OSErrors(ConnectionLost, "connection to wksd broke", no_answer)
        self._peeking = _OSErrors(ConnectionLost, "connection to wksd broke")

    def send(self, data: bytes) -> None:
        """Write all of ``data``; ``RequestTimeout`` if the daemon reads none in time."""
        with self._sending:
            self._sock.sendall(data, socket.MSG_NOSIGNAL)

    def receive(self) -> bytes:
        """What arrives within the timeout (``b""``: the daemon closed its end)."""
        with self._receiving:
            return self._sock.recv(_READ_CHUNK)

    def receive_arrived(self) -> bytes | None:
        """What has arrived already, without waiting; None when nothing has."""
        with self._peeking:
            try:
                return self._sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None

    def close(self) -> None:
        self._sock.close()


class Client(ClientAPI):
    """Blocking client for wksd. Use as a context manager, or call ``close``."""

    def _prepare(self) -> None:
        self._lock = threading.Lock()
        self._socket: _Socket | None = None
        self._connection: ClientConnection | None = None  # with the socket, or neither
        self._lost: list[LockResult] = []  # lost, their callbacks not yet called

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the daemon releases its keepalive locks (not a loss)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
            self._drop()

    def subscribe_workflows(self, execution_id: str | None = None) -> WorkflowSubscription:
        """Live workflow events (all executions, or one), on a connection of its own.

        Iterate it for ``WorkflowEvent``s as they happen, through every daemon
        sharing the Redis; close it (or leave its ``with`` block) to stop.
        """
        return WorkflowSubscription(self.path, self.timeout, execution_id)

    # -- the runners of clientlib._api ------------------------------------------
    def _run(self, call: Call[T]) -> T:
        """Make the call; the lost locks learnt meanwhile are told after it."""
        lost: list[LockResult] = []
        try:
            with self._lock:
                try:
                    value: T = self._roundtrip(call)
                finally:
                    lost, self._lost = self._lost, []
        finally:
            fire(lost)
        return value

    @contextmanager
    def _hold(self, block: LockBlock) -> Iterator[LockResult]:
        lock = block.granted(self._run(block.acquire))
        try:
            yield lock
        except BaseException as exc:
            block.ended(lock, self._release(block), exc)
            raise
        block.ended(lock, self._release(block))

    def _release(self, block: LockBlock) -> str | WksError:
        """Release the block's lock: its status (the pushes that came first
        are read first), or why the release failed."""
        try:
            return self._run(block.release)
        except WksError as exc:
            return exc
        finally:  # released or not, the block is over: nothing more to tell
            with self._lock:
                if self._connection is not None:
                    self._connection.forget(block.execution_id, block.worker_id)

    def _compute(self, job: Computation) -> Any:
        done, found = job.outcome(self._run(job.lease))
        if done:
            return found
        try:
            value = job.fn()
        except BaseException as exc:
            with contextlib.suppress(WksError):
                self._run(job.abandon(found, exc))
            raise
        self._run(job.fill(found, value))
        return value

    # -- transport --------------------------------------------------------
    def _roundtrip(self, call: Call[T]) -> T:
        """Send ``call`` (once more on a fresh connection if that is safe) and
        wait for its answer; under the client's lock."""
        deadline = time.monotonic() + self.timeout + call.extra_timeout
        attempt = 1
        while True:
            connection, sock = self._connected()
            msgid, data = connection.send_request(call, attempt)
            try:
                sock.send(data)
            except RequestTimeout:  # part of the request may be out: the stream is garbled
                connection.abandon(msgid)
                self._drop()
                raise
            except ConnectionLost as exc:
                resend = connection.write_failed(msgid, str(exc))
                self._drop()
                if not resend:
                    raise
                attempt += 1
                continue
            value: T = self._wait_for(connection, sock, msgid, deadline)
            return value

    def _connected(self) -> tuple[ClientConnection, _Socket]:
        """The connection to send on: the current one unless it takes no more
        requests (what has arrived is applied first), else a new one."""
        if self._connection is not None:
            self._apply(self._connection)
            if not self._connection.can_send:
                self._drop()
        if self._connection is None or self._socket is None:
            self._socket = _Socket(self.path, self.timeout)
            self._connection = ClientConnection(self._max_message_bytes, poll=self._read_arrived)
        return self._connection, self._socket

    def _wait_for(
        self, connection: ClientConnection, sock: _Socket, msgid: int, deadline: float
    ) -> Any:
        # Nothing already read can be its answer: the events before the send
        # were all taken (``_connected``), so each turn reads first.
        while True:
            try:
                connection.receive_data(sock.receive())
            except RequestTimeout:
                if time.monotonic() < deadline:
                    continue  # a large answer still arriving, or a wait at the daemon
                connection.abandon(msgid)  # its answer, if it comes, is dropped
                raise
            except ConnectionLost as exc:
                connection.broken(str(exc))
            while not isinstance(event := connection.next_event(), _NeedData):
                if isinstance(event, Answer | Failure) and event.msgid == msgid:
                    if connection.ended:  # what it kept is lost now, and told after the call
                        self._drop()
                    if isinstance(event, Failure):
                        raise event.error
                    return event.value
                if isinstance(event, LocksLost):
                    self._lost += event.locks
                elif isinstance(event, Ended):  # after the Failure of every request
                    self._drop()
                    raise ConnectionLost(str(event.error)) from event.error

    def _read_arrived(self) -> None:
        """Apply the notifications that have arrived, without waiting for any.

        For ``LockResult.lost``; skipped while another thread is in a call
        (that call reads them).
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            connection, sock = self._connection, self._socket
            if connection is not None and sock is not None:
                try:
                    while (data := sock.receive_arrived()) is not None:
                        connection.receive_data(data)
                        if not data:
                            break
                except ConnectionLost as exc:
                    connection.broken(str(exc))
                self._apply(connection)
                if not connection.can_send:  # closing, or over
                    self._drop()
        finally:
            lost, self._lost = self._lost, []
            self._lock.release()
            fire(lost)

    def _apply(self, connection: ClientConnection) -> None:
        """Take the events already read: the lost locks are noted (told after
        the call); pushes and the answers of calls that gave up go."""
        while not isinstance(event := connection.next_event(), _NeedData | Ended):
            if isinstance(event, LocksLost):
                self._lost += event.locks

    def _next_notification(self) -> tuple[str, list[Any]]:
        """Block until the daemon pushes a notification; (method, params).

        A ``closing`` notice or the end of the connection raises
        ``ConnectionLost`` (the subscriber then connects afresh).
        """
        with self._lock:
            connection, sock = self._connection, self._socket
            if connection is None or sock is None:
                raise ConnectionLost("not connected")
            while True:
                event = connection.next_event()
                if isinstance(event, _NeedData):
                    try:
                        connection.receive_data(sock.receive())
                    except RequestTimeout:  # nothing yet: keep waiting
                        continue
                    except ConnectionLost as exc:
                        connection.broken(str(exc))
                elif isinstance(event, Push):
                    return event.method, event.params
                elif isinstance(event, Ended):
                    raise ConnectionLost(f"wksd ended the connection: {event.error}")

    def _drop(self) -> None:
        """Close the connection; the keepalive locks it kept are lost with it."""
        connection, sock = self._connection, self._socket
        self._connection = self._socket = None
        if connection is not None:
            connection.broken("the connection was dropped")  # nothing if it had ended
            self._apply(connection)
        if sock is not None:
            sock.close()


class WorkflowSubscription(Feed):
    """An iterator of ``WorkflowEvent``s, on a connection of its own.

    ``DaemonUnavailable`` is raised if it cannot connect again after the
    daemon restarted (see ``Feed`` for ``dropped`` and ``resubscribed``).
    """

    def __init__(self, path: str, timeout: float, execution_id: str | None) -> None:
        super().__init__(execution_id)
        self._client = Client(path, timeout)
        self._pending: list[WorkflowEvent] = []
        self._subscribe()

    def __enter__(self) -> WorkflowSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> WorkflowSubscription:
        return self

    def __next__(self) -> WorkflowEvent:
        while not self._pending:
            try:
                method, params = self._client._next_notification()
            except ConnectionLost:
                self._client._drop()
                self.resubscribed += 1
                self._subscribe()
                continue
            event = self._event(method, params)
            if event is not None:
                self._pending.append(event)
        return self._pending.pop(0)

    def close(self) -> None:
        self._client.close()

    def _subscribe(self) -> None:
        self._client.call("workflow.subscribe", self.execution_id)
