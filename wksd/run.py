"""Running the daemon from the command line: configuration, logging, signals."""

from __future__ import annotations

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

__all__ = ["run_daemon"]

log = structlog.get_logger("wksd")

#: EX_UNAVAILABLE from sysexits.h: the socket could not be bound, or another
#: daemon uses the state directory.
EX_UNAVAILABLE: Final = 69
#: EX_DATAERR: the state directory holds a damaged file.
EX_DATAERR: Final = 65
#: EX_CANTCREAT: the state directory cannot be made, locked or read.
EX_CANTCREAT: Final = 73


#: What stops the daemon before it serves: (exception, what to say, exit status),
#: the first that matches wins. Each is one line on stderr.
_START_FAILURES: Final[tuple[tuple[type[Exception], str, int], ...]] = (
    (ConfigError, "invalid configuration: ", EX_CONFIG),
    (StateDirInUse, "", EX_UNAVAILABLE),
    (CorruptState, "the state directory is damaged: ", EX_DATAERR),
    (OSError, "cannot use the state directory: ", EX_CANTCREAT),
)


def run_daemon(argv: Sequence[str]) -> int:
    """Serve until a signal; the exit status (0, or 65, 69, 73, 78 from sysexits.h)."""
    try:
        config = load_config(argv)
        configure_logging(config.log_level, config.log_format)
        daemon = Daemon(config)  # replays the state directory
    except Exception as exc:
        for kind, saying, status in _START_FAILURES:
            if isinstance(exc, kind):
                print(f"wksd: {saying}{exc}", file=sys.stderr)
                return status
        raise
    try:
        trio.run(_serve, daemon)
    except OSError as exc:
        log.error("cannot serve", socket=config.socket, error=str(exc))
        return EX_UNAVAILABLE
    return 0


async def _serve(daemon: Daemon) -> None:
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
            await daemon.run()
            nursery.cancel_scope.cancel()
