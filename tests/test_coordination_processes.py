"""Coordination across processes and daemons, with the real binary, workers and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from clientlib import Client, ComputeFailed, WorkflowEvent
from wksd.keys import KeySpace

from .polling import wait_until
from .processes import DaemonProcess, metric
from .redis_server import RedisServer
from .test_redis_faults import redis_env

#: How long a test waits for the daemon to release a lock: far less than the
#: lock's TTL, so a lock found free was released, not expired.
RELEASE_WAIT = 10.0

#: How long the computing worker's ``fn`` works: long enough that all the
#: racing workers ask while it computes, as they would for a slow API call.
COMPUTE_SECONDS = 0.5

WORKER = textwrap.dedent("""
    import json, sys, time
    from clientlib import Client

    path, key, tally = sys.argv[1], sys.argv[2], sys.argv[3]

    def compute():
        with open(tally, "a") as out:
            out.write("computed\\n")
        time.sleep(float(sys.argv[4]))
        return {"answer": 42}

    with Client(path, timeout=30) as client:
        client.ping()
        print("ready", flush=True)
        sys.stdin.readline()  # go
        print(json.dumps(client.get_or_compute(key, compute, ttl=60)), flush=True)
""")


def race(paths: list[str], tmp_path: Path, processes: int = 8) -> list[dict[str, object]]:
    """``processes`` workers (spread over ``paths``) call get_or_compute together."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tally = tmp_path / "tally"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                paths[i % len(paths)],
                "racy",
                str(tally),
                str(COMPUTE_SECONDS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        for worker in workers:  # as close to together as a loop gets
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        answers = []
        for worker in workers:
            out, err = worker.communicate(timeout=60)
            assert worker.returncode == 0, err
            answers.append(json.loads(out))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    computations = tally.read_text().count("computed")
    assert computations == 1, f"{computations} computations"
    return answers


@pytest.fixture
def two_daemons(
    daemons: Callable[..., DaemonProcess], redis_server: RedisServer
) -> tuple[DaemonProcess, DaemonProcess]:
    """Two daemons sharing one private Redis, each subscribed to the other's news."""
    pair = (daemons(redis_env(redis_server.url)), daemons(redis_env(redis_server.url), "b.sock"))
    for daemon in pair:
        wait_until(lambda d=daemon: pubsub_up(d.path), what="subscribed")
    return pair


def test_eight_processes_racing_get_or_compute_compute_once(
    daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Eight workers ask for a missing value at once through one daemon: one computes."""
    daemon = daemons()
    assert race([daemon.path], tmp_path) == [{"answer": 42}] * 8


def test_one_computation_across_two_daemons(
    two_daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    """Four workers on each of two daemons sharing Redis: one computation in the cluster."""
    first, second = two_daemons
    assert race([first.path, second.path], tmp_path) == [{"answer": 42}] * 8


def pubsub_up(path: str) -> bool:
    with Client(path) as c:
        health = c.health()
    return health.backend == "redis" and health.checks["redis"].get("pubsub") == "up"


def test_a_failure_reaches_the_waiters(daemon_process: DaemonProcess) -> None:
    """fn raises: its caller gets the exception, a waiter ComputeFailed, nothing is cached."""
    computing = threading.Event()
    outcome: list[BaseException] = []

    def failing() -> object:
        computing.set()
        with Client(daemon_process.path) as observer:  # until the waiter is queued
            wait_until(lambda: "wksd_cache_waiters 1.0" in observer.metrics(), what="queued")
        raise ValueError("upstream said no")

    def waiter() -> None:
        computing.wait(10)
        with Client(daemon_process.path) as c:
            try:
                c.get_or_compute("k", lambda: "never", wait=10)
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    with Client(daemon_process.path) as c, pytest.raises(ValueError, match="said no"):
        c.get_or_compute("k", failing)
    thread.join(20)
    assert isinstance(outcome[0], ComputeFailed) and "said no" in outcome[0].message
    with Client(daemon_process.path) as c:
        assert c.get_cached_api_response("k") is None


@pytest.fixture(params=["memory", "redis"])
def any_daemon(
    request: pytest.FixtureRequest, daemons: Callable[..., DaemonProcess]
) -> DaemonProcess:
    """The daemon binary on its memory default, or on a private redis-server."""
    if request.param == "memory":
        return daemons()
    server: RedisServer = request.getfixturevalue("redis_server")
    daemon = daemons(redis_env(server.url))
    daemon.wait_for_backend("redis")
    return daemon


def test_a_sigkilled_worker_frees_its_keepalive_lock_at_once(any_daemon: DaemonProcess) -> None:
    """A worker killed with SIGKILL while holding a keepalive lock: the daemon releases it
    as the connection closes, while nearly all of its 300 s TTL is still to run."""
    path = any_daemon.path
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from clientlib import Client
            c = Client({path!r})
            assert c.lock_workflow_execution("e1", "doomed", ttl=300, keepalive=True)
            print("locked", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "locked\n"
        with Client(path) as c:
            held = c.is_workflow_locked("e1")
            assert metric(path, "wksd_keepalive_locks") == 1
            os.kill(worker.pid, signal.SIGKILL)
            wait_until(lambda: not c.is_workflow_locked("e1").locked, RELEASE_WAIT, "the release")
    finally:
        worker.kill()
        worker.communicate()
    assert held.worker_id == "doomed"
    assert held.ttl is not None and held.ttl > RELEASE_WAIT * 1000  # no expiry within the wait
    assert metric(path, "wksd_keepalive_locks") == 0


def test_execute_with_lock_keeps_the_lock_alive(daemon_process: DaemonProcess) -> None:
    """execute_with_lock takes a keepalive lock: the daemon knows it as kept."""
    with Client(daemon_process.path) as c:
        with c.execute_with_lock("e1", "w1", ttl=30):
            assert "wksd_keepalive_locks 1.0" in c.metrics()
        assert "wksd_keepalive_locks 0.0" in c.metrics()
        assert not c.is_workflow_locked("e1").locked


def test_a_release_through_another_daemon_wakes_the_waiter_by_pubsub(
    two_daemons: tuple[DaemonProcess, DaemonProcess], redis_server: RedisServer
) -> None:
    """Daemon A announces every release on pub/sub, and the waiter queued in daemon B
    tries again on an announcement, which the poll (seeing the same holder) never would."""
    first, second = two_daemons
    granted: list[bool] = []

    def attempts() -> float:
        return metric(second.path, "redis_commands_total", command="lock_acquire")

    def announcements() -> float:
        return metric(first.path, "redis_commands_total", command="PUBLISH")

    def wait_for_lock() -> None:
        with Client(second.path) as c:
            granted.append(c.lock_workflow_execution("e1", "patient", wait=30))

    with Client(first.path) as holder:
        assert holder.lock_workflow_execution("e1", "holder")
        thread = threading.Thread(target=wait_for_lock)
        thread.start()
        wait_until(lambda: metric(second.path, "wksd_lock_waiters") == 1, what="queued")
        tried = attempts()
        with redis_server.client() as direct:  # as if released and taken again meanwhile
            assert direct.publish(KeySpace("wks:").lock_channel, "e1") == 2  # A and B listen
        wait_until(lambda: attempts() > tried, what="the waiter to try again")
        assert metric(second.path, "wksd_lock_waiters") == 1  # refused: the holder has it
        announced = announcements()
        assert holder.unlock_workflow_execution("e1", "holder")
        assert announcements() == announced + 1
        thread.join(30)
    assert granted == [True]


def test_events_cross_daemons_once(
    two_daemons: tuple[DaemonProcess, DaemonProcess], redis_server: RedisServer
) -> None:
    """Changes through daemon A reach a subscriber of daemon B, and A's subscriber once."""
    first, second = two_daemons
    with Client(first.path) as worker, Client(second.path) as other:
        remote = other.subscribe_workflows()
        local = worker.subscribe_workflows("e1")
        worker.start_workflow_tracking("e1", "w", 2)
        worker.update_workflow_progress("e1", 1, "half")
        worker.complete_workflow_tracking("e1", "completed")
        seen_remote = [next(remote) for _ in range(3)]
        seen_local = [next(local) for _ in range(3)]
        remote.close()
        local.close()
        history = other.workflow_events("e1")
    for seen in (seen_remote, seen_local):
        assert [e.type for e in seen] == ["started", "progress", "completed"]
        assert all(isinstance(e, WorkflowEvent) and e.execution_id == "e1" for e in seen)
    assert seen_remote[2].state.progress == 100
    assert [e.type for e in history] == ["started", "progress", "completed"]  # Redis streams
    with redis_server.client() as direct:
        assert direct.xlen("wks:events:workflow:e1") == 3
        assert direct.pttl("wks:events:workflow:e1") > 0


def test_a_subscription_follows_a_daemon_restart(daemon_process: DaemonProcess) -> None:
    """The sync subscription connects and subscribes again after the daemon restarts."""
    with Client(daemon_process.path) as c:
        events = c.subscribe_workflows()
        c.start_workflow_tracking("before", "w", 2)
        assert next(events).execution_id == "before"
        daemon_process.stop()
        daemon_process.start()

        # The subscription notices the closing notice on its next read; start a
        # workflow from a thread once it has resubscribed.
        def later() -> None:
            wait_until(lambda: events.resubscribed == 1, what="resubscribed")
            wait_until(lambda: _subscribed(daemon_process.path), what="subscription")
            with Client(daemon_process.path) as other:
                other.start_workflow_tracking("after", "w", 2)

        thread = threading.Thread(target=later)
        thread.start()
        assert next(events).execution_id == "after"
        thread.join(30)
        events.close()


def _subscribed(path: str) -> bool:
    with Client(path) as c:
        return "wksd_workflow_subscriptions 1.0" in c.metrics()
