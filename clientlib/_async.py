"""The async client: one connection shared by many tasks, on trio or asyncio.

Theory of operation: an ``AsyncClient`` is a thin shell over
``clientlib._connection.ClientConnection``, which holds the connection's
rules (msgids, the closing notice, what may be sent again, lock pushes);
this module only moves bytes between it and anyio, translating each anyio
or OS error once (``_translated``). The methods are declared in
``clientlib._api``.

It is entered with ``async with``, which opens an anyio task group that the
client owns. The first call connects (as the sync client does, lazily) and
starts a reader task in that group. Any number of tasks may then call at
once over that one connection:

- each request is written whole under the connection's write lock, so
  requests never interleave on the wire, and its caller waits on a ``_Reply``
  registered under its msgid;
- the reader feeds what arrives to the connection and delivers its events: an
  answer completes the reply of its msgid (one whose caller gave up is
  dropped by the connection);
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

Lost locks. The reader marks a keepalive lock lost, and calls its
``on_lost`` callback (a plain function, run in the reader task: it must not
block; set an event or cancel a scope), the moment it reads the daemon's
``lock.lost`` push, or when the connection ends.

An ``AsyncClient`` belongs to the event loop it was entered in: share it
between the tasks of that loop, never between threads or loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeVar

try:
    import anyio
    import anyio.abc
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
except ModuleNotFoundError as exc:  # the "async" extra is not installed
    if exc.name != "anyio" and not (exc.name or "").startswith("anyio."):
        raise
    raise ImportError(
        "clientlib.AsyncClient needs anyio, the 'async' extra: pip install 'wksd[async]'"
    ) from exc

from ._api import ClientAPI
from ._calls import Call
from ._connection import Answer, ClientConnection, Closing, Ended, Failure, LocksLost, Push
from ._flows import Computation, Feed, LockBlock
from ._held import Release, fire
from ._types import LockResult, WorkflowEvent
from .errors import ConnectionLost, DaemonUnavailable, RequestTimeout, WksError

__all__ = ["AsyncClient"]

T = TypeVar("T")

#: Bytes asked of the socket per read; responses are usually far smaller.
_READ_CHUNK: Final = 65536
#: Notifications a listener may have unread before further ones are dropped
#: for it: the daemon's own subscription backlog (docs/protocol-extensions.md).
_LISTEN_BUFFER: Final = 1000
#: Pseudo-notification delivered to its listeners when a connection ends
#: (params: [reason]); whatever the daemon tied to that connection (a
#: subscription, a keepalive lock) is gone. Never sent by the daemon.
_DISCONNECTED: Final = "clientlib.disconnected"

#: What anyio raises when a stream broke or was closed under a call.
_STREAM_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@contextmanager
def _translated(error: type[WksError], doing: str) -> Iterator[None]:
    """The one place this transport translates anyio and OS errors:
    ``error(doing: why)``, with the original as the cause."""
    try:
        yield
    except _STREAM_ERRORS as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise error(f"{doing}: {why}") from exc


class _Reply:
    """Where the reader puts the outcome of one request for its caller."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: Any = None
        self._error: WksError | None = None

    def succeed(self, value: Any) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: WksError) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Link:
    """One socket to the daemon: its stream and connection state, the replies
    waiting on it, and its reader's scope."""

    def __init__(
        self, stream: anyio.abc.ByteStream, max_message_bytes: int, write_timeout: float
    ) -> None:
        self.stream = stream
        self.connection = ClientConnection(max_message_bytes)
        #: Seconds a write may take before the daemon counts as not reading.
        self.write_timeout = write_timeout
        self.replies: dict[int, _Reply] = {}
        self.write_lock = anyio.Lock()
        #: The reader task runs in this scope; cancelling it ends the connection.
        self.scope = anyio.CancelScope()
        #: Set when the reader task has finished and the socket is closed.
        self.finished = anyio.Event()

    async def write(self, data: bytes) -> None:
        """Write one whole request (``ConnectionLost`` if that failed)."""
        # Shielded: a caller cancelled half-way through a write would leave a
        # partial message that garbles every later request. The write is
        # bounded by the timeout instead.
        deadline = anyio.current_time() + self.write_timeout
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            with _translated(ConnectionLost, "sending to wksd failed"):
                await self.stream.send(data)
        if scope.cancelled_caught:
            raise RequestTimeout(f"wksd took no request within {self.write_timeout} s")

    async def receive(self) -> bytes:
        """What arrives next (``b""``: the daemon closed its end)."""
        try:
            with _translated(ConnectionLost, "connection to wksd broke"):
                return await self.stream.receive(_READ_CHUNK)
        except anyio.EndOfStream:
            return b""


