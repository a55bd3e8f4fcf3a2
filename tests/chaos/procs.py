"""The processes under test: a redis-server with AOF, and restartable daemons.

Redis runs with ``appendonly yes`` and ``appendfsync always`` in its own
directory, so a SIGKILL and restart keeps everything Redis acknowledged: a
key missing after a Redis restart is then wksd's loss, not Redis's, which is
what the checker measures. Each daemon gets its own state directory (one
daemon per directory, DESIGN 5.1) and logs to a file beside it, kept for
reading after a failed run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from ..processes import wait_until_serving
from ..redis_server import RedisServer

#: The repository root: the daemon and the load processes run from here, so
#: ``wksd`` and ``tests.chaos`` import as they do for pytest.
ROOT = Path(__file__).resolve().parents[2]

#: WKSD_REDIS_TIMEOUT: short, so a frozen Redis is noticed within a third of a
#: second and the clients see latency, never an error.
REDIS_TIMEOUT = 0.3

#: WKSD_REDIS_RETRY_MAX: the cap of the reconnect backoff, so a restarted Redis
#: is found again within half a second and the settle phase stays short.
REDIS_RETRY_MAX = 0.5

#: How long a daemon may take to exit after SIGTERM before it counts as hung
#: (and is killed): its shutdown grace plus a margin for a loaded machine.
STOP_TIMEOUT = 20.0


def durable_redis(directory: Path, port: int | None = None) -> RedisServer:
    """A redis-server that loses nothing it acknowledged across SIGKILL."""
    return RedisServer(directory, "--appendonly", "yes", "--appendfsync", "always", port=port)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: the repository importable, plus ``extra``."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        **(extra or {}),
    }


class ChaosDaemon:
    """One ``python -m wksd`` on ``socket``, restarted in place as often as asked.

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
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket = str(directory / "wksd.sock")
        self.state_dir = directory / "state"
        self.state_dir.mkdir(exist_ok=True)
        env = {
            "WKSD_LOG_LEVEL": "warning",
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
        self.env = child_env(env)
        self.log_path = directory / "wksd.log"
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.starts += 1
        self._log.write(f"--- start {self.starts}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wksd", "--socket", self.socket],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_serving(self.socket, self.process)
        except BaseException:
            self.kill()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait for it; its exit status (None if it was not running)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int) -> int | None:
        status = self.stop(sig)
        self.start()
        return status

    def close(self) -> None:
        """Kill the daemon if it runs, and close its log."""
        try:
            self.kill()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
