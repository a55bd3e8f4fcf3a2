"""Logging: structlog, one JSON object per line on stdout (journald keeps them).

Nothing logged carries a value, a session or a password: the daemon logs
method names, codes, peers and counts. A connection's logger has the peer's
pid and uid bound.

The reader of stdout may go away under the daemon (``wksd | head -1``, a
log pipe that dies). The log lines then go through a ``LogStream``: the
first write or flush that meets a ``BrokenPipeError`` points the stream's
file descriptor at /dev/null, so no later line and no flush at exit can
fail (no exception escapes into the task that happened to log), and calls
``on_closed`` once. ``wksd.run`` stops the daemon from there.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO, cast

import structlog

__all__ = ["LogStream", "configure_logging"]


class LogStream:
    """A text stream for log lines that goes quiet, once, when its reader is gone."""

    def __init__(self, stream: TextIO, on_closed: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._on_closed = on_closed
        #: True once the reader went away; nothing is written after that.
        self.closed = False

    def write(self, text: str) -> int:
        if not self.closed:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self.closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed = True
        try:
            # What is still buffered, and the interpreter's flush at exit, go
            # to /dev/null instead of raising BrokenPipeError once more.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stream without a descriptor: nothing to flush
            pass
        if self._on_closed is not None:
            self._on_closed()


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    stream: TextIO | None = None,
    on_closed: Callable[[], None] | None = None,
) -> None:
    """Log at ``level`` in ``fmt`` to ``stream`` (stdout); ``on_closed`` when its reader goes."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # PrintLogger needs only write and flush of its file.
        logger_factory=structlog.PrintLoggerFactory(
            cast(TextIO, LogStream(stream or sys.stdout, on_closed))
        ),
        cache_logger_on_first_use=True,
    )