class AsyncClient(ClientAPI):
    """Async client for wksd, on anyio: works under trio and asyncio.

    Use it as ``async with AsyncClient() as client:``; it runs a reader task
    for as long as the block lasts. Every method of ``Client`` is here,
    awaitable, and tasks of the same event loop may call concurrently: their
    requests share one connection.
    """

    def _prepare(self) -> None:
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._connect_lock: anyio.Lock | None = None
        self._link: _Link | None = None  # where new requests go
        self._links: set[_Link] = set()  # including closing ones
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
        for senders in self._listeners.values():
            for sender, _ in senders:
                sender.close()
        self._listeners.clear()
        links = list(self._links)
        for link in links:
            link.connection.close()  # its keepalive locks are released, not lost
            self._deliver(link)
        with anyio.CancelScope(shield=True):  # the readers end at once
            for link in links:
                await link.finished.wait()

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

    # -- the runners of clientlib._api ------------------------------------------
    async def _run(self, call: Call[T]) -> T:
        self._check_open()
        timeout = self.timeout + call.extra_timeout
        with anyio.move_on_after(timeout):
            value: T = await self._send_and_wait(call)
            if isinstance(call.locks, Release):  # whichever connection kept it
                self._forget(call.locks.execution_id, call.locks.worker_id)
            return value
        raise RequestTimeout(f"no answer from wksd within {timeout} s")

    @asynccontextmanager
    async def _hold(self, block: LockBlock) -> AsyncIterator[LockResult]:
        lock = block.granted(await self._run(block.acquire))
        try:
            yield lock
        except BaseException as exc:
            block.ended(lock, await self._release(block), exc)
            raise
        block.ended(lock, await self._release(block))

    async def _release(self, block: LockBlock) -> str | WksError:
        """Release the block's lock: its status, or why the release failed."""
        try:
            # Shielded, so a cancelled block still releases (bounded by the timeout).
            with anyio.CancelScope(shield=True):
                status = await self._run(block.release)
        except WksError as exc:
            return exc
        finally:  # released or not, the block is over: nothing more to tell
            self._forget(block.execution_id, block.worker_id)
        return status

    def _forget(self, execution_id: str, worker_id: str) -> None:
        """The worker released the lock: no connection watches it any more."""
        for link in self._links:
            link.connection.forget(execution_id, worker_id)

    async def _compute(self, job: Computation) -> Any:
        done, found = job.outcome(await self._run(job.lease))
        if done:
            return found
        try:
            value = await job.fn()
        except BaseException as exc:
            # Shielded: the waiters must hear of it even when fn was cancelled.
            with anyio.CancelScope(shield=True), contextlib.suppress(WksError):
                await self._run(job.abandon(found, exc))
            raise
        with anyio.CancelScope(shield=True):  # the waiters get what was computed
            await self._run(job.fill(found, value))
        return value

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
    def _check_open(self) -> anyio.abc.TaskGroup:
        if self._closed:
            raise ConnectionLost("this AsyncClient is closed")
        if self._task_group is None:  # a mistake in the program: say so loudly
            raise RuntimeError("use the client as `async with AsyncClient(...) as client:`")
        return self._task_group

    async def _send_and_wait(self, call: Call[Any]) -> Any:
        """Send ``call`` (once more on a fresh connection if that is safe) and
        wait for its answer."""
        attempt = 1
        while True:
            link = await self._connect()
            async with link.write_lock:
                connection = link.connection
                if not connection.can_send:
                    continue  # it turned closing meanwhile: the next connection takes it
                msgid, data = connection.send_request(call, attempt)
                reply = link.replies[msgid] = _Reply()
                try:
                    await link.write(data)
                except ConnectionLost as exc:
                    link.replies.pop(msgid, None)
                    resend = connection.write_failed(msgid, str(exc))
                    self._deliver(link)  # the other calls on it fail now
                    if not resend:
                        raise
                    attempt += 1
                    continue
                except RequestTimeout:  # part of it may be out: the stream is garbled
                    link.replies.pop(msgid, None)
                    connection.abandon(msgid)
                    connection.broken("wksd stopped reading requests")
                    self._deliver(link)
                    raise
            try:
                return await reply.wait()
            finally:
                if link.replies.pop(msgid, None) is not None:
                    connection.abandon(msgid)  # gave up: a late answer is dropped

    async def _connect(self) -> _Link:
        """The connection new requests go on, made if there is none."""
        link = self._link
        if link is not None and link.connection.can_send:
            return link
        assert self._connect_lock is not None
        async with self._connect_lock:  # one connection, however many calls need it
            link = self._link
            if link is not None and link.connection.can_send:
                return link
            task_group = self._check_open()
            with (
                _translated(DaemonUnavailable, f"cannot connect to wksd at {self.path}"),
                anyio.fail_after(self.timeout),
            ):
                stream = await anyio.connect_unix(self.path)
            link = _Link(stream, self._max_message_bytes, self.timeout)
            self._link = link
            self._links.add(link)
            task_group.start_soon(self._read, link)
            return link

    async def _read(self, link: _Link) -> None:
        """The reader task of one connection; it never raises."""
        connection = link.connection
        try:
            with link.scope:
                while not connection.ended:
                    try:
                        connection.receive_data(await link.receive())
                    except ConnectionLost as exc:
                        connection.broken(str(exc))
                    self._deliver(link)
        except Exception as exc:  # a bug here must not take the caller's task group down
            connection.broken(f"reading from wksd failed: {exc!r}")
        finally:
            connection.broken("the connection to wksd was closed")  # nothing if it had ended
            self._deliver(link)
            await anyio.aclose_forcefully(link.stream)
            link.finished.set()

    def _deliver(self, link: _Link) -> None:
        """Act on every event the connection has: answers to their callers,
        pushes to their listeners, lost locks to their callbacks."""
        for event in link.connection.events():
            if isinstance(event, Answer | Failure):
                self._reply(link, event)
            elif isinstance(event, Push):
                self._notify(event.method, event.params)
            elif isinstance(event, LocksLost):
                fire(event.locks)
            elif isinstance(event, Closing):
                self._retire(link)
            elif isinstance(event, Ended):
                self._ended(link, event)

    def _reply(self, link: _Link, event: Answer | Failure) -> None:
        reply = link.replies.pop(event.msgid, None)
        if reply is None:
            return  # its caller is gone (the connection drops such answers itself)
        if isinstance(event, Answer):
            reply.succeed(event.value)
        else:
            reply.fail(event.error)

    def _retire(self, link: _Link) -> None:
        """New requests go to a new connection from now on."""
        if self._link is link:
            self._link = None

    def _ended(self, link: _Link, event: Ended) -> None:
        self._retire(link)
        if link in self._links:  # once: Ended stays the connection's last event
            self._links.discard(link)
            link.scope.cancel()  # the reader closes the stream
            self._notify(_DISCONNECTED, [str(event.error)])


class AsyncWorkflowSubscription(Feed):
    """An async iterator of ``WorkflowEvent``s (see ``WorkflowSubscription``).

    It shares its client's connection, and subscribes again on the next one
    when that is lost (see ``Feed``). Close it with ``aclose`` (or ``async
    with``); the client's ``aclose`` ends it too.
    """

    def __init__(self, client: AsyncClient, execution_id: str | None) -> None:
        super().__init__(execution_id)
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
            if method == _DISCONNECTED:  # subscribe on the next connection
                self.resubscribed += 1
                await self._client._subscribe(self.execution_id, again=True)
                continue
            event = self._event(method, params)
            if event is not None:
                return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.close()
        await self._client._unsubscribe(self.execution_id)
