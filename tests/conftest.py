"""Shared fixtures: a controllable clock, the store under test, and the processes
(the daemon binary, a private redis-server) that tests start and stop.

``store`` is parametrised over the backends, so every domain test runs
against each of them (STYLE habit 8).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.store.base import Store
from wksd.store.durable import DurableLog
from wksd.store.failover import FailoverStore
from wksd.store.memory import MemoryStore
from wksd.store.near_cache import NearCache, tracked_prefixes
from wksd.store.redis import RedisStore
from wksd.store.redis_target import RedisTarget, open_link

from .durability import assert_same_state, replayed
from .peers import connect  # noqa: F401 - the raw-connection fixture, for every module
from .processes import DaemonProcess
from .redis_server import RedisServer

BACKENDS = ["memory", "durable", "fakeredis", "redis"]

# Daemons the tests start are memory-only unless a test gives them a state
# directory: the default (~/.local/state/wksd) would be shared by every test,
# and a second daemon on it exits at start (one daemon per state directory).
os.environ.setdefault("WKSD_STATE_DIR", "")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace("wks:")


@pytest.fixture(scope="session")
def fakeredis_target() -> Iterator[RedisTarget]:
    """fakeredis (with Lua) served over TCP, so the real Redis link talks to it."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield RedisTarget(host=str(host), port=int(port))
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the domain tests, flushed before each."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared")).start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, clock: ManualClock, nursery: trio.Nursery
) -> AsyncIterator[Store]:
    """The store under test: memory; memory over a durable log (checked at the
    end: a replay of the log holds the same state); RedisStore on fakeredis;
    the failover on redis-server."""
    if request.param == "memory":
        yield MemoryStore(clock=clock)
    elif request.param == "durable":
        directory = request.getfixturevalue("tmp_path") / "state"
        directory.mkdir()
        log = DurableLog(directory)
        memory = MemoryStore(clock=clock, log=log)
        memory.load(log.open())
        yield memory
        log.flush()
        log.close()
        assert_same_state(memory, replayed(directory, clock))
    elif request.param == "fakeredis":
        link = await open_link(request.getfixturevalue("fakeredis_target"), 5.0, nursery)
        await link.execute("FLUSHALL")
        redis = RedisStore(link)
        await redis.load_scripts()
        yield redis
    else:
        server: RedisServer = request.getfixturevalue("shared_redis")
        with server.client() as direct:
            direct.flushall()
        failover = FailoverStore(
            MemoryStore(keys=KeySpace("wks:"), clock=clock),
            RedisTarget(port=server.port),
            Metrics(),
            timeout=5.0,
        )
        await nursery.start(failover.run)
        await failover.wait_for_backend("redis")
        yield failover


class Domain:
    """The four domain services over one store, as the daemon wires them."""

    def __init__(self, store: Store, keys: KeySpace, clock: ManualClock) -> None:
        from wksd.domain import Documents, Locks, Workflows

        self.store = store
        self.keys = keys
        self.clock = clock
        self.sessions = Documents(store, keys.session, "session data")
        self.cache = Documents(store, keys.cache, "cache value")
        self.workflows = Workflows(store, keys, clock, stale_after=3600, sleep=trio.sleep)
        self.locks = Locks(store, keys, clock)


@pytest.fixture
def domain(store: Store, keys: KeySpace, clock: ManualClock) -> Domain:
    return Domain(store, keys, clock)


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path short enough for sockaddr_un (tmp_path can exceed 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="wksd-", dir="/tmp") as directory:
        yield os.path.join(directory, "wksd.sock")


@pytest.fixture
def open_socket_path(sock_path: str) -> str:
    """A socket whose file mode lets anyone connect, so SO_PEERCRED is the only gate."""
    if os.getuid() != 0:
        pytest.skip("running a peer as another uid needs root (setpriv)")
    os.chmod(os.path.dirname(sock_path), 0o755)
    return sock_path


@pytest.fixture
def daemon_process(sock_path: str) -> Iterator[DaemonProcess]:
    """The real daemon binary on its memory default, serving on ``sock_path``."""
    daemon = DaemonProcess(sock_path).start()
    yield daemon
    daemon.close()


@pytest.fixture
def daemons(sock_path: str) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemon binaries, each with its environment and a socket named ``name``
    beside ``sock_path`` (``options`` go to ``DaemonProcess``); every one is
    stopped after the test."""
    started: list[DaemonProcess] = []

    def start(
        env: Mapping[str, str] | None = None, name: str = "wksd.sock", **options: Any
    ) -> DaemonProcess:
        path = os.path.join(os.path.dirname(sock_path), name)
        started.append(DaemonProcess(path, env, **options).start())
        return started[-1]

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server of this test's own, to kill, pause and restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@dataclass
class Tracked:
    """A RedisStore with a near cache, on a link opened with its tracking."""

    store: RedisStore
    near: NearCache

    async def settled(self) -> None:
        """Every push queued before now has been applied (the module doc)."""
        await self.store.link.execute("PING")


@pytest.fixture
async def tracked(redis_server: RedisServer, nursery: trio.Nursery) -> AsyncIterator[Tracked]:
    near = NearCache(1 << 20)
    link = await open_link(
        RedisTarget(port=redis_server.port),
        5.0,
        nursery,
        track=tracked_prefixes(KeySpace()),
        on_push=near.on_push,
    )
    store = RedisStore(link, KeySpace(), near=near)
    await store.load_scripts()
    yield Tracked(store, near)
    link.fail(RuntimeError("test over"))
