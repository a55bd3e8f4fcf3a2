"""The blocking client: one Unix-socket connection, one request at a time.

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
import functools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from . import _calls
from ._calls import CACHE_TTL, LEASE_TTL, LOCK_TTL, Call
from ._held import HeldLocks, OnLost, fire, lock_lost
from ._paths import resolve_socket_path
from ._types import LockResult, WorkflowEvent
from .errors import (
    ConnectionLost,
    DaemonUnavailable,
    LockHeld,
    LockLost,
    ProtocolError,
    RequestTimeout,
    WksError,
    error_from_wire,
)
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MSGID,
    NEED_DATA,
    Decoder,
    Notification,
    Response,
    encode_request,
)

__all__ = ["Client", "WorkflowSubscription"]

P = ParamSpec("P")
T = TypeVar("T")

#: Bytes asked of the socket per read; responses are usually far smaller.
_READ_CHUNK = 65536
#: Notifications after which the daemon closes the connection.
_GOODBYES = frozenset({"closing", "protocol_error"})


def _method(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """Make a client method that runs the ``Call`` that ``build`` describes."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(build(*args, **kwargs))

    functools.update_wrapper(method, build)
    return method


class Client:
    """Blocking client for wksd. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.path = resolve_socket_path(path)
        self.timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._sock: socket.socket | None = None
        self._decoder = Decoder(max_message_bytes)
        self._msgid = 0
        self._closing = False
        self._lock = threading.Lock()
        self._held = HeldLocks()  # the keepalive locks of the current connection
        self._lost: list[LockResult] = []  # lost, their callbacks not yet called

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; the daemon releases its keepalive locks (not a loss)."""
        with self._lock:
            self._held.clear()
            self._drop()

    def call(self, method: str, /, *params: Any) -> Any:
        """Call any method with positional params; the raw result."""
        return self._run(Call(method, list(params)))

    # -- the methods of DESIGN section 3.4 -------------------------------
    ping = _method(_calls.ping)
    health = _method(_calls.health)
    metrics = _method(_calls.metrics)
    set_session = _method(_calls.set_session)
    get_session = _method(_calls.get_session)
    delete_session = _method(_calls.delete_session)
    touch_session = _method(_calls.touch_session)
    cache_api_response = _method(_calls.cache_api_response)
    get_cached_api_response = _method(_calls.get_cached_api_response)
    delete_cached_api_response = _method(_calls.delete_cached_api_response)
    start_workflow_tracking = _method(_calls.start_workflow_tracking)
    update_workflow_progress = _method(_calls.update_workflow_progress)
    complete_workflow_tracking = _method(_calls.complete_workflow_tracking)
    fetch_workflow_state = _method(_calls.fetch_workflow_state)
    active_workflows = _method(_calls.active_workflows)
    active_workflows_detailed = _method(_calls.active_workflows_detailed)
    workflow_stats = _method(_calls.workflow_stats)
    workflow_events = _method(_calls.workflow_events)
    cleanup_workflows = _method(_calls.cleanup_workflows)
    lock_workflow_execution = _method(_calls.lock_workflow_execution)
    extend_workflow_lock = _method(_calls.extend_workflow_lock)
    is_workflow_locked = _method(_calls.is_workflow_locked)

    def acquire_lock(
        self,
        execution_id: str,
        worker_id: str,
        ttl: float = LOCK_TTL,
        keepalive: bool = False,
        wait: float = 0,
        *,
        on_lost: OnLost | None = None,
    ) -> LockResult:
        """Take the execution lock; the result carries the fencing token.

        ``keepalive``: the daemon extends the lock while this connection is
        open and releases it when the connection closes; the result's
        ``lost`` then says whether it was lost meanwhile, and ``on_lost(lock)``
        is called when that is learnt (see the module doc for when). ``wait``:
        seconds to queue for the lock if another worker holds it.
        """
        call = _calls.acquire_lock(execution_id, worker_id, ttl, keepalive, wait)

        def watch(lock: LockResult) -> None:
            if keepalive and lock:
                self._held.add(execution_id, worker_id, lock, on_lost, self._read_arrived)

        return self._run(call, watch)

    def unlock_workflow_execution(self, execution_id: str, worker_id: str) -> bool:
        """Release the lock if this worker holds it; True when it was released."""
        return self._run(
            _calls.unlock_workflow_execution(execution_id, worker_id),
            lambda _: self._held.forget(execution_id, worker_id),
        )

    @contextmanager
    def execute_with_lock(
        self,
        execution_id: str,
        worker_id: str,
        ttl: float = LOCK_TTL,
        wait: float = 0,
        *,
        on_lost: OnLost | None = None,
    ) -> Iterator[LockResult]:
        """Hold the execution lock for the ``with`` block, then release it.

        The lock is kept alive by the daemon for as long as this client's
        connection is open (and released if the process dies). ``wait``: seconds
        to queue for it. Raises ``LockHeld`` when another worker holds it.

        The block can check ``lock.lost`` and be told through ``on_lost(lock)``
        if the lock ends before the block does (see the module doc for when
        the sync client learns it). The lock is released however the block
        ends. If the block succeeded, ``LockLost`` is raised when the lock was
        lost or the release found another owner or no lock, else a failure to
        release is raised. If the block raised, its own exception is the one
        that propagates, never hidden: a lost lock adds a note to it.
        """
        lock = self.acquire_lock(
            execution_id, worker_id, ttl, keepalive=True, wait=wait, on_lost=on_lost
        )
        if not lock:
            raise LockHeld(f"{execution_id} is locked by {lock.worker_id}", lock.worker_id)
        try:
            yield lock
        except BaseException as exc:
            status = None
            with contextlib.suppress(WksError):  # the block's own exception is the one to see
                status = self._release(execution_id, worker_id)
            lost = lock_lost(execution_id, worker_id, lock, status)
            if lost is not None:
                exc.add_note(str(lost))
            raise
        try:
            status = self._release(execution_id, worker_id)
        except WksError as exc:
            if lock.lost_reason is not None:
                raise LockLost(execution_id, worker_id, lock.lost_reason) from exc
            raise
        lost = lock_lost(execution_id, worker_id, lock, status)
        if lost is not None:
            raise lost

    def _release(self, execution_id: str, worker_id: str) -> str:
        """Release the lock; its status (the pushes that came first are read first)."""
        try:
            return self._run(_calls.release_lock(execution_id, worker_id))
        finally:  # released or not, the block is over: nothing more to tell
            with self._lock:
                self._held.forget(execution_id, worker_id)

    def get_or_compute(
        self,
        key: str,
        fn: Callable[[], Any],
        ttl: float = CACHE_TTL,
        *,
        stale_ttl: float = 0,
        jitter: float = 0,
        lease_ttl: float = LEASE_TTL,
        wait: float = LEASE_TTL,
    ) -> Any:
        """The cached value of ``key``, computed by ``fn()`` if missing: single-flight.

        When the value is missing, one caller on the host (and, through a short
        Redis lock, one in the cluster) runs ``fn`` while the others wait up to
        ``wait`` seconds for its result. If ``fn`` raises, that caller gets its
        exception, every waiter gets ``ComputeFailed``, and nothing is cached.
        ``stale_ttl``: serve the value that much longer while one caller
        refreshes it. ``jitter``: spread expiry by up to that fraction of ``ttl``.
        """
        done, found = _calls.lease_outcome(key, self._run(_calls.cache_lease(key, lease_ttl, wait)))
        if done:
            return found
        try:
            value = fn()
        except BaseException as exc:
            with contextlib.suppress(WksError):
                self._run(_calls.cache_abandon(key, found, _calls.describe_failure(exc)))
            raise
        self._run(_calls.cache_fill(key, found, value, _calls.jittered(ttl, jitter), stale_ttl))
        return value

    def subscribe_workflows(self, execution_id: str | None = None) -> WorkflowSubscription:
        """Live workflow events (all executions, or one), on a connection of its own.

        Iterate it for ``WorkflowEvent``s as they happen, through every daemon
        sharing the Redis; close it (or leave its ``with`` block) to stop.
        """
        return WorkflowSubscription(self.path, self.timeout, execution_id)

    # -- transport --------------------------------------------------------
    def _run(self, call: Call[T], then: Callable[[T], object] | None = None) -> T:
        """Make the call; ``then(value)`` runs under the client's lock, before
        anything else can be read."""
        lost: list[LockResult] = []
        try:
            with self._lock:
                try:
                    value = call.convert(
                        self._roundtrip(call.method, call.params, call.extra_timeout)
                    )
                    if then is not None:
                        then(value)
                finally:
                    lost, self._lost = self._lost, []
        finally:
            fire(lost)
        return value

    def _read_arrived(self) -> None:
        """Apply the notifications that have arrived, without waiting for any.

        For ``LockResult.lost``; skipped while another thread is in a call
        (that call reads them).
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            sock = self._sock
            while sock is not None:
                try:
                    data = sock.recv(_READ_CHUNK, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._drop()
                    break
                if not data:  # the daemon closed the connection
                    self._drop()
                    break
                self._decoder.receive_data(data)
            if self._sock is not None and self._closing_seen():
                self._drop()
        finally:
            lost, self._lost = self._lost, []
            self._lock.release()
            fire(lost)

    def _roundtrip(self, method: str, params: list[Any], extra_timeout: float = 0.0) -> Any:
        self._msgid = msgid = (self._msgid + 1) & MAX_MSGID
        payload = encode_request(msgid, method, params)
        deadline = time.monotonic() + self.timeout + extra_timeout
        if self._sock is not None and (self._closing or self._closing_seen()):
            self._drop()
        if self._sock is None:
            self._connect()
        try:
            self._send(payload)
        except BlockingIOError:
            self._drop()  # the daemon reads nothing: part of the request may be out
            raise RequestTimeout(f"wksd took no request within {self.timeout} s") from None
        except OSError:
            # The old connection is dead (the daemon restarted); nothing was
            # read from it, so sending again on a new one is safe.
            self._drop()
            self._connect()
            try:
                self._send(payload)
            except OSError as exc:
                self._drop()
                raise ConnectionLost(f"sending to {self.path} failed: {exc}") from exc
        return self._wait_for(msgid, deadline)

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(
                f"cannot connect to wksd at {self.path}: {exc.strerror or exc}"
            ) from exc
        # From here on a blocking socket with the timeout kept by the kernel
        # (SO_RCVTIMEO/SO_SNDTIMEO): one system call per recv, where Python's
        # own timeout polls first, which costs a good part of a round trip.
        sock.settimeout(None)
        seconds = int(self.timeout)
        timeval = struct.pack("ll", seconds, int((self.timeout - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._sock = sock
        self._decoder = Decoder(self._max_message_bytes)
        self._closing = False

    def _closing_seen(self) -> bool:
        """Whether the daemon's closing notice is among the bytes already read.

        The other notifications among them are applied (``lock.lost``); stale
        answers to calls that timed out are dropped.
        """
        while True:
            try:
                event = self._decoder.next_event()
            except ProtocolError:
                return True
            if event is NEED_DATA:
                return False
            if isinstance(event, Notification):
                if event.method in _GOODBYES:
                    return True
                self._notified(event)

    def _notified(self, event: Notification) -> None:
        if event.method == "lock.lost":
            self._lost += self._held.pushed(event.params)

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(payload, socket.MSG_NOSIGNAL)

    def _wait_for(self, msgid: int, deadline: float) -> Any:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                event = self._decoder.next_event()
            except ProtocolError:
                self._drop()
                raise
            if event is NEED_DATA:
                try:
                    data = sock.recv(_READ_CHUNK)
                except BlockingIOError:  # SO_RCVTIMEO ran out
                    if time.monotonic() < deadline:
                        continue  # a large answer still arriving
                    raise RequestTimeout(f"no answer from wksd within {self.timeout} s") from None
                except OSError as exc:
                    self._drop()
                    raise ConnectionLost(f"connection to wksd broke: {exc}") from exc
                if not data:
                    self._drop()
                    raise ConnectionLost("wksd closed the connection before answering")
                self._decoder.receive_data(data)
            elif isinstance(event, Response):
                # Answers to earlier calls that timed out are skipped.
                if event.msgid == msgid or event.msgid is None:
                    if event.error is not None:
                        raise error_from_wire(event.error)
                    return event.result
            elif isinstance(event, Notification):
                if event.method == "protocol_error":
                    self._drop()
                    raise ProtocolError(f"wksd closed the connection: {event.params}")
                if event.method == "closing":
                    self._closing = True
                self._notified(event)
            else:  # Invalid, or a Request: the daemon never sends those
                self._drop()
                raise ProtocolError(f"unexpected message from wksd: {event}")

    def _next_notification(self) -> tuple[str, list[Any]]:
        """Block until the daemon pushes a notification; (method, params).

        A ``closing`` notice or the end of the connection raises
        ``ConnectionLost`` (the subscriber then connects afresh).
        """
        with self._lock:
            while True:
                sock = self._sock
                if sock is None:
                    raise ConnectionLost("not connected")
                event = self._decoder.next_event()
                if event is NEED_DATA:
                    try:
                        data = sock.recv(_READ_CHUNK)
                    except BlockingIOError:  # SO_RCVTIMEO: nothing yet, keep waiting
                        continue
                    except OSError as exc:
                        raise ConnectionLost(f"connection to wksd broke: {exc}") from exc
                    if not data:
                        raise ConnectionLost("wksd closed the connection")
                    self._decoder.receive_data(data)
                elif isinstance(event, Notification):
                    if event.method in _GOODBYES:
                        raise ConnectionLost(f"wksd is closing the connection ({event.method})")
                    return event.method, event.params

    def _drop(self) -> None:
        """Close the connection; the keepalive locks it kept are lost with it."""
        self._lost += self._held.disconnected()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WorkflowSubscription:
    """An iterator of ``WorkflowEvent``s, on a connection of its own.

    ``dropped`` counts events the daemon dropped because this subscriber fell
    more than a thousand behind (catch up with ``workflow_events``). If the
    daemon restarts, the subscription connects and subscribes again by itself
    (events in between are missed: ``resubscribed`` counts those moments);
    ``DaemonUnavailable`` is raised if it cannot.
    """

    def __init__(self, path: str, timeout: float, execution_id: str | None) -> None:
        self.execution_id = execution_id
        self.dropped = 0
        self.resubscribed = 0
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
            if method == "workflow.event":
                self._pending.append(WorkflowEvent.from_wire(params[0]))
            elif method == "workflow.events_dropped":
                self.dropped += int(params[0])
        return self._pending.pop(0)

    def close(self) -> None:
        self._client.close()

    def _subscribe(self) -> None:
        self._client.call("workflow.subscribe", self.execution_id)
