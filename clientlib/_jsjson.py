"""``JSON.stringify`` in Python, byte for byte, for the seed's cache keys.

The seed app keys its API cache by ``md5(JSON.stringify(req.query))``; a
worker hashing the same parameters must produce the same text. Python's
``json.dumps`` differs from JavaScript in four places, and this module
writes what node writes in each:

* Key order. A JavaScript object lists its integer-like keys (array
  indices: ``"0"`` ... ``"4294967294"``, written without leading zeros) first,
  in ascending numeric order, then every other key in insertion order. A
  Python dict keeps insertion order for all keys, so ``{"b": 1, "2": 2}`` is
  reordered to ``{"2":2,"b":1}``. Keys that are not strings become the
  string JavaScript's ``String(key)`` gives (``1`` -> ``"1"``, ``1.0`` ->
  ``"1"``, ``True`` -> ``"true"``, ``None`` -> ``"null"``); two keys that
  become the same string (``1`` and ``"1"``) are a ``ValueError``, since a
  JavaScript object cannot hold both.
* Numbers. Every Python ``int`` and ``float`` is a JavaScript Number (an
  IEEE double), printed as ``Number.prototype.toString`` prints it: the
  shortest digits that round-trip, plain notation from 1e-6 up to below
  1e21, exponent notation (``1e+21``, ``1.5e-7``) outside it. So ``1.0`` is
  ``1``, ``-0.0`` is ``0``, and ``2**64`` is ``18446744073709552000``, the
  double it rounds to. NaN, the infinities and ints too large for a double
  are ``null``, as ``JSON.stringify`` writes non-finite numbers.
* Strings. Escaped as ``JSON.stringify`` escapes them (node 12 and later):
  ``\\"`` ``\\\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t``, other controls as
  ``\\u00XX``, lone surrogates as ``\\udXXX`` (lowercase hex), everything else
  as itself. A surrogate pair held as two code points in a Python ``str`` is
  one astral character in JavaScript and is written as that character.
* No spaces.

``bool``, ``None``, ``list`` and ``tuple`` map to ``true``, ``false``,
``null`` and arrays; any other type is a ``TypeError``, as in ``json``
(JavaScript would silently drop or stringify things Python has no JSON
form for, and a key built from such a guess would match nothing). Circular
values are a ``ValueError``, as in ``json``.

Most cache parameters (string keys that are not integer-like, strings,
small ints) need none of the above, and for them the text is exactly what
the C ``json`` encoder writes: a quick check sends such values there, and
everything else through the careful walk below.
"""

from __future__ import annotations

import json
import math
import re
from json.encoder import encode_basestring
from typing import Any

__all__ = ["stringify"]

#: Largest array index JavaScript orders first: indices are below 2**32 - 1.
MAX_ARRAY_INDEX = 4_294_967_294
#: Ints up to this size are doubles exactly, so ``str(n)`` is what JavaScript prints.
MAX_SAFE_INTEGER = 2**53
#: Depth the quick check looks into before handing a value to the careful
#: walk, which also catches circular values the check does not look for.
QUICK_CHECK_DEPTH = 32

_SURROGATE = re.compile("[\ud800-\udfff]")
# The C encoder, set up as JSON.stringify writes: no spaces, non-ASCII as is.
_C_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def stringify(value: Any) -> str:
    """The text JavaScript's ``JSON.stringify`` gives for ``value``."""
    if _is_plain(value, 0):
        return _C_ENCODER.encode(value)
    parts: list[str] = []
    _write(value, parts, set())
    return "".join(parts)


def _is_plain(value: Any, depth: int) -> bool:
    """True when ``json`` already writes ``value`` as JavaScript does."""
    kind = type(value)
    if kind is str:
        return value.isascii() or _SURROGATE.search(value) is None
    if kind is int:
        safe: bool = -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
        return safe
    if value is None or kind is bool:
        return True
    if depth >= QUICK_CHECK_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or key.isdigit() or not _is_plain(key, depth):
                return False
            if not _is_plain(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_is_plain(item, depth + 1) for item in value)
    return False


