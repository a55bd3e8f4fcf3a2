"""One trio-native Redis connection, auto-pipelined.

Theory of operation
-------------------
Any task may ``execute`` a command. The command is encoded as RESP
(``wksd.store.resp``) and appended to one outgoing buffer, and the caller's
place in line (a ``_PendingReply``) to a FIFO. If no write is in progress,
the calling task writes the buffer at once; commands queued while a write is
in progress go out together in the next write. So a lone command costs no
task switch, and a burst costs one write.

Everything Redis sends goes through one RESP reply reader, and each reply to
the caller at the head of the FIFO (Redis answers in order). Whoever holds
the *read side* feeds it: while the link is idle, a reader task, so pushes
and late replies are taken as they come; a caller that has sent its command
and finds the reader task only waiting for bytes takes the read side over
(cancelling that wait, which has consumed nothing), reads until its own
reply has come (delivering any earlier ones on the way), then hands it
back. That saves the reader task's pass, and the scheduler's loop between
it and the caller, on every command sent while no other is being read:
measured here, a Redis ``PING`` round trip from 125 µs to 87 µs in the
daemon's process (README, "Benchmark"). Callers
that find the read side taken wait, and are woken directly
(``trio.lowlevel.reschedule``) by whoever reads their reply. Only
``SocketIO`` links do this: a cancelled read of trio's SSLStream breaks the
stream, so a TLS link's replies are always read by its reader task. A
caller whose reply is in the socket the moment it looks returns without
passing through the scheduler; ``SocketIO`` still yields every
``FAIR_SHARE`` reads, so a loop of such commands cannot starve other tasks.

Failure is link-wide. If the reply at the head of the FIFO has not arrived
``timeout`` seconds after its command was queued, Redis is stalled (or gone
without a word): the link breaks, and every caller waiting gets
``LinkDown``. A small watch task checks the oldest command's age
(``_watch_stalls``), so a command costs no cancel scope or deadline of its
own; a stall is noticed within a quarter of the timeout after it. A closed
connection, an unparseable reply, or an error reply that means "this node
cannot serve" (READONLY, LOADING, MASTERDOWN, OOM) breaks it too. Error
replies about the command itself (a ``ResponseError``) are raised to its
caller only.

Two hooks run on whoever reads, in the order Redis sent things, before any
later reply is looked at: ``on_push`` is given every RESP3 push (a link
opened with ``HELLO 3``: the near cache's invalidations, which Redis
interleaves with the replies exactly in the order it executed the commands),
and a command's ``observe`` is given its replies as they are delivered, even
if its caller was cancelled meanwhile. A hook that raises breaks the link.

Plain TCP and Unix links run on ``wksd.sockio.SocketIO`` (see there why);
TLS runs on trio's SSLStream. Writes are not shielded from cancellation: a
write cancelled half-way would leave a corrupt stream, so it breaks the link
instead, and the failover serves from memory until it reconnects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import outcome
import trio
from redis.exceptions import (
    BusyLoadingError,
    InvalidResponse,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ..sockio import SocketIO
from .resp import is_push, pack, reply_reader

__all__ = ["LinkDown", "RedisLink"]

#: Bytes asked of the socket per read; replies to a pipelined burst are small.
READ_CHUNK: Final = 65536

#: Replies that mean the node cannot serve us at all, not that one command
#: was wrong: after a Sentinel failover the old master answers READONLY.
#: Out of memory is one too: it refuses every write until someone intervenes.
_NODE_FAILURES: Final = (ReadOnlyError, BusyLoadingError, MasterDownError, OutOfMemoryError)

#: Given a command's replies (error replies as values) when they arrive.
Observer = Callable[[list[Any]], None]


class LinkDown(RedisConnectionError):
    """The Redis link is broken; the command may or may not have been applied."""


class _PendingReply:
    """One caller's place in the FIFO: the replies it waits for, and the task to wake.

    The result is handed over only once the caller is parked in
    ``wait_task_rescheduled`` (``waiting``): a caller may still be busy
    flushing other tasks' commands when its own reply arrives, and then it
    finds the result stored when it is done.
    """

    __slots__ = ("deadline", "name", "observe", "replies", "result", "task", "waiting", "wanted")

    def __init__(
        self,
        task: trio.lowlevel.Task,
        name: str,
        wanted: int,
        deadline: float,
        observe: Observer | None,
    ) -> None:
        self.task = task
        self.name = name
        self.wanted = wanted
        self.deadline = deadline
        self.observe = observe
        self.replies: list[Any] = []
        self.result: outcome.Outcome[list[Any]] | None = None
        self.waiting = False

    def settle(self, result: outcome.Outcome[list[Any]]) -> None:
        self.result = result
        if self.waiting:
            self.waiting = False
            trio.lowlevel.reschedule(self.task, result)


class RedisLink:
    """A connected Redis stream; run ``run`` in a nursery, then ``execute``."""

    def __init__(self, stream: trio.abc.Stream, timeout: float, metrics: Any = None) -> None:
        self._stream = stream
        self.timeout = timeout
        self._metrics = metrics  # wksd.metrics.Metrics, or None
        self._counted: dict[tuple[str, bool], Any] = {}
        self._reader = reply_reader()
        self._pending: deque[_PendingReply] = deque()
        self._outgoing = bytearray()
        self._writing = False
        self._scope: trio.CancelScope | None = None
        self._error: LinkDown | None = None
        self._closed = trio.Event()
        #: Given every RESP3 push, in order with the replies (see the module doc).
        self.on_push: Callable[[list[Any]], None] | None = None
        # The read side (module doc): held by the reader task or one caller.
        self._own_reads = isinstance(stream, SocketIO)
        self._reading = False
        self._reader_wait: trio.CancelScope | None = None  # the reader's, while it waits
        self._reader_task: trio.lowlevel.Task | None = None
        self._reader_parked = False

    @property
    def broken(self) -> bool:
        return self._error is not None

    async def wait_broken(self) -> LinkDown:
        """Return, with the reason, once the link is broken."""
        await self._closed.wait()
        assert self._error is not None
        return self._error

    async def execute(
        self, *args: Any, name: str | None = None, observe: Observer | None = None
    ) -> Any:
        """Send one command; its reply (an error reply is raised). ``observe``
        is given ``[reply]`` on the reader as it arrives (module doc)."""
        (reply,) = await self._submit(pack(*args), 1, name or args[0], observe)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def take_waiting(self) -> None:
        """Take in, without waiting, whatever Redis has sent already (a near
        cache's invalidations, before it answers from its copy).

        Safe from any task at any time: every reader takes in what it read
        before its next checkpoint, so no read is ever half-done. A TLS link
        (not ``SocketIO``) leaves it to its reader.
        """
        if not self._own_reads or self._error is not None:
            return
        try:
            data = cast(SocketIO, self._stream).socket.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(LinkDown(f"connection to Redis lost: {exc}"))
            return
        if not data:
            self.fail(LinkDown("connection to Redis lost: Redis closed the connection"))
            return
        try:
            self._take_in(data)
        except InvalidResponse as exc:
            self.fail(exc)

    async def pipeline(
        self, commands: Sequence[Sequence[Any]], observe: Observer | None = None
    ) -> list[Any]:
        """Send several commands in one write; their replies, errors as values."""
        payload = b"".join([pack(*command) for command in commands])
        return await self._submit(payload, len(commands), "PIPELINE", observe)

    def fail(self, reason: BaseException) -> None:
        """Break the link: every caller waiting gets LinkDown, the reader stops."""
        if self._error is not None:
            return
        error = reason if isinstance(reason, LinkDown) else LinkDown(str(reason) or repr(reason))
        if error is not reason:
            error.__cause__ = reason
        self._error = error
        abandoned, self._pending = self._pending, deque()
        for pending in abandoned:
            self._count(pending.name, failed=True)
            pending.settle(outcome.Error(_fresh(error)))
        if self._scope is not None:
            self._scope.cancel()
        self._closed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read replies until the link breaks; then close the stream."""
        task_status.started()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_stalls)
                    await self._read_forever()
        finally:
            self.fail(LinkDown("link closed"))
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    # -- internals ----------------------------------------------------------
    async def _read_forever(self) -> None:
        """Hold the read side whenever no caller does, until the stream ends or
        breaks (which breaks the link)."""
        self._reader_task = trio.lowlevel.current_task()
        receive = self._stream.receive_some
        try:
            while True:
                if self._reading:  # a caller reads its own reply: wait for it
                    await self._park_reader()
                    continue
                self._reading = True
                with trio.CancelScope() as wait:
                    self._reader_wait = wait
                    data = await receive(READ_CHUNK)
                if wait.cancelled_caught:  # a caller took over; nothing was read
                    continue
                self._reader_wait = None
                self._reading = False
                if not data:
                    self.fail(LinkDown("connection to Redis lost: Redis closed the connection"))
                    return
                self._take_in(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(LinkDown(f"connection to Redis lost: {exc}"))
        except InvalidResponse as exc:
            self.fail(exc)
        finally:
            self._reader_wait = None

    async def _park_reader(self) -> None:
        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            self._reader_parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        self._reader_parked = True
        await trio.lowlevel.wait_task_rescheduled(abort)

    def _take_read_side(self) -> bool:
        """Take the read side for a caller, if it is free or the reader task
        only waits for bytes (then its wait is cancelled: it has read nothing)."""
        if not self._own_reads or self._error is not None:
            return False
        if self._reading:
            if self._reader_wait is None:
                return False  # someone is reading, or taking in what it read
            self._reader_wait.cancel()
            self._reader_wait = None
        self._reading = True
        return True

    async def _read_own_reply(self, pending: _PendingReply) -> None:
        """Read (holding the read side) until ``pending`` is settled; then hand
        the read side back to the reader task. Cancelled, this reads nothing
        more: the reply is read and dropped by whoever reads next."""
        try:
            while pending.result is None:
                data = await self._stream.receive_some(READ_CHUNK)
                if not data:
                    self.fail(LinkDown("connection to Redis lost: Redis closed the connection"))
                    return
                self._take_in(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(LinkDown(f"connection to Redis lost: {exc}"))
        except InvalidResponse as exc:
            self.fail(exc)
        finally:
            self._reading = False
            if self._reader_parked:
                self._reader_parked = False
                assert self._reader_task is not None
                trio.lowlevel.reschedule(self._reader_task)

    def _take_in(self, data: bytes | bytearray) -> None:
        """Feed what was read to the reply reader; deliver every whole reply."""
        reader = self._reader
        reader.feed(cast(bytes, data))  # both stream kinds give bytes
        while (reply := reader.gets()) is not False:
            if is_push(reply):
                self._pushed(reply)
            else:
                self._deliver(reply)

    async def _watch_stalls(self) -> None:
        """Break the link when the oldest command has waited ``timeout``."""
        idle_check = self.timeout / 4
        while True:
            if not self._pending:
                await trio.sleep(idle_check)
            elif trio.current_time() >= self._pending[0].deadline:
                self.fail(LinkDown(f"Redis did not answer within {self.timeout} s"))
                return
            else:
                await trio.sleep_until(self._pending[0].deadline)

    def _pushed(self, push: list[Any]) -> None:
        if self.on_push is not None:
            try:
                self.on_push(push)
            except Exception as exc:
                self.fail(LinkDown(f"a push from Redis could not be handled: {exc!r}"))

    def _deliver(self, reply: Any) -> None:
        if not self._pending:
            raise InvalidResponse("a reply nobody asked for")
        pending = self._pending[0]
        pending.replies.append(reply)
        if isinstance(reply, Exception):
            self._count(pending.name, failed=True)
        if isinstance(reply, _NODE_FAILURES):
            self.fail(reply)
            return
        if len(pending.replies) < pending.wanted:
            return
        self._pending.popleft()
        if pending.observe is not None:
            try:
                pending.observe(pending.replies)
            except Exception as exc:
                failure = LinkDown(f"a reply from Redis could not be handled: {exc!r}")
                pending.settle(outcome.Error(failure))
                self.fail(failure)
                return
        pending.settle(outcome.Value(pending.replies))

    async def _submit(
        self, payload: bytes, wanted: int, name: str, observe: Observer | None
    ) -> list[Any]:
        if self._error is not None:
            raise _fresh(self._error)
        self._count(name)
        pending = _PendingReply(
            trio.lowlevel.current_task(),
            name,
            wanted,
            trio.current_time() + self.timeout,
            observe,
        )
        self._pending.append(pending)
        self._outgoing += payload
        if not self._writing:
            await self._flush()
        if pending.result is None and self._take_read_side():
            await self._read_own_reply(pending)
        if pending.result is not None:
            return pending.result.unwrap()

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            pending.waiting = False  # its reply will still be read, and dropped
            return trio.lowlevel.Abort.SUCCEEDED

        pending.waiting = True
        replies: list[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        return replies

    def _count(self, name: str, failed: bool = False) -> None:
        """redis_commands_total, or redis_commands_failed_total, for ``name``."""
        if self._metrics is None:
            return
        child = self._counted.get((name, failed))
        if child is None:
            family = self._metrics.redis_commands_failed if failed else self._metrics.redis_commands
            child = self._counted[(name, failed)] = family.labels(name)
        child.inc()

    async def _flush(self) -> None:
        """Write everything queued, including what is queued meanwhile."""
        self._writing = True
        try:
            while self._outgoing and self._error is None:
                data, self._outgoing = self._outgoing, bytearray()
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(LinkDown(f"sending to Redis failed: {exc}"))
        except BaseException:
            # Cancelled with the write half done: the stream is corrupt.
            self.fail(LinkDown("a write to Redis was interrupted"))
            raise
        finally:
            self._writing = False


def _fresh(error: LinkDown) -> LinkDown:
    """A new exception per caller: one instance raised in many tasks tangles tracebacks."""
    copy = LinkDown(*error.args)
    copy.__cause__ = error.__cause__
    return copy


def is_command_error(exc: BaseException) -> bool:
    """An error reply about the command itself, not about the link."""
    return isinstance(exc, ResponseError) and not isinstance(exc, _NODE_FAILURES)
