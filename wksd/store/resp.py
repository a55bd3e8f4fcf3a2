"""RESP, Redis's wire format: commands packed into bytes, replies parsed from them.

Both halves are redis-py's and hiredis's, used without a connection of
theirs (wksd's links are trio streams): commands are packed by redis-py's
``Connection.pack_command`` (with hiredis when it is installed), replies
parsed by a ``hiredis.Reader``. An error reply becomes the exception class
redis-py raises for it (``NoScriptError``, ``ReadOnlyError``, ``AuthenticationError``
and so on), so callers catch the same classes whichever client talked to
Redis; the mapping is redis-py's ``BaseParser.parse_error``.

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

# Used for its encoder only; it never connects.
_ENCODER = Connection()


def pack(*args: Any) -> list[bytes]:
    """One command as RESP, in chunks to write one after another."""
    chunks: list[bytes] = _ENCODER.pack_command(*args)
    return chunks


def reply_reader() -> hiredis.Reader:
    """A parser for one connection's replies: feed it bytes, ``gets()`` a reply
    at a time (False until one is whole). Error replies come out as redis-py's
    exceptions, bytes that are not RESP raise ``InvalidResponse``."""
    return hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)


def is_push(reply: Any) -> bool:
    """Whether a parsed reply is a RESP3 push (``>``), not a command's reply."""
    return type(reply) is hiredis.PushNotification