def _write(value: Any, parts: list[str], open_ids: set[int]) -> None:
    """Append the JSON text of ``value`` to ``parts``."""
    if isinstance(value, str):
        parts.append(_string(value))
    elif value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, int | float):
        parts.append(_number(value) or "null")  # JSON.stringify writes NaN and Infinity so
    elif isinstance(value, dict | list | tuple):
        marker = id(value)
        if marker in open_ids:
            raise ValueError("Circular reference detected")
        open_ids.add(marker)
        if isinstance(value, dict):
            _write_object(value, parts, open_ids)
        else:
            _write_array(value, parts, open_ids)
        open_ids.discard(marker)
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _write_array(items: list[Any] | tuple[Any, ...], parts: list[str], open_ids: set[int]) -> None:
    parts.append("[")
    for index, item in enumerate(items):
        if index:
            parts.append(",")
        _write(item, parts, open_ids)
    parts.append("]")


def _write_object(obj: dict[Any, Any], parts: list[str], open_ids: set[int]) -> None:
    parts.append("{")
    for index, (name, item) in enumerate(_ordered_members(obj)):
        if index:
            parts.append(",")
        parts.append(_string(name))
        parts.append(":")
        _write(item, parts, open_ids)
    parts.append("}")


def _ordered_members(obj: dict[Any, Any]) -> list[tuple[str, Any]]:
    """The members of ``obj`` with JavaScript's key names, in JavaScript's order."""
    members = [(_key_name(key), item) for key, item in obj.items()]
    names = {name for name, _ in members}
    if len(names) != len(members):
        raise ValueError(f"keys of {obj!r:.200} collide as JavaScript property names")
    indices: list[tuple[int, str, Any]] = []
    rest: list[tuple[str, Any]] = []
    for name, item in members:
        if _is_array_index(name):
            indices.append((int(name), name, item))
        else:
            rest.append((name, item))
    if not indices:
        return rest
    indices.sort(key=lambda member: member[0])
    return [(name, item) for _, name, item in indices] + rest


def _key_name(key: Any) -> str:
    """The property name JavaScript's ``String(key)`` gives a Python key."""
    if isinstance(key, str):
        return _whole_pairs(key)
    if key is None:
        return "null"
    if key is True:
        return "true"
    if key is False:
        return "false"
    if isinstance(key, int | float):
        name = _number(key)
        if name is None:  # String(NaN), String(Infinity), String(-Infinity)
            name = "NaN" if key != key else "Infinity" if key > 0 else "-Infinity"
        return name
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _is_array_index(name: str) -> bool:
    """True for a name JavaScript orders first: a canonical array index."""
    return (
        name.isascii()
        and name.isdigit()
        and (name == "0" or name[0] != "0")
        and int(name) <= MAX_ARRAY_INDEX
    )


def _whole_pairs(text: str) -> str:
    """``text`` with each surrogate pair joined into its astral character."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _string(text: str) -> str:
    """``text`` as a JSON string literal, escaped as ``JSON.stringify`` does."""
    text = _whole_pairs(text)
    quoted = encode_basestring(text)
    if text.isascii() or _SURROGATE.search(text) is None:
        return quoted
    return _SURROGATE.sub(lambda lone: f"\\u{ord(lone.group()):04x}", quoted)


def _number(value: int | float) -> str | None:
    """``String(value)`` in JavaScript, every Python number being a double; None if not finite."""
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return str(int(value))
        try:
            value = float(value)  # rounds to nearest, as JavaScript reads the digits
        except OverflowError:
            return None  # beyond the largest double: Infinity
    if not math.isfinite(value):
        return None
    if value.is_integer() and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return str(int(value))  # also turns -0.0 into "0"
    return _shortest(value)


def _shortest(value: float) -> str:
    """Number::toString for a finite double: Python's ``repr`` digits, JavaScript's layout."""
    text = repr(value)
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    significant = digits.lstrip("0")
    # value = 0.<significant> * 10**point
    point = len(whole) + int(exponent or 0) - (len(digits) - len(significant))
    significant = significant.rstrip("0")
    count = len(significant)
    if count <= point <= 21:
        return sign + significant + "0" * (point - count)
    if 0 < point <= 21:
        return sign + significant[:point] + "." + significant[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + significant
    power = point - 1
    head = significant[0] + ("." + significant[1:] if count > 1 else "")
    return f"{sign}{head}e{'+' if power >= 0 else '-'}{abs(power)}"
