"""msgpack-RPC, sans-IO: bytes in, messages out (DESIGN section 2.1).

Theory of operation: a ``Decoder`` is fed whatever bytes arrived
(``receive_data``) and hands back one message at a time (``next_event``), or
``NEED_DATA`` when the next message is still incomplete. It never touches a
socket, so the daemon and every client share it, and it is tested on whole
buffers, one byte at a time and with trailing bytes.

Two kinds of bad input are told apart, because the daemon treats them
differently:

- valid msgpack that is not a valid envelope is an ``Invalid`` event: the
  daemon answers ``BAD_REQUEST`` and carries on, the stream is still in sync;
- bytes that are not msgpack, or a message over the size limit, raise
  ``ProtocolError``: nothing after it can be trusted, so the connection must
  close. The decoder then stays broken and raises the same error again.

The size limit is enforced on the bytes fed since the current message began,
so a message of many small elements cannot grow without bound even though the
msgpack unpacker consumes it piece by piece.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import msgpack

from .errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_MSGID",
    "NEED_DATA",
    "Decoder",
    "Event",
    "Invalid",
    "Notification",
    "Request",
    "Response",
    "encode_notification",
    "encode_request",
    "encode_response",
    "is_binary_start",
]

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

#: msgpack-RPC's msgid is a uint32.
MAX_MSGID: Final = 2**32 - 1

#: One message may be this large: a stored value may be 1 MiB encoded
#: (DESIGN section 3), and msgpack is close to JSON in size, so twice that
#: leaves room for the envelope and encoding differences. WKSD_MAX_MESSAGE_BYTES
#: changes it for the daemon.
DEFAULT_MAX_MESSAGE_BYTES: Final = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Response:
    msgid: int | None  # None only on an error about an unreadable request
    error: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Valid msgpack that is not a valid envelope.

    ``msgid`` is the request's id when one could be read, so the error
    response can still be matched; ``None`` otherwise.
    """

    msgid: int | None
    reason: str


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``Decoder.next_event`` when the next message is incomplete.
NEED_DATA: Final = _NeedData()

Event: TypeAlias = Request | Response | Notification | Invalid


def _is_msgid(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


def _envelope(obj: Any) -> Event:
    """Check the shape of one decoded message and type it."""
    if not isinstance(obj, list) or not obj:
        return Invalid(None, "a message must be a non-empty array")
    kind = obj[0]
    if kind == REQUEST and type(kind) is int:
        if len(obj) != 4:
            return Invalid(None, "a request is [0, msgid, method, params]")
        _, msgid, method, params = obj
        if not _is_msgid(msgid):
            return Invalid(None, "msgid must be an integer from 0 to 2**32-1")
        if not isinstance(method, str):
            return Invalid(msgid, "method must be a string")
        if not isinstance(params, list):
            return Invalid(msgid, "params must be an array")
        return Request(msgid, method, params)
    if kind == RESPONSE and type(kind) is int:
        if len(obj) != 4 or not (obj[1] is None or _is_msgid(obj[1])):
            return Invalid(None, "a response is [1, msgid, error, result]")
        return Response(obj[1], obj[2], obj[3])
    if kind == NOTIFICATION and type(kind) is int:
        if len(obj) != 3 or not isinstance(obj[1], str) or not isinstance(obj[2], list):
            return Invalid(None, "a notification is [2, method, params]")
        return Notification(obj[1], obj[2])
    return Invalid(None, "the first element must be 0, 1 or 2")


class Decoder:
    """Streaming msgpack-RPC decoder for one connection."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 16:
            raise ValueError("max_message_bytes is too small to hold any message")
        self.max_message_bytes = max_message_bytes
        # strict_map_key=False: a map with integer keys is valid msgpack; the
        # daemon refuses it later with a clear BAD_REQUEST instead of closing.
        self._unpacker = msgpack.Unpacker(max_buffer_size=max_message_bytes, strict_map_key=False)
        self._pending = bytearray()
        self._fed = 0  # bytes handed to the unpacker so far
        self._message_start = 0  # stream offset where the current message began
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._pending) + self._fed - self._message_start

    def receive_data(self, data: bytes) -> None:
        """Add received bytes. Empty ``data`` is ignored (EOF is the caller's)."""
        if not self._pending and len(data) <= self._room():
            self._unpacker.feed(data)  # the usual case: no copy through _pending
            self._fed += len(data)
        else:
            self._pending += data

    def _room(self) -> int:
        """Bytes the current message may still take before it is over the limit."""
        return self.max_message_bytes - (self._fed - self._message_start)

    def next_event(self) -> Event | _NeedData:
        """The next complete message, ``NEED_DATA``, or ``ProtocolError``."""
        if self._error is not None:
            raise self._error
        unpacker = self._unpacker
        while True:
            if self._fed == unpacker.tell() and not self._pending:
                return NEED_DATA  # nothing unread: skip the OutOfData exception
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                if not self._pending:
                    return NEED_DATA
                room = self._room()
                if room <= 0:
                    raise self._fail(
                        f"message larger than {self.max_message_bytes} bytes"
                    ) from None
                piece = bytes(self._pending[:room])
                del self._pending[:room]
                unpacker.feed(piece)
                self._fed += len(piece)
                continue
            except TypeError as exc:
                # An array or map as a map key: unhashable in Python. The
                # unpacker has then consumed part of the message, so the
                # stream is out of step and cannot be trusted again.
                raise self._fail(f"unsupported map key: {str(exc)[:200]}") from exc
            except (ValueError, msgpack.UnpackException) as exc:
                # FormatError, StackError (nested deeper than msgpack's 1024
                # levels), bad UTF-8, a length header over the limit: all
                # subclasses of ValueError.
                raise self._fail(
                    f"undecodable msgpack: {str(exc)[:200] or type(exc).__name__}"
                ) from exc
            self._message_start = unpacker.tell()
            return _envelope(obj)

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._pending.clear()
        return self._error


def is_binary_start(first_byte: int) -> bool:
    """True when a connection's first byte is a msgpack array header, which
    every msgpack-RPC message starts with (fixarray, array 16, array 32)."""
    return 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD)


def _pack(message: list[Any]) -> bytes:
    """msgpack bytes of ``message``; a string UTF-8 cannot hold (a lone
    surrogate, as the seed's ``JSON.stringify`` may have stored one) is sent
    with U+FFFD in place of each surrogate, never dropping the message."""
    try:
        return msgpack.packb(message)  # type: ignore[no-any-return]
    except UnicodeEncodeError:
        return msgpack.packb(_replace_surrogates(message))  # type: ignore[no-any-return]


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list | tuple):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def encode_request(msgid: int, method: str, params: list[Any] | tuple[Any, ...]) -> bytes:
    return msgpack.packb([REQUEST, msgid, method, list(params)])  # type: ignore[no-any-return]


def encode_response(msgid: int | None, error: Any, result: Any) -> bytes:
    return _pack([RESPONSE, msgid, error, result])


def encode_notification(method: str, params: list[Any]) -> bytes:
    return _pack([NOTIFICATION, method, params])
