"""The real daemon inside your test process, for testing your workers.

``running_daemon()`` (or a ``TestDaemon``) runs ``wksd`` itself, on its
in-memory store, in a background thread of the test process, serving on a
Unix socket in a fresh temporary directory. No ``wksd`` binary, no Redis, no
port; every start is a fresh, empty daemon.

    from clientlib import Client
    from wksd.testing import running_daemon

    def test_worker_records_progress():
        with running_daemon() as path, Client(path) as client:
            run_my_worker(socket=path)
            assert client.fetch_workflow_state("exec-1").progress == 100

With pytest, import the ``wksd_daemon`` fixture into a test module or
``conftest.py``; it gives each test its own ``TestDaemon``:

    from wksd.testing import wksd_daemon  # noqa: F401

    def test_worker(wksd_daemon):
        with wksd_daemon.client() as client:
            assert client.ping() == "PONG"

Keyword arguments are ``wksd.config.Config`` fields (``memory_max_keys=10``,
``workflow_stale_after=1``...); environment variables (``WKSD_*``) are not
read, so the daemon under test is the same wherever the tests run. It never
takes a socket from systemd or talks to ``$NOTIFY_SOCKET``.

Logs: the daemon logs through structlog. If structlog is not configured when
a daemon starts, it is configured for as long as test daemons run to print
warnings and errors only (``log_level``, default ``"warning"``), as console
lines on ``sys.stderr`` (which pytest captures), and put back unconfigured
when the last one stops. If your code configured structlog, that
configuration is left alone and decides what the daemon's logs do.

This module is the daemon's (it imports trio, redis-py and structlog): it is
for tests, and ``clientlib`` imports nothing of it (it was
``clientlib.testing`` until the client library stopped importing ``wksd``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TextIO, cast

import structlog
import trio

from clientlib import Client

from .app import Daemon
from .config import Config
from .logs import configure_logging
from .server import bind_unix_socket
from .systemd import Notifier

if TYPE_CHECKING:
    from clientlib import AsyncClient

    #: The pytest fixture; made by ``__getattr__`` when first imported.
    wksd_daemon: Callable[[], Iterator[TestDaemon]]

__all__ = ["TestDaemon", "running_daemon", "wksd_daemon"]

#: How long the daemon may take to start serving, or to stop, on a loaded CI
#: machine; it takes milliseconds.
START_TIMEOUT: Final = 15.0
#: Stopping waits for connections to answer (``shutdown_timeout``, 10 s by
#: default) and then for the thread; this covers both.
STOP_TIMEOUT: Final = 30.0
#: Where the socket's directory goes: /tmp keeps the path far below the 107
#: bytes of sockaddr_un, where a deep $TMPDIR or pytest's tmp_path may not.
_SOCKET_PARENT: Final = "/tmp"


class TestDaemon:
    """A wksd daemon serving in a thread of this process.

    ``start()`` returns once it serves on ``path``; ``stop()`` drains it, ends
    the thread and removes the socket and its directory. Use it as a context
    manager for both. It may be started again after it stopped (a fresh,
    empty daemon each time).
    """

    __test__ = False  # a helper, not a pytest test class despite its name

    def __init__(self, *, log_level: str = "warning", **config_overrides: Any) -> None:
        self._overrides = config_overrides
        self._log_level = log_level
        self._path: str | None = None
        self._directory: str | None = None
        self._thread: threading.Thread | None = None
        self._daemon: Daemon | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._failure: BaseException | None = None
        self._quieted_logs = False

    @property
    def path(self) -> str:
        """The socket the daemon serves on (while it runs)."""
        if self._path is None:
            raise RuntimeError("the TestDaemon is not running")
        return self._path

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> TestDaemon:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> Client:
        """A sync ``Client`` for this daemon (``timeout`` etc. as keywords)."""
        return Client(self.path, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        """An ``AsyncClient`` for this daemon, to enter with ``async with``."""
        from clientlib import AsyncClient  # needs anyio, the "async" extra

        return AsyncClient(self.path, **kwargs)

    def start(self) -> TestDaemon:
        """Start serving; returns once the socket answers."""
        if self._thread is not None:
            raise RuntimeError("the TestDaemon is already running")
        settings: dict[str, Any] = {"log_level": self._log_level, **self._overrides}
        directory = None
        if "socket" not in settings:
            directory = tempfile.mkdtemp(prefix="wksd-", dir=_SOCKET_PARENT)
            settings["socket"] = os.path.join(directory, "wksd.sock")
        try:
            config = Config(**settings)
            # Bound here, not by the daemon: it would otherwise take a socket
            # systemd passed to this process (LISTEN_FDS) and clear those
            # variables from our environment.
            sock = bind_unix_socket(config.socket, config.socket_mode)
        except BaseException:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        self._quieted_logs = _quiet_logs_acquire(self._log_level)
        self._daemon = Daemon(config, listen_socket=sock, notifier=Notifier(environ={}))
        self._path, self._directory, self._failure = config.socket, directory, None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._daemon, started), name="wksd-test-daemon", daemon=True
        )
        self._thread.start()
        if not started.wait(START_TIMEOUT) or self._failure is not None:
            failure = self._failure
            self.stop(raise_failure=False)
            raise RuntimeError("the in-process wksd did not start") from failure
        return self

    def stop(self, *, raise_failure: bool = True) -> None:
        """Drain and stop the daemon, end its thread, remove its socket.

        Does nothing if it is not running. If the daemon failed while it ran,
        that is raised here (unless ``raise_failure`` is false).
        """
        thread, daemon, token = self._thread, self._daemon, self._token
        if thread is None:
            return
        try:
            if daemon is not None and token is not None:
                # run_sync_soon, not trio.from_thread.run_sync: that one refuses
                # to be called from a trio task, and a trio test is one.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(daemon.shutdown)
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"the in-process wksd did not stop within {STOP_TIMEOUT} s")
        finally:
            if not thread.is_alive():
                self._thread = self._daemon = self._token = None
                self._remove_socket()
                if self._quieted_logs:
                    self._quieted_logs = False
                    _quiet_logs_release()
        failure, self._failure = self._failure, None
        if failure is not None and raise_failure:
            raise RuntimeError("the in-process wksd failed") from failure

    def _run(self, daemon: Daemon, started: threading.Event) -> None:
        """The thread: one trio run of the daemon."""
        try:
            trio.run(self._serve, daemon, started)
        except BaseException as exc:  # handed to the test's thread by start() or stop()
            self._failure = exc
        finally:
            started.set()

    async def _serve(self, daemon: Daemon, started: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            started.set()

    def _remove_socket(self) -> None:
        path, directory = self._path, self._directory
        self._path = self._directory = None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        elif path is not None:
            # A socket path the caller chose: remove the socket, nothing else.
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)


@contextlib.contextmanager
def running_daemon(**config_overrides: Any) -> Iterator[str]:
    """Run a ``TestDaemon`` for the ``with`` block; yields its socket path."""
    with TestDaemon(**config_overrides) as daemon:
        yield daemon.path


# -- keeping the daemon's logs out of test output ------------------------------


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_logs_lock = threading.Lock()
_logs_users = 0  # running TestDaemons that configured structlog; guarded by _logs_lock


def _quiet_logs_acquire(level: str) -> bool:
    """Configure structlog at ``level`` unless the user did; whether this daemon counts."""
    global _logs_users
    with _logs_lock:
        if _logs_users == 0:
            if structlog.is_configured():
                return False  # the user's configuration rules
            configure_logging(level, "console", stream=cast(TextIO, _CurrentStderr()))
            # Loggers cached now would keep this configuration after the reset.
            structlog.configure(cache_logger_on_first_use=False)
        _logs_users += 1
        return True


def _quiet_logs_release() -> None:
    """Put structlog back unconfigured once the last daemon that counted stops."""
    global _logs_users
    with _logs_lock:
        _logs_users -= 1
        if _logs_users == 0:
            structlog.reset_defaults()


# -- the pytest fixture, made on first import of its name ----------------------


def _make_fixture() -> Callable[[], Iterator[TestDaemon]]:
    import pytest  # only when asked for: the module works without pytest

    @pytest.fixture
    def wksd_daemon() -> Iterator[TestDaemon]:
        """A fresh in-process daemon for the test, stopped after it."""
        with TestDaemon() as daemon:
            yield daemon

    return wksd_daemon


def __getattr__(name: str) -> Any:
    if name == "wksd_daemon":
        fixture = _make_fixture()
        globals()[name] = fixture
        return fixture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
