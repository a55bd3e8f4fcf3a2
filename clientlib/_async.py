"""The async client: one connection shared by many tasks, on trio or asyncio.

Theory of operation: an ``AsyncClient`` is entered with ``async with``, which
opens an anyio task group that the client owns. The first call connects (as
the sync client does, lazily) and starts a reader task in that group. Any
number of tasks may then call at once over that one connection:

- each request gets a fresh msgid and a waiter registered under it, and is
  written whole under the connection's write lock, so requests never
  interleave on the wire;
- the reader feeds what arrives to the sans-IO ``Decoder`` and completes the
  waiter whose msgid a response names; a response nobody waits for any more
  (its call timed out or was cancelled) is dropped;
- each call waits at most ``timeout`` (plus ``Call.extra_timeout``, for a
  blocking acquire) and then raises ``RequestTimeout``.

Failure, as in the sync client: when a connection breaks, every call waiting
on it raises ``ConnectionLost`` (its request may have been applied), and the
next call connects afresh; a request whose write failed before anything could
be read is sent once more on a fresh connection. After the daemon's
``closing`` notice the connection takes no new requests: the outstanding
ones are still answered on it, new ones go to a new connection. A
``protocol_error`` notice, or bytes that do not decode, fail the waiting calls
with ``ProtocolError``.

Other notifications go to listeners registered with ``_listen`` (internal;
``subscribe_workflows`` is built on it); those nobody listens to are ignored.

Lost locks. Each connection keeps the keepalive locks granted on it
(``clientlib._held``), registered by the reader as it reads the grant, so no
push that follows can miss it. The reader marks a lock lost, and calls its
``on_lost`` callback (a plain function, run in the reader task: it must not
block; set an event or cancel a scope), the moment it reads the daemon's
``lock.lost`` push, or when the connection ends.

An ``AsyncClient`` belongs to the event loop it was entered in: share it
between the tasks of that loop, never between threads or loops.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

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

__all__ = ["AsyncClient"]

P = ParamSpec("P")
T = TypeVar("T")

#: Bytes asked of the socket per read; responses are usually far smaller.
_READ_CHUNK: Final = 65536
#: Connections a request is tried on: the current one and, when writing to it
#: failed before anything could be read (the daemon restarted), one fresh one.
_SEND_ATTEMPTS: Final = 2
#: Notifications a listener may have unread before further ones are dropped
#: for it: the daemon's own subscription backlog (docs/protocol-extensions.md).
_LISTEN_BUFFER: Final = 1000
#: Pseudo-notification delivered to its listeners when a connection ends
#: (params: [reason]); whatever the daemon tied to that connection (a
#: subscription, a keepalive lock) is gone. Never sent by the daemon.
_DISCONNECTED: Final = "clientlib.disconnected"

_ErrorFactory = Callable[[], WksError]
#: Run by the reader on a request's result as it reads it: (connection, result) -> value.
_OnAnswer = Callable[["_Connection", Any], Any]


def _method(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """Make an async client method that runs the ``Call`` that ``build`` describes."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(build(*args, **kwargs))

    functools.update_wrapper(method, build)
    return method


class _Waiter:
    """The answer slot of one request, filled by the reader task."""

    __slots__ = ("_done", "_error", "_on_answer", "_result")

    def __init__(self, on_answer: Callable[[Any], Any] | None = None) -> None:
        self._done = anyio.Event()
        self._result: Any = None
        self._error: WksError | None = None
        self._on_answer = on_answer

    def succeed(self, result: Any) -> None:
        if self._on_answer is None:
            self._result = result
        else:
            try:
                self._result = self._on_answer(result)
            except Exception as exc:  # a malformed answer: the call fails, not the reader
                self._error = ProtocolError(f"unexpected answer from wksd: {exc!r}")
        self._done.set()

    def fail(self, error: WksError) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class _NotSent(Exception):
    """No byte of the request can have been read: it may go on another connection."""


