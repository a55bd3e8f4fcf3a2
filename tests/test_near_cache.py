"""The near cache (DESIGN 5.2): its bounds, and its coherence against a real redis-server.

A push Redis queues for a write is on the daemon's connection before the
writer's reply leaves Redis, so once a write by anyone else has been
acknowledged, any reply the daemon's link receives afterwards comes after
that push: ``settled`` (one PING) is the deterministic "the news has
arrived" the coherence tests wait for, where no test may sleep.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio

from clientlib import Client
from wksd.config import ConfigError, load_config
from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.store.failover import FailoverStore
from wksd.store.memory import MemoryStore
from wksd.store.near_cache import ENTRY_OVERHEAD, NearCache
from wksd.store.redis_target import RedisTarget

from .conftest import Tracked
from .polling import await_until, wait_until
from .processes import DaemonProcess, metric
from .redis_server import RedisServer

KEYS = KeySpace()
SESSION = KEYS.session("u1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the bounded copy, without Redis ----------------------------------------------
def test_the_copy_is_bounded_in_bytes_least_recently_used_out_first() -> None:
    entry = len("k0") + 10 + ENTRY_OVERHEAD
    cache = NearCache(3 * entry)
    for index in range(3):
        cache.wrote(f"k{index}", b"v" * 10, None, 0.0)
    assert cache.lookup("k0") == (True, b"v" * 10)  # k0 is now the most recent
    cache.wrote("k3", b"v" * 10, None, 0.0)
    assert "k1" not in cache and "k0" in cache and "k3" in cache
    assert cache.bytes == 3 * entry and cache.evictions == 1


def test_a_value_too_big_for_its_share_is_not_cached() -> None:
    cache = NearCache(16 * 1024)
    cache.wrote("small", b"x" * 1000, None, 0.0)
    cache.wrote("big", b"x" * 1025, None, 0.0)  # over a sixteenth of the bound
    assert "small" in cache and "big" not in cache


def test_a_push_drops_the_keys_it_names_and_counts_them() -> None:
    cache = NearCache(1 << 20)
    cache.filled("k", b"v", -1, 0.0)
    cache.filled("gone", None, -2, 0.0)  # absent is cached too
    cache.on_push([b"invalidate", [b"k", b"gone", b"never-held"]])
    assert len(cache) == 0 and cache.pushed_keys == 3 and cache.invalidations["key"] == 2
    cache.on_push([b"message", b"other"])  # not ours: ignored
    cache.filled("k", b"v", 100, 0.0)  # expired before it was read: not cached
    assert "k" not in cache


def test_an_entry_is_not_served_past_its_ttl() -> None:
    clock = FakeClock()
    cache = NearCache(1 << 20, clock=clock)
    cache.filled("k", b"v", 500, sent_at=clock.now)
    clock.now += 0.4
    assert cache.lookup("k") == (True, b"v")
    clock.now += 0.1  # sent + TTL, which Redis may already have reached
    assert cache.lookup("k") == (False, None)
    assert cache.invalidations["expired"] == 1 and cache.bytes == 0


def test_a_flush_push_drops_everything() -> None:
    cache = NearCache(1 << 20)
    cache.wrote("a", b"1", None, 0.0)
    cache.filled("b", b"2", -1, 0.0)
    cache.on_push([b"invalidate", None])
    assert len(cache) == 0 and cache.bytes == 0 and cache.invalidations["flush"] == 2


def test_the_setting_is_checked() -> None:
    assert load_config([], {}).near_cache_bytes == 64 * 1024 * 1024
    assert load_config([], {"WKSD_NEAR_CACHE_BYTES": "0"}).near_cache_bytes == 0
    assert load_config(["--near-cache-bytes", "4096"], {}).near_cache_bytes == 4096
    for bad in ("-1", "lots", str(64 * 1024**3 + 1)):
        with pytest.raises(ConfigError) as caught:
            load_config([], {"WKSD_NEAR_CACHE_BYTES": bad})
        assert caught.value.variable == "WKSD_NEAR_CACHE_BYTES"


# -- a store on a tracked link (conftest's ``tracked``) ------------------------------


async def test_reads_are_served_from_the_copy_and_own_writes_update_it(
    tracked: Tracked,
) -> None:
    store, near = tracked.store, tracked.near
    assert await store.get(SESSION) is None  # a miss, cached as absent
    await store.set(SESSION, b'{"a":1}', 60_000)
    hits = near.hits
    assert await store.get(SESSION) == b'{"a":1}'  # read your own write, from the copy
    assert near.hits == hits + 1
    await store.delete(SESSION)
    assert await store.get(SESSION) is None and near.hits == hits + 2


@pytest.mark.parametrize(
    "write",
    [
        lambda r: r.set(SESSION, b"theirs"),
        lambda r: r.delete(SESSION),
        lambda r: r.pexpireat(SESSION, 1),
        lambda r: r.eval("return redis.call('SET', KEYS[1], 'theirs')", 1, SESSION),
        lambda r: r.append(SESSION, b"+"),
    ],
    ids=["set", "del", "expire", "script", "append"],
)
async def test_a_write_by_a_plain_redis_client_invalidates(
    tracked: Tracked, redis_server: RedisServer, write: object
) -> None:
    store = tracked.store
    await store.set(SESSION, b"ours", 60_000)
    assert await store.get(SESSION) == b"ours"
    with redis_server.client() as other:
        await trio.to_thread.run_sync(write, other)  # type: ignore[arg-type]
        await tracked.settled()
        expected = other.get(SESSION)
    assert await store.get(SESSION) == expected
    assert tracked.near.invalidations["key"] >= 1


async def test_a_read_after_another_clients_acknowledged_write_is_fresh(
    tracked: Tracked, redis_server: RedisServer
) -> None:
    """A read asked for after another client's write was answered sees it,
    even before the reader task has had a turn: the invalidation Redis sent
    is taken in before the copy answers. (The write here blocks this thread,
    so no task runs between it and the read.)"""
    store = tracked.store
    await store.set(SESSION, b"ours", 60_000)
    assert await store.get(SESSION) == b"ours"  # in the copy now
    with redis_server.client() as other:
        for round_ in range(20):
            other.set(SESSION, f"theirs {round_}")  # acknowledged, on this thread
            assert await store.get(SESSION) == f"theirs {round_}".encode()


async def test_workflow_states_and_cache_values_are_tracked_but_locks_are_not(
    tracked: Tracked, redis_server: RedisServer
) -> None:
    store, near = tracked.store, tracked.near
    state, cached, lock = KEYS.workflow("e1"), KEYS.cache("c1"), KEYS.lock("e1")
    await store.set(state, b"{}", None)
    await store.cache_fill("c1", b"1", 60_000, None)
    await tracked.settled()
    assert await store.get(state) == b"{}" and await store.get(cached) == b"1"
    assert state in near and cached in near
    with redis_server.client() as other:
        other.set(state, b'{"status":"running"}')
        other.set(cached, b"2")
        other.set(lock, b"w1")
    await tracked.settled()
    assert await store.get(state) == b'{"status":"running"}'
    assert await store.get(cached) == b"2"
    assert await store.get(lock) == b"w1"
    assert lock not in near


async def test_a_ttl_expiry_is_not_served(tracked: Tracked, redis_server: RedisServer) -> None:
    store = tracked.store
    with redis_server.client() as other:
        other.set(SESSION, b"short", px=50)
    assert await store.get(SESSION) == b"short"
    assert SESSION in tracked.near
    with trio.fail_after(5):
        while await store.get(SESSION) is not None:  # noqa: ASYNC110 - polls Redis's clock
            await trio.sleep(0.01)
    with redis_server.client() as other:
        assert other.get(SESSION) is None


@pytest.mark.parametrize("command", ["FLUSHALL", "FLUSHDB"])
async def test_a_flush_empties_the_copy(
    tracked: Tracked, redis_server: RedisServer, command: str
) -> None:
    store = tracked.store
    await store.set(SESSION, b"ours", None)
    await store.set(KEYS.workflow("e1"), b"{}", None)
    with redis_server.client() as other:
        other.execute_command(command)
    await tracked.settled()
    assert len(tracked.near) == 0
    assert await store.get(SESSION) is None


async def test_own_writes_racing_other_writers_leave_no_stale_copy(
    tracked: Tracked, redis_server: RedisServer
) -> None:
    """Many tasks read and write a few keys while another client writes them
    too; whenever things settle, every copy equals what Redis holds."""
    store, near = tracked.store, tracked.near
    keys = [KEYS.session(f"u{index}") for index in range(4)]
    rng = random.Random(7)
    other = redis_server.client()

    async def ours(worker: int) -> None:
        for step in range(60):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                await store.set(key, b"w%d-%d" % (worker, step), 60_000)
            else:
                await store.get(key)

    def theirs() -> None:
        for step in range(150):
            other.set(rng.choice(keys), b"t%d" % step)

    for _round in range(5):
        async with trio.open_nursery() as nursery:
            for worker in range(8):
                nursery.start_soon(ours, worker)
            nursery.start_soon(trio.to_thread.run_sync, theirs)
        await tracked.settled()
        for key in keys:
            assert await store.get(key) == other.get(key), key
    assert near.hits > 0 and near.invalidations["key"] > 0
    other.close()


# -- through the failover store: the link lost ------------------------------------------
@pytest.fixture
async def failover(redis_server: RedisServer, nursery: trio.Nursery) -> FailoverStore:
    store = FailoverStore(
        MemoryStore(keys=KEYS),
        RedisTarget(port=redis_server.port),
        Metrics(),
        timeout=0.5,
        backoff_max=0.1,
        near_cache_bytes=1 << 20,
    )
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    return store


async def _cached(store: FailoverStore, value: bytes) -> None:
    await store.set(SESSION, value, 600_000)
    assert await store.get(SESSION) == value
    assert store.near is not None and SESSION in store.near


async def test_a_killed_tracking_connection_drops_the_copy(
    failover: FailoverStore, redis_server: RedisServer
) -> None:
    await _cached(failover, b"before")
    with redis_server.client() as other:
        other.client_kill_filter(_type="normal", skipme=True)
        other.set(SESSION, b"while-gone")  # no push can reach anyone now
    await await_until(lambda: failover.near is not None and SESSION not in failover.near)
    assert await failover.get(SESSION) in (b"before", b"while-gone")  # memory, or Redis
    with trio.fail_after(10):
        await failover.wait_for_backend("redis")
    assert await failover.get(SESSION) == b"while-gone"


async def test_a_restarted_redis_is_read_afresh(
    failover: FailoverStore, redis_server: RedisServer
) -> None:
    await _cached(failover, b"before")
    redis_server.restart()  # the data is gone with it (no persistence)
    with redis_server.client() as other:
        other.set(SESSION, b"after-restart")
    with trio.fail_after(10):
        while failover.backend == "redis" and SESSION in (failover.near or ()):
            await failover.get(SESSION)  # finds the link broken
            await trio.sleep(0.01)
    await await_until(lambda: failover.backend == "redis" and failover.pending_writes == 0)
    assert await failover.get(SESSION) == b"after-restart"


async def test_an_outage_leaves_no_stale_copy(
    failover: FailoverStore, redis_server: RedisServer
) -> None:
    await _cached(failover, b"before")
    redis_server.pause()
    try:
        # The write gets no answer within the timeout: the link breaks, memory serves.
        await failover.set(SESSION, b"during", 600_000)
        assert failover.backend == "memory" and failover.near is not None
        assert len(failover.near) == 0
        assert await failover.get(SESSION) == b"during"
    finally:
        redis_server.resume()
    with redis_server.client() as other:
        other.set(SESSION, b"theirs")
    with trio.fail_after(10):
        await failover.wait_for_backend("redis")
    # The write-back finds Redis changed since our last look and keeps theirs.
    assert await failover.get(SESSION) == b"theirs"


async def test_the_metrics_count_hits_misses_and_bytes(failover: FailoverStore) -> None:
    await _cached(failover, b"v")
    text = failover._metrics.render()
    assert "wksd_near_cache_hits_total 1.0" in text
    assert 'wksd_near_cache_invalidations_total{reason="connection"}' in text
    assert "wksd_near_cache_bytes " in text and "wksd_near_cache_bytes 0.0" not in text


async def test_with_no_near_cache_every_read_goes_to_redis(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    store = FailoverStore(
        MemoryStore(keys=KEYS),
        RedisTarget(port=redis_server.port),
        Metrics(),
        timeout=0.5,
        near_cache_bytes=0,
    )
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    assert store.near is None
    await store.set(SESSION, b"ours", None)
    with redis_server.client() as other:
        other.set(SESSION, b"theirs")
    assert await store.get(SESSION) == b"theirs"  # at once: nothing cached


# -- two daemons sharing one Redis ----------------------------------------------------
def test_a_write_through_another_daemon_reaches_this_ones_reads(
    daemons: Callable[..., DaemonProcess], redis_server: RedisServer
) -> None:
    env = {"REDIS_ENABLED": "1", "REDIS_URL": redis_server.url, "WKSD_STATE_DIR": ""}
    first, second = daemons(env, name="a.sock"), daemons(env, name="b.sock")
    for daemon in (first, second):
        daemon.wait_for_backend("redis")
    with Client(first.path) as a, Client(second.path) as b:
        for round_ in range(20):
            a.set_session("u1", {"round": round_}, 600)
            # The push is on b's link before a's write is acknowledged; b's
            # reader applies it within moments, never serving the old value after.
            wait_until(lambda r=round_: b.get_session("u1") == {"round": r}, 10)
            assert b.get_session("u1") == {"round": round_}
        b.get_session("u1")
    assert metric(second.path, "wksd_near_cache_hits_total") > 0
    assert metric(second.path, "wksd_near_cache_invalidations_total", reason="key") >= 19
