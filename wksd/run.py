"""Running the daemon from the command line: configuration, logging, signals.

``run_daemon`` reads the configuration (``--help`` and ``--version`` end
there), sets up logging, builds the ``Daemon`` and serves it under trio
until a signal, or until the log stream closes: a daemon that can no longer
say what it does stops as on SIGTERM (draining) rather than serve unseen,
and exits ``EX_IOERR`` so that systemd's ``Restart=on-failure`` starts it
again with a fresh stream. Each way of failing to start is one line on
stderr and an exit status of sysexits.h.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Final

import structlog
import trio

from .app import Daemon
from .config import EX_CONFIG, ConfigError, load_config
from .logs import configure_logging
from .store.durable import CorruptState, StateDirInUse

__all__ = ["EX_IOERR", "run_daemon"]

log = structlog.get_logger("wksd")

#: EX_UNAVAILABLE from sysexits.h: the socket could not be bound, or another
#: daemon uses the state directory.
EX_UNAVAILABLE: Final = 69
#: EX_DATAERR: the state directory holds a damaged file.
EX_DATAERR: Final = 65
#: EX_CANTCREAT: the state directory cannot be made, locked or read.
EX_CANTCREAT: Final = 73
#: EX_IOERR: stdout, where the logs go, closed under the daemon and stopped it.
EX_IOERR: Final = 74


#: What stops the daemon before it serves: (exception, what to say, exit status),
#: the first that matches wins. Each is one line on stderr.
_START_FAILURES: Final[tuple[tuple[type[Exception], str, int], ...]] = (
    (ConfigError, "invalid configuration: ", EX_CONFIG),
    (StateDirInUse, "", EX_UNAVAILABLE),
    (CorruptState, "the state directory is damaged: ", EX_DATAERR),
    (OSError, "cannot use the state directory: ", EX_CANTCREAT),
)


class LogReaderGone:
    """Turns the log stream's closing into a drain of the daemon.

    It is called by the stream (from any task, a worker thread, or before
    trio runs); ``watch``, a task of the daemon's, asks for the drain.
    """

    def __init__(self) -> None:
        self.gone = False
        #: The closed stream is what stopped the daemon (no signal came first).
        self.stopped_daemon = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._event = trio.Event()

    def __call__(self) -> None:
        self.gone = True
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._event.set)  # safe from any thread

    async def watch(self, daemon: Daemon) -> None:
        """Wait for the stream to close, then drain ``daemon`` unless it already stops."""
        self._token = trio.lowlevel.current_trio_token()
        if not self.gone:
            await self._event.wait()
        if not daemon.stopping:
            self.stopped_daemon = True
            daemon.shutdown()


def run_daemon(argv: Sequence[str]) -> int:
    """Serve until a signal; the exit status (0, or 65, 69, 73, 74, 78 from sysexits.h)."""
    log_reader_gone = LogReaderGone()
    try:
        config = load_config(argv)
        configure_logging(config.log_level, config.log_format, on_closed=log_reader_gone)
        daemon = Daemon(config)  # replays the state directory
    except Exception as exc:
        for kind, saying, status in _START_FAILURES:
            if isinstance(exc, kind):
                print(f"wksd: {saying}{exc}", file=sys.stderr)
                return status
        raise
    try:
        trio.run(_serve, daemon, log_reader_gone)
    except OSError as exc:
        log.error("cannot serve", socket=config.socket, error=str(exc))
        return EX_UNAVAILABLE
    return EX_IOERR if log_reader_gone.stopped_daemon else 0


async def _serve(daemon: Daemon, log_reader_gone: LogReaderGone) -> None:
    """Run the daemon; the first SIGTERM/SIGINT drains it, a second one cuts it short."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        daemon.listen()  # before any nursery, so a bind error is a plain OSError
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    if daemon.stopping:
                        log.warning("second signal; stopping now")
                        nursery.cancel_scope.cancel()
                        return
                    log.info("signal received", signal=signal.Signals(signum).name)
                    daemon.shutdown()

            nursery.start_soon(watch_signals)
            nursery.start_soon(log_reader_gone.watch, daemon)
            await daemon.run()
            nursery.cancel_scope.cancel()
