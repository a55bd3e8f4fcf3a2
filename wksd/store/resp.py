"""RESP, Redis's wire format: commands packed into bytes, replies parsed from them.

Both halves are hiredis's and redis-py's, used without a connection of
theirs (wksd's links are trio streams): commands are packed by hiredis's
``pack_command`` (0.2 µs for a GET, where redis-py's ``Connection.pack_command``
takes 3 µs: it was the link's largest cost after the system calls), replies
parsed by a ``hiredis.Reader``. An argument hiredis does not take (a
``bytearray``; a None or a bool, which no command should carry) goes to
redis-py's packer, which takes the first and answers the others with its
``DataError``, so the bytes and the errors are redis-py's either way.

An error reply becomes the exception class redis-py raises for it
(``NoScriptError``, ``ReadOnlyError``, ``AuthenticationError`` and so on), so
callers catch the same classes whichever client talked to Redis; the
mapping is redis-py's ``BaseParser.parse_error``.

``BaseParser`` lives in the private module ``redis._parsers``. This is the
only module of wksd that imports it, so a redis-py release that moves it
breaks one import here, and ``pyproject.toml`` bounds ``redis`` below the
next major version, where it could move unannounced.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.connection import Connection
from redis.exceptions import InvalidResponse

__all__ = ["is_push", "pack", "reply_reader"]

# Used for its encoder only (the arguments hiredis does not take); it never connects.
_ENCODER = Connection()


def pack(*args: Any) -> bytes:
    """One command as RESP."""
    try:
        return hiredis.pack_command(args)  # type: ignore[no-any-return]
    except TypeError:
        return b"".join(_ENCODER.pack_command(*args))


def reply_reader() -> hiredis.Reader:
    """A parser for one connection's replies: feed it bytes, ``gets()`` a reply
    at a time (False until one is whole). Error replies come out as redis-py's
    exceptions, bytes that are not RESP raise ``InvalidResponse``."""
    return hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)


def is_push(reply: Any) -> bool:
    """Whether a parsed reply is a RESP3 push (``>``), not a command's reply."""
    return type(reply) is hiredis.PushNotification
