"""Running the real ``wksd`` binary as a process: start, wait until it serves, stop.

Theory of operation: ``DaemonProcess`` is the one factory for a daemon process,
used by the pytest fixtures, the chaos suite (which restarts it in place, over
and over) and the benchmarks. It runs ``python -m wksd`` from the repository
root, with the test's environment over the caller's and warnings-only logs,
and returns from ``start`` once the socket accepts a connection. The daemon
logs to a file, never a pipe (a pipe nobody reads would block a chatty
daemon); the file is kept across restarts, and a daemon that never served
says why: its log's last lines are attached to the error.

``metric`` reads one series of a daemon's exposition, for tests that assert
on what the daemon counted rather than on how long something took.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clientlib import Client
from clientlib.errors import WksError

from .polling import wait_until

#: The repository root: daemons run from here, so ``python -m wksd`` imports
#: this checkout's ``wksd`` whoever started it (pytest, the chaos suite, a benchmark).
ROOT = Path(__file__).resolve().parents[1]

#: How long a daemon may take to start serving on a loaded CI machine.
START_TIMEOUT = 15.0

#: How long a daemon may take to exit after a signal before it counts as hung
#: (and is killed): its shutdown grace for draining plus a margin for a loaded machine.
STOP_TIMEOUT = 20.0

#: Lines of a daemon's log shown when it fails to start: the error and its context.
LOG_TAIL_LINES = 20


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


def metric(path: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition of the daemon on ``path`` (0 if absent)."""
    with Client(path) as client:
        exposition = client.metrics()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def reap(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` if a failed assertion left it running, and close its pipes."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


class DaemonProcess:
    """A ``python -m wksd`` child serving on ``path``, started again as often as asked.

    ``log_path`` keeps the log in that file (appended to, each start marked,
    and left behind for reading after a failed run); without it the log is an
    anonymous temporary file, the daemon's lines only. ``new_session`` puts
    the daemon out of reach of the terminal's Ctrl-C, for a caller that stops
    its processes itself, in order. ``preexec_fn`` runs in the child before
    the exec, as ``subprocess.Popen``'s does (to lower a resource limit, say).
    """

    def __init__(
        self,
        path: str,
        env: Mapping[str, str] | None = None,
        *args: str,
        log_path: Path | None = None,
        new_session: bool = False,
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        self.path = path
        self.args = args
        self.env = {**os.environ, "WKSD_LOG_LEVEL": "warning", **(env or {})}
        self.new_session = new_session
        self.preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = log_path
        self.log = self._open_log()

    def _open_log(self) -> IO[bytes]:
        """The log file (appended to), or an anonymous one; closed by ``close``."""
        if self.log_path is not None:
            return self.log_path.open("ab")
        return tempfile.TemporaryFile()

    def start(self) -> DaemonProcess:
        """Start the daemon; return once it serves. One that never did is killed, its
        log closed (its last lines are in the error), as if ``close`` had been called."""
        if self.log.closed:  # started again after close()
            self.log = self._open_log()
        self.starts += 1
        if self.log_path is not None:  # a kept log: where each start begins
            self.log.write(f"--- start {self.starts}\n".encode())
            self.log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wksd", "--socket", self.path, *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
            preexec_fn=self.preexec_fn,
        )
        try:
            wait_until_serving(self.path, self.process)
        except BaseException as exc:
            self.kill()
            exc.add_note(f"wksd's log ends:\n{self.log_tail()}")
            self.close()
            raise
        return self

    def wait_for_backend(self, backend: str, timeout: float = START_TIMEOUT) -> None:
        """Return once the daemon's health says it serves from ``backend``."""

        def serving_from() -> bool:
            try:
                with Client(self.path) as client:
                    return client.health().backend == backend
            except WksError:
                return False

        wait_until(serving_from, timeout, f"wksd on {self.path} to serve from {backend}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.process is not None, "the daemon was never started"
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the daemon and wait for it; its exit status. Killed if it hangs."""
        assert self.process is not None, "the daemon was never started"
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the daemon to exit by itself; its exit status."""
        assert self.process is not None, "the daemon was never started"
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: gone at once, nothing flushed, no closing notice."""
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon with ``sig`` and start it again; the old one's exit status."""
        status = self.stop(sig)
        self.start()
        return status

    @property
    def output(self) -> str:
        """Everything the daemon has logged so far, over all its starts."""
        if self.log_path is not None:  # readable after close() too
            return self.log_path.read_text(errors="replace")
        # pread: the file offset, which the daemon shares and writes at, stays put.
        descriptor = self.log.fileno()
        size = os.fstat(descriptor).st_size
        return os.pread(descriptor, size, 0).decode(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.output.splitlines()[-lines:])

    def close(self, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon with ``sig`` if it runs, and close its log."""
        try:
            if self.running():
                self.stop(sig)
        finally:
            self.log.close()
