"""Redis failures under load, with the real daemon binary and a real redis-server.

Clients are the sync client in threads, as workers use it. Phases move on by
counting acknowledged operations, not by sleeping: "after 200 more writes,
restart Redis".
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from clientlib import Client

from .polling import wait_until
from .processes import DaemonProcess, require_binary
from .redis_server import RedisServer, free_port

#: WKSD_REDIS_TIMEOUT for these tests: short, so an outage is noticed fast.
TIMEOUT = 0.25
#: A request may take the timeout plus this much (DESIGN: "a small margin").
#: Generous, for a loaded CI machine; an unbounded wait would be seconds more.
MARGIN = 1.5


def redis_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "REDIS_ENABLED": "1",
        "REDIS_URL": url,
        "WKSD_REDIS_TIMEOUT": str(TIMEOUT),
        "WKSD_REDIS_RETRY_MAX": "0.5",
        **extra,
    }


def backend(path: str) -> str:
    with Client(path) as c:
        return c.health().backend


def redis_status(path: str) -> str:
    with Client(path) as c:
        return c.health().redis_status


def serving_on_redis(
    daemons: Callable[..., DaemonProcess], url: str, **extra: str
) -> DaemonProcess:
    """Start the daemon on Redis at ``url`` (with ``daemons``, the conftest
    fixture) and wait until Redis serves it."""
    daemon = daemons(redis_env(url, **extra))
    daemon.wait_for_backend("redis")
    return daemon


def two_daemons(daemons: Callable[..., DaemonProcess], url: str) -> list[str]:
    """Two daemons on Redis at ``url``; their socket paths."""
    return [daemons(redis_env(url), name).path for name in ("wksd.sock", "wksd2.sock")]


def in_threads(worker: Callable[[int], None], count: int = 8) -> list[BaseException]:
    """Run ``worker(index)`` for each index in a thread of its own; what they raised."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:  # every error is a test failure, kept to report
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


