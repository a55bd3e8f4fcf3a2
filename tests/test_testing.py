"""wksd.testing: the real daemon in a thread of the test process.

``TestDaemon`` is imported into this module on purpose: pytest must not try
to collect it as a test class (it would warn, and warnings are errors here).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest
import structlog

from clientlib import Client, Full
from wksd.testing import TestDaemon, running_daemon, wksd_daemon  # noqa: F401

DAEMON_THREAD = "wksd-test-daemon"


def assert_stopped(threads_before: int, path: str) -> None:
    """No daemon thread is left, and neither is the socket or its directory."""
    assert not any(thread.name == DAEMON_THREAD for thread in threading.enumerate())
    # <=, not ==: an idle worker thread of an earlier test may have ended meanwhile.
    assert threading.active_count() <= threads_before
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))


@pytest.fixture
def unconfigured_structlog() -> Iterator[None]:
    """structlog as a program that never configured it has it; put back after."""
    saved, was_configured = structlog.get_config(), structlog.is_configured()
    structlog.reset_defaults()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


def test_running_daemon_serves_the_sync_client() -> None:
    """running_daemon yields a short socket path the sync client uses, and cleans up."""
    before = threading.active_count()
    with running_daemon() as path:
        assert len(os.fsencode(path)) < 107 and path.startswith("/tmp/")
        with Client(path) as c:
            assert c.ping() == "PONG"
            assert c.health().backend == "memory"
            c.set_session("u1", {"role": "admin"})
            assert c.get_session("u1") == {"role": "admin"}
    assert_stopped(before, path)


async def test_test_daemon_serves_the_async_client_under_trio() -> None:
    """A TestDaemon started and stopped from a trio task serves an AsyncClient."""
    before = threading.active_count()
    with TestDaemon() as daemon:
        path = daemon.path
        async with daemon.async_client() as c:
            assert await c.ping() == "PONG"
            state = await c.start_workflow_tracking("exec-1", "wf", 2)
            assert state.status == "running"
    assert_stopped(before, path)


def test_test_daemon_serves_the_async_client_under_asyncio() -> None:
    """A TestDaemon serves an AsyncClient running under asyncio."""
    before = threading.active_count()

    async def scenario(daemon: TestDaemon) -> None:
        async with daemon.async_client(timeout=2) as c:
            assert await c.lock_workflow_execution("e1", "w1") is True
            assert (await c.is_workflow_locked("e1")).worker_id == "w1"

    with TestDaemon() as daemon:
        path = daemon.path
        asyncio.run(scenario(daemon))
    assert_stopped(before, path)


def test_a_test_daemon_starts_again_fresh() -> None:
    """One TestDaemon may be started after it stopped, and each start is an empty daemon."""
    before = threading.active_count()
    daemon = TestDaemon()
    paths = []
    for _ in range(2):
        daemon.start()
        paths.append(daemon.path)
        with daemon.client() as c:
            assert c.get_session("u1") is None
            c.set_session("u1", {"n": 1})
        daemon.stop()
        assert not daemon.running
    daemon.stop()  # stopping a stopped daemon does nothing
    for path in paths:
        assert_stopped(before, path)
    with pytest.raises(RuntimeError, match="not running"):
        _ = daemon.path


def test_running_daemons_one_after_another() -> None:
    """running_daemon may be used twice in a row, each time on a new socket."""
    before = threading.active_count()
    with running_daemon() as first, Client(first) as c:
        assert c.ping() == "PONG"
    with running_daemon() as second, Client(second) as c:
        assert c.ping() == "PONG"
    assert first != second
    assert_stopped(before, first)
    assert_stopped(before, second)


def test_config_overrides_reach_the_daemon() -> None:
    """Keyword arguments are Config fields; an unknown one is a TypeError."""
    with running_daemon(memory_max_keys=1) as path, Client(path) as c:
        c.set_session("u1", {})
        with pytest.raises(Full):
            c.set_session("u2", {})
    before = threading.active_count()
    with pytest.raises(TypeError, match="no_such_setting"):
        TestDaemon(no_such_setting=1).start()
    assert threading.active_count() <= before


def test_a_stopped_client_sees_the_daemon_gone() -> None:
    """After stop, the socket refuses: a client gets DaemonUnavailable, not a hang."""
    from clientlib import DaemonUnavailable

    with running_daemon() as path:
        pass
    with Client(path, timeout=2) as c, pytest.raises(DaemonUnavailable):
        c.ping()


def test_daemon_logs_stay_out_of_the_output(
    unconfigured_structlog: None, capfd: pytest.CaptureFixture[str]
) -> None:
    """With structlog unconfigured, the daemon's info lines are not printed and the
    configuration is put back afterwards."""
    with running_daemon() as path, Client(path) as c:
        assert c.ping() == "PONG"
    out, err = capfd.readouterr()
    assert "serving" not in out + err and "stopping" not in out + err
    assert not structlog.is_configured()


def test_a_users_structlog_configuration_is_left_alone(unconfigured_structlog: None) -> None:
    """When the user configured structlog, the daemon logs through that configuration."""
    with structlog.testing.capture_logs() as logs, running_daemon() as path, Client(path) as c:
        assert c.ping() == "PONG"
    assert "serving" in [entry["event"] for entry in logs]


def test_the_pytest_fixture_gives_a_running_daemon(wksd_daemon: TestDaemon) -> None:  # noqa: F811
    """The wksd_daemon fixture is a running TestDaemon, stopped after the test."""
    assert wksd_daemon.running
    with wksd_daemon.client() as c:
        assert c.ping() == "PONG"
