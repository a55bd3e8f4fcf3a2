"""The processes under test: a redis-server with AOF, and restartable daemons.

Redis runs with ``appendonly yes`` and ``appendfsync always`` in its own
directory (``RedisServer(aof=True)``), so a SIGKILL and restart keeps
everything Redis acknowledged: a key missing after a Redis restart is then
wksd's loss, not Redis's, which is what the checker measures. Each daemon is
a ``DaemonProcess`` with its own state directory (one daemon per directory,
DESIGN 5.1) and a log file beside it, kept for reading after a failed run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

from ..processes import ROOT, DaemonProcess

#: WKSD_REDIS_TIMEOUT: short, so a frozen Redis is noticed within a third of a
#: second and the clients see latency, never an error.
REDIS_TIMEOUT = 0.3

#: WKSD_REDIS_RETRY_MAX: the cap of the reconnect backoff, so a restarted Redis
#: is found again within half a second and the settle phase stays short.
REDIS_RETRY_MAX = 0.5


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a load process: the repository importable, plus ``extra``."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        **(extra or {}),
    }


class ChaosDaemon(DaemonProcess):
    """One daemon on ``directory``/wksd.sock, restarted in place as often as asked.

    ``redis_url`` None is the embedded default (no Redis). ``state_dir`` is
    passed as WKSD_STATE_DIR whether or not this daemon knows the setting yet;
    ``durable`` False passes it empty (memory only): the negative control, in
    which the checker must find losses.
    """

    def __init__(
        self,
        name: str,
        directory: Path,
        redis_url: str | None,
        *,
        fail_closed: bool = False,
        fsync: str = "everysec",
        durable: bool = True,
    ) -> None:
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self.state_dir = directory / "state"
        self.state_dir.mkdir(exist_ok=True)
        env = {
            "WKSD_STATE_DIR": str(self.state_dir) if durable else "",
            "WKSD_FSYNC": fsync,
            "WKSD_REDIS_TIMEOUT": str(REDIS_TIMEOUT),
            "WKSD_REDIS_RETRY_MAX": str(REDIS_RETRY_MAX),
            "WKSD_LOCKS_FAIL_CLOSED": "1" if fail_closed else "0",
        }
        if redis_url is None:
            env["REDIS_ENABLED"] = "0"
        else:
            env.update(REDIS_ENABLED="1", REDIS_URL=redis_url)
        super().__init__(str(directory / "wksd.sock"), env, log_path=directory / "wksd.log")

    def close(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon if it runs (the run is over: nothing to drain), close its log."""
        super().close(sig)