class _Connection:
    """One socket to the daemon, the calls waiting on it, and its reader's scope."""

    def __init__(
        self, stream: anyio.abc.ByteStream, max_message_bytes: int, write_timeout: float
    ) -> None:
        self.stream = stream
        #: Seconds a write may take before the daemon counts as not reading.
        self.write_timeout = write_timeout
        self.decoder = Decoder(max_message_bytes)
        self.pending: dict[int, _Waiter] = {}
        self.write_lock = anyio.Lock()
        #: The reader task runs in this scope; cancelling it ends the connection.
        self.scope = anyio.CancelScope()
        #: Set when the reader task has finished and the socket is closed.
        self.finished = anyio.Event()
        #: The daemon said it is shutting down: no new request goes out here.
        self.closing = False
        #: Broken or closed: nothing more goes out or comes in here.
        self.broken = False
        #: The keepalive locks granted on this connection.
        self.held = HeldLocks()

    @property
    def usable(self) -> bool:
        return not (self.closing or self.broken)

    def fail_all(self, make_error: _ErrorFactory) -> None:
        """Mark the connection dead and fail every call still waiting on it."""
        self.broken = True
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            waiter.fail(make_error())

    def abort(self, make_error: _ErrorFactory) -> None:
        """Fail the waiting calls and stop the reader (which closes the socket)."""
        self.fail_all(make_error)
        self.scope.cancel()

    async def send(self, payload: bytes) -> None:
        """Write one whole request; ``_NotSent`` if it may be retried elsewhere."""
        async with self.write_lock:
            if not self.usable:
                raise _NotSent("the connection is closing or closed")
            # Shielded: a caller cancelled half-way through a write would leave
            # a partial message that garbles every later request. The write
            # is bounded by the timeout instead.
            deadline = anyio.current_time() + self.write_timeout
            with anyio.CancelScope(shield=True, deadline=deadline) as scope:
                try:
                    await self.stream.send(payload)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    self.abort(partial(ConnectionLost, f"sending to wksd failed: {exc}"))
                    raise _NotSent(str(exc)) from exc
            if scope.cancelled_caught:
                self.abort(partial(ConnectionLost, "wksd stopped reading requests"))
                raise RequestTimeout(f"wksd took no request within {self.write_timeout} s")


