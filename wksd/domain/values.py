r"""Stored values: JSON bytes, as the seed's TypeScript app reads and writes them.

Lone surrogates. ``JSON.stringify`` escapes a lone UTF-16 surrogate as
``"\ud83d"``, and Python's json reads that back as a str no encoder will take
(msgpack and UTF-8 refuse it), so an answer holding one could not be sent.
``decode`` therefore gives U+FFFD in place of each lone surrogate, in keys
and values at any depth; a proper pair (``"\ud83d\ude00"``) is one
character, as in JavaScript. It does so in the JSON text, before parsing:
each lone surrogate escape becomes ``\ufffd`` (``_ESCAPES``, one pass at C
speed). The stored bytes are left as they are until the value is written
again. Only a value whose bytes hold a surrogate escape
(``_SURROGATE_ESCAPE``) is rewritten, so the others cost one regex search.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from typing import Any, Final

import structlog

from clientlib.errors import BadRequest, TooLarge

__all__ = [
    "MAX_SAFE_INTEGER",
    "MAX_STATE_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_VALUE_BYTES",
    "Decoded",
    "decode",
    "encode",
    "ttl_ms",
]

log = structlog.get_logger("wksd.values")

#: A stored value (session data, cache value, workflow data) may be this large
#: once encoded (DESIGN section 3). A Redis string could hold far more, but
#: every value crosses the socket and is copied several times on the way.
MAX_VALUE_BYTES: Final = 1024 * 1024

#: A workflow's current step and error message may be this long: room for a
#: stack trace, far from the value limit.
MAX_TEXT_BYTES: Final = 64 * 1024

#: JavaScript's Number.MAX_SAFE_INTEGER: integers are shared with the seed's
#: app, which is exact only up to here. A larger one in a request is refused;
#: one in stored data is not a number a JavaScript program wrote, and is read
#: as no number at all.
MAX_SAFE_INTEGER: Final = 2**53 - 1

#: A whole workflow state: 1 MiB of data plus its fields (two texts, ids and
#: numbers), so a state whose data is at the value limit is still stored.
MAX_STATE_BYTES: Final = MAX_VALUE_BYTES + 4 * MAX_TEXT_BYTES


def encode(value: Any, what: str = "value", limit: int = MAX_VALUE_BYTES) -> bytes:
    """Compact JSON, as JSON.stringify writes it; BAD_REQUEST or TOO_LARGE.

    Numbers, booleans and nil as map keys become strings, as JSON (and the
    TypeScript app) has no other kind; bytes are refused, as are NaN and
    Infinity, which JSON cannot express.
    """
    try:
        raw = _ENCODER.encode(value).encode()
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what} is not JSON: {exc}") from None
    if len(raw) > limit:
        raise TooLarge(f"{what} is {len(raw)} bytes encoded; the limit is {limit}")
    return raw


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} has no JSON form")


#: ``encode``'s encoder, built once: ``json.dumps`` with options builds one
#: per call: a session value encoded in 2.8 µs that way, in 2.0 µs so.
_ENCODER: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_refuse
)


#: A JSON escape of a UTF-16 surrogate (U+D800 to U+DFFF), in either case.
#: It can match an escaped backslash followed by "ud83d" too: that value is
#: then repaired for nothing, and comes out unchanged.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]")
#: In the JSON text, left to right: an escaped backslash (kept, so the "u"
#: after it is not read as an escape), a high surrogate escape followed by a
#: low one (a proper pair, kept), or any other surrogate escape (lone).
_ESCAPES: Final = re.compile(
    rb"\\\\"
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
#: The escape of U+FFFD, what JavaScript's TextEncoder (and so ioredis)
#: writes for a lone surrogate.
_REPLACEMENT_ESCAPE: Final = rb"\ufffd"
#: The length of one \uXXXX escape: a match this long is a lone surrogate.
_ONE_ESCAPE: Final = 6


def decode(raw: bytes) -> Any:
    """A stored value, lone surrogates as U+FFFD; nil when it is not JSON.

    The seed's app reads with ``data ? JSON.parse(data) : null``, so the empty
    string its ``setex(key, ttl, undefined)`` writes is no value; bytes that
    are not JSON at all (another program's) are no value either, rather than
    an error every reader of the key would get (DESIGN 3.1). Logged at debug
    level only: a client could otherwise fill the log by reading such a key.
    """
    if _SURROGATE_ESCAPE.search(raw) is not None:
        raw = _ESCAPES.sub(_repair, raw)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        if raw:
            log.debug("stored value read as nil", reason=type(exc).__name__, size=len(raw))
        return None


class Decoded:
    """``decode`` with a memory: the decoded form of the values last read, by key.

    A hot key read again and again holds the same bytes each time, so its
    reads need not parse JSON each time: the bytes read are compared with the
    bytes decoded last time (a memcmp, where ``json.loads`` of a 300-byte
    session takes microseconds), and only a value that changed is decoded
    again. ``decode`` is a pure function of the bytes, so this answers exactly
    what it would. The answer is shared between readers: it goes to the wire
    and must never be changed. Bounded: at most ``max_bytes`` of JSON, the
    least recently read out first, and no value over a sixteenth of that.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[str, tuple[bytes, Any]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._values)

    def __call__(self, key: str, raw: bytes | None) -> Any:
        """``key`` holds ``raw`` (None: nothing): its value, as ``decode`` gives it."""
        known = self._values.get(key)
        if known is not None:
            if known[0] is raw or known[0] == raw:
                self._values.move_to_end(key)
                return known[1]
            del self._values[key]
            self.bytes -= len(known[0])
        if raw is None:
            return None
        value = decode(raw)
        if len(raw) <= self.max_bytes // 16:
            self._values[key] = (raw, value)
            self.bytes += len(raw)
            while self.bytes > self.max_bytes:
                _, (dropped, _) = self._values.popitem(last=False)
                self.bytes -= len(dropped)
        return value


def _repair(match: re.Match[bytes]) -> bytes:
    escape = match.group()
    return _REPLACEMENT_ESCAPE if len(escape) == _ONE_ESCAPE else escape


def ttl_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, never zero (Redis refuses PX 0)."""
    return max(1, math.ceil(seconds * 1000))
