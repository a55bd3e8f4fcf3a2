"""The client's side of one connection to wksd, sans-IO.

Theory of operation, in the spirit of h11's ``Connection``: a
``ClientConnection`` is everything a client knows about one socket to the
daemon, and it does no I/O. The client asks it for the bytes of a request
(``send_request``) and writes them; it hands it whatever it read
(``receive_data``; ``b""`` once the daemon closed its end) and then takes
events out (``next_event``, or ``events`` for all of them) until
``NEED_DATA``:

- ``Answer`` / ``Failure``: the outcome of one request, by msgid, the result
  already converted (``Call.convert``) or the error already an exception;
- ``Push``: a notification for the client to route (workflow events...);
- ``LocksLost``: keepalive locks that ended, by the daemon's ``lock.lost`` or
  with the connection; their ``on_lost`` callbacks are the client's to call
  (``clientlib._held.fire``), where that is safe for it;
- ``Closing``: the daemon is shutting down; no new request goes out here;
- ``Ended``: the connection is over, close the socket. Every request still
  outstanding got its ``Failure`` before it, and it is the answer of
  ``next_event`` from then on.

What the client tells it besides: a call that gave up (``abandon``), a write
that failed (``write_failed``), a transport that broke (``broken``), and a
close on purpose (``close``).

The rules, written here once for both clients:

- msgids count up per connection, wrapping at 2**32 and skipping any still
  outstanding. An answer whose msgid is not outstanding (its call gave up) is
  dropped. An answer with no msgid (the daemon could not read a request at
  all) is the answer of the only outstanding request, else it is dropped.
- After the ``closing`` notice no request goes out (``can_send`` is false);
  the outstanding ones are still answered, and once none is left the
  connection ends by itself: the daemon closes it anyway.
- Resend safety: a request may go out again on a fresh connection only if
  writing it failed (the daemon had closed the connection before reading it:
  it restarted, so the request cannot have been applied), and on one fresh
  connection only (``SEND_ATTEMPTS``). A request outstanding when the
  connection ends may have been applied: its caller gets ``ConnectionLost``
  and it is never sent again.
- A ``protocol_error`` notice, bytes that do not decode and a message no
  daemon sends (a request, an invalid envelope) end the connection with
  ``ProtocolError``.
- Keepalive locks (``clientlib._held``): a lock a call grants (its
  ``KeepAlive``) is watched from the moment its answer is read, so no
  ``lock.lost`` push after it can be missed; a release answered (its
  ``Release``) ends the watch; the end of the connection loses them all,
  except when the client closes it on purpose (a release, not a loss).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ._calls import Call
from ._held import HeldLocks, KeepAlive, Release
from ._types import LockResult
from .errors import ConnectionLost, ProtocolError, WksError, error_from_wire
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MSGID,
    NEED_DATA,
    Decoder,
    Notification,
    Response,
    _NeedData,
    encode_request,
)

__all__ = [
    "NEED_DATA",
    "SEND_ATTEMPTS",
    "Answer",
    "ClientConnection",
    "Closing",
    "Ended",
    "Event",
    "Failure",
    "LocksLost",
    "Push",
]

#: Connections a request is tried on: the current one and, when writing to it
#: failed before anything could be read (the daemon restarted), one fresh one.
#: More would loop for ever on a daemon that accepts and hangs up at once.
SEND_ATTEMPTS: Final = 2

#: Why the outstanding requests failed, for each way a connection ends.
_EOF: Final = "wksd closed the connection before answering"
_SHUTTING_DOWN: Final = "wksd is shutting down"
_CLOSED: Final = "the client was closed"


@dataclass(frozen=True, slots=True)
class Answer:
    """Request ``msgid`` succeeded; ``value`` is its converted result."""

    msgid: int
    value: Any


@dataclass(frozen=True, slots=True)
class Failure:
    """Request ``msgid`` failed: the daemon refused it, or the connection ended."""

    msgid: int
    error: WksError


@dataclass(frozen=True, slots=True)
class Push:
    """A notification from the daemon, for the client to route."""

    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class LocksLost:
    """Keepalive locks that ended, already marked lost; call their ``on_lost``."""

    locks: tuple[LockResult, ...]


@dataclass(frozen=True, slots=True)
class Closing:
    """The daemon's ``closing`` notice: new requests go to a new connection."""

    params: list[Any]


@dataclass(frozen=True, slots=True)
class Ended:
    """The connection is over (``error`` says why): close the socket."""

    error: WksError


Event: TypeAlias = Answer | Failure | Push | LocksLost | Closing | Ended