class AsyncClient:
    """Async client for wksd, on anyio: works under trio and asyncio.

    Use it as ``async with AsyncClient() as client:``; it runs a reader task
    for as long as the block lasts. Every method of ``Client`` is here,
    awaitable, and tasks of the same event loop may call concurrently: their
    requests share one connection.
    """

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
        self._msgid = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._connect_lock: anyio.Lock | None = None
        self._connection: _Connection | None = None  # where new requests go
        self._connections: set[_Connection] = set()  # including closing ones
        # method -> (sender, tagged): a tagged listener gets (method, params)
        self._listeners: dict[str, list[tuple[MemoryObjectSendStream[Any], bool]]] = {}
        self._subscriptions: dict[str | None, int] = {}

    async def __aenter__(self) -> AsyncClient:
        if self._task_group is not None or self._closed:
            raise RuntimeError("an AsyncClient can be entered only once")
        self._connect_lock = anyio.Lock()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        task_group = self._task_group
        assert task_group is not None, "__aexit__ without __aenter__"
        try:
            await self.aclose()
        finally:
            exc = exc_info[1]
            if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
                suppress = await task_group.__aexit__(*exc_info)
            else:
                # The block raised. The readers are stopped and never raise,
                # so the group has nothing to add: leave the block's exception
                # as it is, not wrapped in an ExceptionGroup.
                await task_group.__aexit__(None, None, None)
                suppress = False
        return suppress

    async def aclose(self) -> None:
        """Close the connections; calls still waiting raise ``ConnectionLost``.

        The client cannot be used afterwards: later calls raise
        ``ConnectionLost`` too (a ``WksError``, so a release racing a shutdown
        never hides the error of an ``execute_with_lock`` block).
        """
        self._closed = True
        connections = list(self._connections)
        for connection in connections:
            connection.held.clear()  # released by the daemon, not lost
            connection.abort(partial(ConnectionLost, "the client was closed"))
        for senders in self._listeners.values():
            for sender, _ in senders:
                sender.close()
        self._listeners.clear()
        with anyio.CancelScope(shield=True):  # the readers end at once
            for connection in connections:
                await connection.finished.wait()

    async def call(self, method: str, /, *params: Any) -> Any:
        """Call any method with positional params; the raw result."""
        return await self._run(Call(method, list(params)))

    # -- the methods of DESIGN section 3.4, as Client has them --------------
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

    async def acquire_lock(
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
        ``lost`` turns true, and ``on_lost(lock)`` is called, as soon as the
        client reads that it was lost (see the module doc). ``wait``: seconds
        to queue for the lock if another worker holds it.
        """
        call = _calls.acquire_lock(execution_id, worker_id, ttl, keepalive, wait)

        def watch(connection: _Connection, result: Any) -> LockResult:
            lock = call.convert(result)
            if keepalive and lock:
                connection.held.add(execution_id, worker_id, lock, on_lost)
            return lock

        lock: LockResult = await self._roundtrip(
            call.method, call.params, call.extra_timeout, watch
        )
        return lock

    async def unlock_workflow_execution(self, execution_id: str, worker_id: str) -> bool:
        """Release the lock if this worker holds it; True when it was released."""
        released = await self._run(_calls.unlock_workflow_execution(execution_id, worker_id))
        self._forget(execution_id, worker_id)
        return released

    @asynccontextmanager
    async def execute_with_lock(
        self,
        execution_id: str,
        worker_id: str,
        ttl: float = LOCK_TTL,
        wait: float = 0,
        *,
        on_lost: OnLost | None = None,
    ) -> AsyncIterator[LockResult]:
        """Hold the execution lock for the ``async with`` block, then release it.

        The lock is kept alive by the daemon for as long as this client's
        connection is open (and released if the process dies). ``wait``:
        seconds to queue for it. Raises ``LockHeld`` when another worker holds
        it.

        ``lock.lost`` turns true, and ``on_lost(lock)`` is called, as soon as
        the client reads that the lock ended before the block did (pass
        ``on_lost=lambda _: scope.cancel()`` to stop the work at once). The
        lock is released however the block ends, cancellation included. If
        the block succeeded, ``LockLost`` is raised when the lock was lost or
        the release found another owner or no lock, else a failure to release
        is raised. If the block raised, its own exception propagates, never
        hidden: a lost lock adds a note to it.
        """
        lock = await self.acquire_lock(
            execution_id, worker_id, ttl, keepalive=True, wait=wait, on_lost=on_lost
        )
        if not lock:
            raise LockHeld(f"{execution_id} is locked by {lock.worker_id}", lock.worker_id)
        try:
            yield lock
        except BaseException as exc:
            status = None
            # Shielded, so a cancelled block still releases (bounded by the timeout).
            with anyio.CancelScope(shield=True), contextlib.suppress(WksError):
                status = await self._release(execution_id, worker_id)
            lost = lock_lost(execution_id, worker_id, lock, status)
            if lost is not None:
                exc.add_note(str(lost))
            raise
        try:
            with anyio.CancelScope(shield=True):
                status = await self._release(execution_id, worker_id)
        except WksError as exc:
            if lock.lost_reason is not None:
                raise LockLost(execution_id, worker_id, lock.lost_reason) from exc
            raise
        lost = lock_lost(execution_id, worker_id, lock, status)
        if lost is not None:
            raise lost

    async def _release(self, execution_id: str, worker_id: str) -> str:
        """Release the lock; its status."""
        try:
            return await self._run(_calls.release_lock(execution_id, worker_id))
        finally:  # released or not, the block is over: nothing more to tell
            self._forget(execution_id, worker_id)

    def _forget(self, execution_id: str, worker_id: str) -> None:
        """The worker released the lock: no connection watches it any more."""
        for connection in self._connections:
            connection.held.forget(execution_id, worker_id)

    async def get_or_compute(
        self,
        key: str,
        fn: Callable[[], Awaitable[Any]],
        ttl: float = CACHE_TTL,
        *,
        stale_ttl: float = 0,
        jitter: float = 0,
        lease_ttl: float = LEASE_TTL,
        wait: float = LEASE_TTL,
    ) -> Any:
        """The cached value of ``key``, computed by ``await fn()`` if missing: single-flight.

        As ``Client.get_or_compute``: one caller on the host (one in the
        cluster, through Redis) runs ``fn`` while the others wait up to
        ``wait`` seconds for its result; if ``fn`` raises (or is cancelled),
        that caller gets its exception, every waiter ``ComputeFailed``, and
        nothing is cached.
        """
        answer = await self._run(_calls.cache_lease(key, lease_ttl, wait))
        done, found = _calls.lease_outcome(key, answer)
        if done:
            return found
        try:
            value = await fn()
        except BaseException as exc:
            # Shielded: the waiters must hear of it even when fn was cancelled.
            with anyio.CancelScope(shield=True), contextlib.suppress(WksError):
                failure = _calls.describe_failure(exc)
                await self._run(_calls.cache_abandon(key, found, failure))
            raise
        with anyio.CancelScope(shield=True):  # the waiters get what was computed
            await self._run(
                _calls.cache_fill(key, found, value, _calls.jittered(ttl, jitter), stale_ttl)
            )
        return value

    async def subscribe_workflows(
        self, execution_id: str | None = None
    ) -> AsyncWorkflowSubscription:
        """Live workflow events (all executions, or one), on this client's connection.

        ``async with await c.subscribe_workflows() as events: async for event
        in events: ...``; see ``Client.subscribe_workflows``.
        """
        subscription = AsyncWorkflowSubscription(self, execution_id)
        try:
            await self._subscribe(execution_id)
        except BaseException:
            subscription._stream.close()
            raise
        return subscription

    # -- notifications (internal) --------------------------------------------
    def _listen(
        self, method: str, max_buffer: int = _LISTEN_BUFFER
    ) -> MemoryObjectReceiveStream[list[Any]]:
        """Internal: a stream of the params of every ``method`` notification.

        A hook for features built on pushed events (workflow subscriptions,
        ``lock.lost``): this only routes what arrives on any of the client's
        connections. ``_DISCONNECTED`` is delivered when a connection ends.
        A listener that falls ``max_buffer`` behind misses notifications
        until it catches up; closing the stream unregisters it. The client's
        ``aclose`` ends every stream.
        """
        sender, receiver = anyio.create_memory_object_stream[list[Any]](max_buffer)
        self._register(sender, (method,), tagged=False)
        return receiver

    def _listen_to(
        self, *methods: str, max_buffer: int = _LISTEN_BUFFER
    ) -> MemoryObjectReceiveStream[tuple[str, list[Any]]]:
        """Internal: as ``_listen``, for several methods at once, as (method, params)."""
        sender, receiver = anyio.create_memory_object_stream[tuple[str, list[Any]]](max_buffer)
        self._register(sender, methods, tagged=True)
        return receiver

    def _register(
        self, sender: MemoryObjectSendStream[Any], methods: tuple[str, ...], tagged: bool
    ) -> None:
        if self._closed:
            sender.close()
            return
        for method in methods:
            self._listeners.setdefault(method, []).append((sender, tagged))

    def _notify(self, method: str, params: list[Any]) -> None:
        senders = self._listeners.get(method)
        if not senders:
            return  # nobody listens: ignored
        for entry in list(senders):
            sender, tagged = entry
            try:
                sender.send_nowait((method, params) if tagged else params)
            except anyio.WouldBlock:
                pass  # this listener is max_buffer behind: it misses this one
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                senders.remove(entry)
                sender.close()

    # -- workflow subscriptions (internal side) ----------------------------------
    async def _subscribe(self, execution_id: str | None, again: bool = False) -> None:
        """Subscribe this client's connection (reference counted per execution id)."""
        if not again:
            self._subscriptions[execution_id] = self._subscriptions.get(execution_id, 0) + 1
        await self.call("workflow.subscribe", execution_id)

    async def _unsubscribe(self, execution_id: str | None) -> None:
        left = self._subscriptions.get(execution_id, 0) - 1
        if left > 0:
            self._subscriptions[execution_id] = left
            return
        self._subscriptions.pop(execution_id, None)
        if not self._closed:
            with contextlib.suppress(WksError):
                await self.call("workflow.unsubscribe", execution_id)

    # -- transport --------------------------------------------------------
    async def _run(self, call: Call[T]) -> T:
        result = await self._roundtrip(call.method, call.params, call.extra_timeout)
        return call.convert(result)

    def _check_open(self) -> anyio.abc.TaskGroup:
        if self._closed:
            raise ConnectionLost("this AsyncClient is closed")
        if self._task_group is None:  # a mistake in the program: say so loudly
            raise RuntimeError("use the client as `async with AsyncClient(...) as client:`")
        return self._task_group

    async def _roundtrip(
        self,
        method: str,
        params: list[Any],
        extra_timeout: float,
        on_answer: _OnAnswer | None = None,
    ) -> Any:
        """The result (or what ``on_answer``, run by the reader, made of it)."""
        self._check_open()
        self._msgid = msgid = (self._msgid + 1) & MAX_MSGID
        payload = encode_request(msgid, method, params)
        with anyio.move_on_after(self.timeout + extra_timeout):
            return await self._send_and_wait(msgid, payload, on_answer)
        raise RequestTimeout(f"no answer from wksd within {self.timeout + extra_timeout} s")

    async def _send_and_wait(self, msgid: int, payload: bytes, on_answer: _OnAnswer | None) -> Any:
        for attempt in range(1, _SEND_ATTEMPTS + 1):
            connection = await self._connect()
            waiter = _Waiter(None if on_answer is None else partial(on_answer, connection))
            connection.pending[msgid] = waiter
            try:
                await connection.send(payload)
            except _NotSent as exc:
                connection.pending.pop(msgid, None)
                if attempt == _SEND_ATTEMPTS:
                    raise ConnectionLost(f"sending to {self.path} failed: {exc}") from exc
                continue
            except BaseException:
                connection.pending.pop(msgid, None)
                raise
            try:
                return await waiter.wait()
            finally:
                connection.pending.pop(msgid, None)  # a late answer is dropped
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self) -> _Connection:
        """The connection new requests go on, made if there is none."""
        connection = self._connection
        if connection is not None and connection.usable:
            return connection
        assert self._connect_lock is not None
        async with self._connect_lock:  # one connection, however many calls need it
            connection = self._connection
            if connection is not None and connection.usable:
                return connection
            task_group = self._check_open()
            try:
                with anyio.fail_after(self.timeout):
                    stream = await anyio.connect_unix(self.path)
            except OSError as exc:  # TimeoutError included
                reason = exc.strerror or str(exc) or f"no answer within {self.timeout} s"
                raise DaemonUnavailable(f"cannot connect to wksd at {self.path}: {reason}") from exc
            connection = _Connection(stream, self._max_message_bytes, self.timeout)
            self._connection = connection
            self._connections.add(connection)
            task_group.start_soon(self._read, connection)
            return connection

    async def _read(self, connection: _Connection) -> None:
        """The reader task of one connection; it never raises."""
        error: _ErrorFactory = partial(ConnectionLost, "the connection to wksd was closed")
        try:
            with connection.scope:
                error = await self._read_until_done(connection)
        except Exception as exc:  # a bug here must not take the caller's task group down
            error = partial(ConnectionLost, f"reading from wksd failed: {exc!r}")
        finally:
            connection.fail_all(error)
            fire(connection.held.disconnected())
            self._connections.discard(connection)
            if self._connection is connection:
                self._connection = None
            await anyio.aclose_forcefully(connection.stream)
            connection.finished.set()
            self._notify(_DISCONNECTED, [str(error())])

    async def _read_until_done(self, connection: _Connection) -> _ErrorFactory:
        """Read and dispatch until the connection ends; what waiting calls get."""
        decoder = connection.decoder
        while True:
            try:
                data = await connection.stream.receive(_READ_CHUNK)
            except anyio.EndOfStream:
                return partial(ConnectionLost, "wksd closed the connection before answering")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                return partial(ConnectionLost, f"connection to wksd broke: {exc}")
            decoder.receive_data(data)
            while True:
                try:
                    event = decoder.next_event()
                except ProtocolError as exc:
                    return partial(ProtocolError, str(exc))
                if event is NEED_DATA:
                    break
                error = self._dispatch(connection, event)
                if error is not None:
                    return error
            if connection.closing and not connection.pending:
                # Every answer is in; the daemon closes this connection anyway.
                return partial(ConnectionLost, "wksd is shutting down")

    def _dispatch(self, connection: _Connection, event: object) -> _ErrorFactory | None:
        """Act on one message; an error factory when the connection must end."""
        if isinstance(event, Response):
            # msgid None answers a request the daemon could not read at all;
            # this client never sends one, so nobody waits for it.
            waiter = None if event.msgid is None else connection.pending.pop(event.msgid, None)
            if waiter is None:
                return None  # its call timed out or was cancelled
            if event.error is not None:
                waiter.fail(error_from_wire(event.error))
            else:
                waiter.succeed(event.result)
        elif isinstance(event, Notification):
            if event.method == "closing":
                connection.closing = True
                if self._connection is connection:
                    self._connection = None
            elif event.method == "protocol_error":
                return partial(ProtocolError, f"wksd closed the connection: {event.params}")
            else:
                if event.method == "lock.lost":
                    fire(connection.held.pushed(event.params))
                self._notify(event.method, event.params)
        else:  # Invalid, or a Request: the daemon never sends those
            return partial(ProtocolError, f"unexpected message from wksd: {event}")
        return None