class Load:
    """Worker threads doing mixed operations, recording what was acknowledged."""

    def __init__(self, path: str, threads: int = 4) -> None:
        self.path = path
        self.threads = [
            threading.Thread(target=self._work, args=(t,), daemon=True) for t in range(threads)
        ]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ops = 0
        self.errors: list[BaseException] = []
        self.max_latency = 0.0
        self.sessions: dict[str, Any] = {}  # key -> last acknowledged value (None: deleted)
        self.workflows: dict[str, int] = {}  # id -> last acknowledged completed steps

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def wait_ops(self, more: int, timeout: float = 60) -> None:
        """Wait until ``more`` operations beyond the current count were acknowledged."""
        target = self.ops + more
        wait_until(lambda: self.ops >= target or bool(self.errors), timeout, f"{target} ops")

    def _timed(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        result = call(*args, **kwargs)
        latency = time.monotonic() - started
        with self.lock:
            self.ops += 1
            self.max_latency = max(self.max_latency, latency)
        return result

    def _work(self, thread: int) -> None:
        workflow = f"load-wf-{thread}"
        try:
            with Client(self.path, timeout=10) as c:
                c.start_workflow_tracking(workflow, "load", 10**9)
                index = 0
                while not self.stopping.is_set():
                    index += 1
                    key = f"load:{thread}:{index % 10}"
                    self._timed(c.set_session, key, {"i": index}, ttl=600)
                    self.sessions[key] = {"i": index}
                    if index % 7 == 0:
                        gone = f"load:{thread}:{(index + 3) % 10}"
                        self._timed(c.delete_session, gone)
                        self.sessions[gone] = None
                    self._timed(c.update_workflow_progress, workflow, index, f"s{index}")
                    self.workflows[workflow] = index
                    with c.execute_with_lock(f"load-lock-{thread}", f"w{thread}", ttl=30):
                        self._timed(c.cache_api_response, f"load-{thread}", index)
        except BaseException as exc:  # every error is a test failure, kept to report
            self.errors.append(exc)

    def check_in_redis(self, direct: redis.Redis) -> None:
        """Every last acknowledged write is what Redis holds now."""
        for key, value in self.sessions.items():
            raw = direct.get(f"wks:session:{key}")
            assert (None if raw is None else json.loads(raw)) == value, key
        for workflow, steps in self.workflows.items():
            assert json.loads(direct.get(f"wks:workflow:{workflow}"))["completedSteps"] == steps


def test_outage_under_load_costs_no_errors_and_loses_nothing(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """Redis killed and restarted under load: no client error; every acknowledged write in Redis."""
    # Redis keeps its own data across the restart (AOF), so what is checked at
    # the end is wksd's part: what was written during the outage came back.
    server = RedisServer(tmp_path / "redis", aof=True).start()
    try:
        daemon = serving_on_redis(daemons, server.url)
        with Load(daemon.path) as load:
            load.wait_ops(200)
            server.kill()
            load.wait_ops(300)  # all of these went to memory
            assert backend(daemon.path) == "memory"
            server.start()
            wait_until(lambda: backend(daemon.path) == "redis", what="switch back to redis")
            load.wait_ops(200)
        assert load.errors == []
        with server.client() as direct:
            load.check_in_redis(direct)
        with Client(daemon.path) as c:
            metrics = c.metrics()
        assert 'wksd_reconciled_keys_total{outcome="written"}' in metrics
        assert "wksd_redis_reconnects_total 2.0" in metrics
    finally:
        server.stop()


def test_stalled_redis_counts_as_down_after_the_timeout(
    redis_server: RedisServer, daemons: Callable[..., DaemonProcess]
) -> None:
    """Redis frozen with SIGSTOP: no error, no request longer than the timeout plus a margin."""
    daemon = serving_on_redis(daemons, redis_server.url)
    with Load(daemon.path) as load:
        load.wait_ops(200)
        redis_server.pause()
        try:
            load.wait_ops(300)
            with Client(daemon.path) as c:
                health = c.health()
            assert health.status == "degraded" and health.redis_status == "down"
        finally:
            redis_server.resume()
        wait_until(lambda: backend(daemon.path) == "redis", what="switch back to redis")
        load.wait_ops(200)
    assert load.errors == []
    assert load.max_latency < TIMEOUT + MARGIN
    with redis_server.client() as direct:
        load.check_in_redis(direct)


def test_daemon_started_while_redis_is_down_switches_over(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """Started with no Redis: serves from memory, and moves to Redis when it appears."""
    port = free_port()
    daemon = daemons(redis_env(f"redis://127.0.0.1:{port}/0"))
    with Client(daemon.path) as c:
        health = c.health()
        assert (health.status, health.backend, health.redis_status) == (
            "degraded",
            "memory",
            "down",
        )
        c.set_session("early", {"before": "redis"})
        c.start_workflow_tracking("e1", "w", 3)
    server = RedisServer(tmp_path / "late", port=port).start()
    try:
        wait_until(lambda: backend(daemon.path) == "redis", what="switch to redis")
        with server.client() as direct:
            assert json.loads(direct.get("wks:session:early")) == {"before": "redis"}
            assert direct.smembers("wks:executions:active") == {b"e1"}
        with Client(daemon.path) as c:
            assert c.health().status == "healthy"
    finally:
        server.stop()


def test_two_daemons_never_let_two_workers_hold_one_lock(
    redis_server: RedisServer, daemons: Callable[..., DaemonProcess]
) -> None:
    """Workers racing through two daemons on one Redis are never inside one lock together."""
    paths = two_daemons(daemons, redis_server.url)
    inside: dict[str, int] = {}
    guard = threading.Lock()
    held = [0]

    def worker(index: int) -> None:
        with Client(paths[index % 2]) as c:
            for round_ in range(60):
                lock_id = f"shared-{round_ % 3}"
                if not c.lock_workflow_execution(lock_id, f"worker-{index}", ttl=30):
                    continue
                with guard:
                    inside[lock_id] = inside.get(lock_id, 0) + 1
                    assert inside[lock_id] == 1, f"two holders of {lock_id}"
                    held[0] += 1
                c.ping()  # hold it across a round trip
                with guard:
                    inside[lock_id] -= 1
                assert c.unlock_workflow_execution(lock_id, f"worker-{index}")

    assert in_threads(worker) == []
    assert held[0] > 0


def test_two_daemons_never_lose_a_workflow_update(
    redis_server: RedisServer, daemons: Callable[..., DaemonProcess]
) -> None:
    """Concurrent updates of one execution through two daemons all land (data merged)."""
    paths = two_daemons(daemons, redis_server.url)
    with Client(paths[0]) as c:
        c.start_workflow_tracking("shared", "w", 1000)

    def worker(index: int) -> None:
        with Client(paths[index % 2]) as c:
            for round_ in range(25):
                c.update_workflow_progress("shared", 1, f"w{index}", {f"w{index}-{round_}": round_})

    assert in_threads(worker) == []
    with Client(paths[1]) as c:
        state = c.fetch_workflow_state("shared")
    assert state is not None
    assert set(state.data) == {f"w{i}-{r}" for i in range(8) for r in range(25)}


def test_one_command_connection_however_many_clients(
    redis_server: RedisServer, daemons: Callable[..., DaemonProcess]
) -> None:
    """Twenty busy clients, one Redis connection named wksd (CLIENT LIST)."""
    daemon = serving_on_redis(daemons, redis_server.url)
    clients = [Client(daemon.path) for _ in range(20)]
    barrier = threading.Barrier(21)

    def busy(c: Client, index: int) -> None:
        for round_ in range(20):
            c.set_session(f"u{index}", {"r": round_})
        barrier.wait(30)
        barrier.wait(30)

    threads = [threading.Thread(target=busy, args=(c, i)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(30)  # every client has connected and worked, and is still connected
    with redis_server.client() as direct:
        names = [entry.get("name") for entry in direct.client_list()]
    barrier.wait(30)
    for thread in threads:
        thread.join(30)
    for c in clients:
        c.close()
    assert names.count("wksd") == 1


def test_password_from_a_systemd_credential(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """$CREDENTIALS_DIRECTORY/redis-password logs in; a wrong one is status "error"."""
    server = RedisServer(tmp_path / "auth", "--requirepass", "from-credential").start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "redis-password").write_text("from-credential\n")
    try:
        good = serving_on_redis(daemons, server.url, CREDENTIALS_DIRECTORY=str(credentials))
        bad = daemons(
            redis_env(server.url, REDIS_PASSWORD="wrong"),
            "bad.sock",
        )
        wait_until(lambda: redis_status(bad.path) == "error", what="status error")
        assert "wrong" not in bad.output and "from-credential" not in good.output
    finally:
        server.stop()


def test_rediss_url_connects_over_tls(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """rediss:// with a CA connects over TLS; the data lands in Redis as usual."""
    openssl = require_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = RedisServer(tmp_path / "tls", tls=(cert, key)).start()
    try:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"
        daemon = serving_on_redis(daemons, url)
        with Client(daemon.path) as c:
            c.set_session("over-tls", {"ok": True})
        with server.client() as direct:
            assert json.loads(direct.get("wks:session:over-tls")) == {"ok": True}
            assert [entry.get("name") for entry in direct.client_list()].count("wksd") == 1
    finally:
        server.stop()


def test_keys_are_the_seeds_layout(
    redis_server: RedisServer, daemons: Callable[..., DaemonProcess]
) -> None:
    """What wksd writes is what the TypeScript app reads, and the other way round."""
    daemon = serving_on_redis(daemons, redis_server.url)
    with Client(daemon.path) as c, redis_server.client() as direct:
        c.set_session("u1", {"role": "admin"})
        c.cache_api_response("abc123", {"items": [1]})
        c.start_workflow_tracking("e1", "w1", 2)
        c.lock_workflow_execution("e1", "worker-1")
        assert direct.type("wks:session:u1") == b"string"
        assert json.loads(direct.get("wks:session:u1")) == {"role": "admin"}
        assert 86_399 <= direct.ttl("wks:session:u1") <= 86_400
        assert 3599 <= direct.ttl("wks:cache:api:abc123") <= 3600
        assert direct.type("wks:executions:active") == b"set"
        assert json.loads(direct.get("wks:workflow:e1"))["workflowId"] == "w1"
        assert direct.ttl("wks:workflow:e1") > 3600  # longer than the stale threshold
        assert direct.get("wks:lock:execution:e1") == b"worker-1"
        assert 299 <= direct.ttl("wks:lock:execution:e1") <= 300
        # Written by the TypeScript app, read through wksd:
        direct.set("wks:session:ts", json.dumps({"from": "ts"}), ex=60)
        direct.set("wks:lock:execution:ts", "ts-worker", ex=60)
        assert c.get_session("ts") == {"from": "ts"}
        assert c.is_workflow_locked("ts").worker_id == "ts-worker"
        assert not c.lock_workflow_execution("ts", "other")


def test_sentinel_failover_is_followed_without_client_errors(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """Master killed, Sentinel promotes the replica: the daemon follows; no client error."""
    master = RedisServer(tmp_path / "master").start()
    replica = RedisServer(
        tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port)
    ).start()
    sentinel = RedisServer(
        tmp_path / "sentinel",
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1",
        "sentinel down-after-milliseconds mymaster 300",
        "sentinel failover-timeout mymaster 2000",
        "sentinel parallel-syncs mymaster 1",
        sentinel=True,
    ).start()
    try:
        daemon = serving_on_redis(daemons, f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster")
        with sentinel.client() as watch:
            wait_until(
                lambda: watch.execute_command("SENTINEL", "REPLICAS", "mymaster"),
                what="sentinel to see the replica",
            )
        with Load(daemon.path) as load:
            load.wait_ops(200)
            master.kill()
            with sentinel.client() as watch:
                wait_until(
                    lambda: (
                        int(
                            watch.execute_command(
                                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"
                            )[1]
                        )
                        == replica.port
                    ),
                    what="the replica's promotion",
                )
            wait_until(lambda: backend(daemon.path) == "redis", what="following the new master")
            load.wait_ops(300)
            with Client(daemon.path) as c:
                c.set_session("after-failover", {"on": "replica"})
        assert load.errors == []
        with replica.client() as direct:
            assert json.loads(direct.get("wks:session:after-failover")) == {"on": "replica"}
            assert direct.info("replication")["role"] == "master"
    finally:
        for server in (sentinel, replica, master):
            server.stop()
