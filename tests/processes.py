"""Running the real ``wksd`` binary for tests: start, wait until it serves, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import pytest

from .polling import wait_until

#: How long a daemon may take to start serving on a loaded CI machine.
START_TIMEOUT = 15.0


def require_binary(name: str) -> str:
    """The path of a tool the test needs; skips with the reason when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def wait_until_serving(
    path: str, process: subprocess.Popen[bytes] | None = None, timeout: float = START_TIMEOUT
) -> None:
    """Poll the socket with a deadline until it accepts a connection."""

    def serving() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"wksd exited with {process.returncode} before serving")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return False
        return True

    wait_until(serving, timeout, f"wksd to serve on {path}")


class DaemonProcess:
    """A ``python -m wksd`` child serving on ``path``."""

    def __init__(self, path: str, env: Mapping[str, str] | None = None, *args: str) -> None:
        self.path = path
        self.args = args
        self.env = {**os.environ, "WKSD_LOG_LEVEL": "warning", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: a pipe nobody reads would block a chatty daemon.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()

    def start(self) -> DaemonProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wksd", "--socket", self.path, *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_serving(self.path, self.process)
        except BaseException:
            self.process.kill()  # a daemon that never served is not left behind
            self.process.wait()
            raise
        return self

    @property
    def output(self) -> str:
        """Everything the daemon has logged so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the daemon and wait for it; its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the daemon to exit by itself; its exit status."""
        assert self.process is not None
        return self.process.wait(timeout)

    def close(self) -> None:
        """Stop the daemon if it runs, and drop its log."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self._log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.stop()