class AsyncWorkflowSubscription:
    """An async iterator of ``WorkflowEvent``s (see ``WorkflowSubscription``).

    It shares its client's connection. ``dropped`` counts events the daemon
    dropped for a subscriber too far behind; when the connection is lost the
    subscription subscribes again on the next one (``resubscribed``). Close it
    with ``aclose`` (or ``async with``); the client's ``aclose`` ends it too.
    """

    def __init__(self, client: AsyncClient, execution_id: str | None) -> None:
        self.execution_id = execution_id
        self.dropped = 0
        self.resubscribed = 0
        self._client = client
        self._stream = client._listen_to("workflow.event", "workflow.events_dropped", _DISCONNECTED)
        self._closed = False

    async def __aenter__(self) -> AsyncWorkflowSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncWorkflowSubscription:
        return self

    async def __anext__(self) -> WorkflowEvent:
        while True:
            try:
                method, params = await self._stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise StopAsyncIteration from None
            if method == "workflow.event":
                event = params[0]
                if self.execution_id in (None, event.get("executionId")):
                    return WorkflowEvent.from_wire(event)
            elif method == "workflow.events_dropped":
                self.dropped += int(params[0])
            else:  # the connection ended: subscribe on the next one
                self.resubscribed += 1
                await self._client._subscribe(self.execution_id, again=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.close()
        await self._client._unsubscribe(self.execution_id)
