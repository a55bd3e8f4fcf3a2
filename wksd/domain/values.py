"""Stored values: JSON bytes, as the seed's TypeScript app reads and writes them."""

from __future__ import annotations

import json
import math
from typing import Any, Final

from clientlib.errors import BadRequest, InternalError, TooLarge

__all__ = ["MAX_STATE_BYTES", "MAX_TEXT_BYTES", "MAX_VALUE_BYTES", "decode", "encode", "ttl_ms"]

#: A stored value (session data, cache value, workflow data) may be this large
#: once encoded (DESIGN section 3). A Redis string could hold far more, but
#: every value crosses the socket and is copied several times on the way.
MAX_VALUE_BYTES: Final = 1024 * 1024

#: A workflow's current step and error message may be this long: room for a
#: stack trace, far from the value limit.
MAX_TEXT_BYTES: Final = 64 * 1024

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
        raw = json.dumps(
            value,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_refuse,
        ).encode()
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what} is not JSON: {exc}") from None
    if len(raw) > limit:
        raise TooLarge(f"{what} is {len(raw)} bytes encoded; the limit is {limit}")
    return raw


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} has no JSON form")


def decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise InternalError("a stored value is not valid JSON") from None


def ttl_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, never zero (Redis refuses PX 0)."""
    return max(1, math.ceil(seconds * 1000))