class ClientConnection:
    """The state of one connection to the daemon, from the client's side.

    ``poll`` is handed to each keepalive lock granted here, for
    ``LockResult.lost`` to read what has arrived (the sync client's).
    """

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        poll: Callable[[], None] | None = None,
    ) -> None:
        self._decoder = Decoder(max_message_bytes)
        self._poll = poll
        self._msgid = 0
        self._outstanding: dict[int, tuple[Call[Any], int]] = {}  # msgid -> (call, attempt)
        self._events: deque[Event] = deque()
        self._eof = False
        self._ended: Ended | None = None
        #: The daemon said it is shutting down.
        self.closing = False
        #: The keepalive locks granted on this connection.
        self.held = HeldLocks()

    @property
    def can_send(self) -> bool:
        """Whether a new request may go out on this connection."""
        return not self.closing and self._ended is None

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered, failed or given up."""
        return len(self._outstanding)

    # -- what the client sends ------------------------------------------------
    def send_request(self, call: Call[Any], attempt: int = 1) -> tuple[int, bytes]:
        """The msgid and the bytes of ``call``, its ``attempt``-th time out.

        Only while ``can_send``: asking otherwise is a mistake of the caller.
        """
        if self.closing or self._ended is not None:
            raise RuntimeError("this connection takes no new request (closing or ended)")
        msgid = (self._msgid + 1) & MAX_MSGID
        while msgid in self._outstanding:  # four billion requests ago, and still out
            msgid = (msgid + 1) & MAX_MSGID
        self._msgid = msgid
        self._outstanding[msgid] = (call, attempt)
        return msgid, encode_request(msgid, call.method, call.params)

    def abandon(self, msgid: int) -> None:
        """The call of ``msgid`` gave up (timed out, cancelled): its answer is dropped."""
        self._outstanding.pop(msgid, None)

    def write_failed(self, msgid: int, reason: str) -> bool:
        """Writing request ``msgid`` failed (``reason``): the connection is over.

        True when the request may be sent again on a fresh connection (see
        the module doc); its caller is not sent a ``Failure`` either way.
        """
        outstanding = self._outstanding.pop(msgid, None)
        self._end(ConnectionLost, reason)
        return outstanding is not None and outstanding[1] < SEND_ATTEMPTS

    def broken(self, reason: str) -> None:
        """The transport failed (``reason``): the connection ends, and every
        outstanding request fails with ``ConnectionLost``. Nothing once ended."""
        self._end(ConnectionLost, reason)

    def close(self) -> None:
        """The client closes the connection on purpose: the daemon releases its
        keepalive locks, which are not lost; outstanding requests fail."""
        self.held.clear()
        self._end(ConnectionLost, _CLOSED)

    def forget(self, execution_id: str, worker_id: str) -> None:
        """The worker released this lock (however that went): stop watching it."""
        self.held.forget(execution_id, worker_id)

    # -- what the client receives ---------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` when the daemon closed its end."""
        if self._ended is not None:
            return
        if data:
            self._decoder.receive_data(data)
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, or ``NEED_DATA`` until more bytes are received."""
        if self._events:
            return self._events.popleft()
        while not self._events:
            if self._ended is not None:
                return self._ended
            try:
                message = self._decoder.next_event()
            except ProtocolError as exc:
                self._end(ProtocolError, str(exc))
                continue
            if isinstance(message, _NeedData):
                if not self._eof:
                    return NEED_DATA
                self._end(ConnectionLost, _EOF)
            elif isinstance(message, Response):
                self._answered(message)
            elif isinstance(message, Notification):
                self._notified(message)
            else:  # a Request or an Invalid envelope: the daemon never sends those
                self._end(ProtocolError, f"unexpected message from wksd: {message}")
        return self._events.popleft()

    def events(self) -> list[Event]:
        """Every event available now: up to ``NEED_DATA``, or up to ``Ended``."""
        found: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, _NeedData):
                return found
            found.append(event)
            if isinstance(event, Ended):
                return found

    def _answered(self, response: Response) -> None:
        msgid = response.msgid
        if msgid is None and len(self._outstanding) == 1:
            (msgid,) = self._outstanding
        outstanding = None if msgid is None else self._outstanding.pop(msgid, None)
        if msgid is None or outstanding is None:
            return  # its call gave up, or it is no call's
        call = outstanding[0]
        if response.error is not None:
            self._events.append(Failure(msgid, error_from_wire(response.error)))
        else:
            try:
                value = call.convert(response.result)
            except Exception as exc:  # a malformed answer fails its call, not the connection
                error = ProtocolError(f"unexpected answer from wksd: {exc!r}")
                self._events.append(Failure(msgid, error))
            else:
                if call.locks is not None:  # watched from now: no push after it is missed
                    self._watch(call.locks, value)
                self._events.append(Answer(msgid, value))
        if self.closing and not self._outstanding:
            self._end(ConnectionLost, _SHUTTING_DOWN)

    def _watch(self, locks: KeepAlive | Release, value: Any) -> None:
        if isinstance(locks, Release):
            self.held.forget(locks.execution_id, locks.worker_id)
        elif isinstance(value, LockResult) and value:  # granted
            self.held.add(locks.execution_id, locks.worker_id, value, locks.on_lost, self._poll)

    def _notified(self, notification: Notification) -> None:
        method, params = notification.method, notification.params
        if method == "closing":
            self.closing = True
            self._events.append(Closing(params))
            if not self._outstanding:
                self._end(ConnectionLost, _SHUTTING_DOWN)
        elif method == "protocol_error":
            self._end(ProtocolError, f"wksd closed the connection: {params}")
        else:
            if method == "lock.lost":
                self._lost(self.held.pushed(params))
            self._events.append(Push(method, params))

    def _lost(self, locks: list[LockResult]) -> None:
        if locks:
            self._events.append(LocksLost(tuple(locks)))

    def _end(self, error: Callable[[str], WksError], reason: str) -> None:
        """End the connection: each outstanding request fails with a fresh
        ``error(reason)`` (one exception is raised in one task only), the
        keepalive locks are lost, and ``Ended`` comes last."""
        if self._ended is not None:
            return
        outstanding, self._outstanding = self._outstanding, {}
        self._events.extend(Failure(msgid, error(reason)) for msgid in outstanding)
        self._lost(self.held.disconnected())
        self._ended = Ended(error(reason))
