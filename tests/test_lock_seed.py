"""Fencing tokens belong to one holding, whoever else writes the lock key
(DESIGN 3.2): the seed's app unlocking with a plain DEL and locking with
``SET key worker EX 300 NX``, the failover's copies, the durable journal."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from wksd.clock import ManualClock
from wksd.domain import Locks, LockStatus
from wksd.keys import KeySpace
from wksd.store.durable import DurableLog
from wksd.store.memory import MemoryStore
from wksd.store.redis import RedisStore
from wksd.store.redis_target import RedisTarget, open_link

from .conftest import Domain
from .durability import replayed
from .polling import await_until
from .redis_server import RedisServer

LOCK = "wks:lock:execution:e1"
TOKEN = "wks:lock:token:e1"


async def milliseconds_pass(count: int) -> None:
    """Return once the wall clock, which Redis reads too, shows ``count`` ms more."""
    start = time.time_ns() // 1_000_000
    await await_until(lambda: time.time_ns() // 1_000_000 >= start + count, "the clock moves")


async def seed_unlock(domain: Domain) -> None:
    """What the seed's unlockWorkflowExecution does: a plain DEL of the lock."""
    await domain.store.delete(LOCK)


async def seed_lock(domain: Domain, worker: str) -> None:
    """The seed's lock, a plain string with its 300 s TTL, set a moment later."""
    domain.clock.advance(0.002)  # the seed's SET comes after wksd's, by a few ms at least
    await milliseconds_pass(2)  # Redis's own clock too
    await domain.store.set(LOCK, worker.encode(), 300_000)


async def token(domain: Domain, worker: str) -> int:
    result = await domain.locks.acquire("e1", worker, 300)
    assert result.acquired, result
    assert isinstance(result.token, int)
    return result.token


# -- on every backend --------------------------------------------------------------------
async def test_a_holder_the_seed_set_gets_a_new_larger_token(domain: Domain) -> None:
    """After the seed's DEL and another worker's SET, that worker's acquire gets a new token."""
    first = await token(domain, "w1")
    await seed_unlock(domain)
    await seed_lock(domain, "w2")
    second = await token(domain, "w2")
    assert second > first
    assert await token(domain, "w2") == second  # its own retry keeps it


async def test_the_same_worker_set_again_by_the_seed_is_a_new_holding(domain: Domain) -> None:
    """The seed's DEL then SET of the same worker id ends the holding: a new token."""
    first = await token(domain, "w1")
    await seed_unlock(domain)
    await seed_lock(domain, "w1")
    assert await token(domain, "w1") > first


async def test_a_retry_by_the_holder_keeps_its_token_through_extends(domain: Domain) -> None:
    """Acquire, extend, acquire again: one holding, one token."""
    first = await token(domain, "w1")
    domain.clock.advance(1)
    assert await domain.locks.extend("e1", "w1", 600) == LockStatus.EXTENDED
    assert await token(domain, "w1") == first


async def test_an_old_plain_integer_token_names_nobody(domain: Domain) -> None:
    """A token key from before tokens named their holder gives way to a new token."""
    counter = await token(domain, "w0")
    await domain.locks.release("e1", "w0")
    await domain.store.set(LOCK, b"w1", 300_000)
    await domain.store.set(TOKEN, b"%d" % counter, 300_000)
    assert await token(domain, "w1") > counter


async def test_release_with_a_token_releases_that_holding_only(domain: Domain) -> None:
    """A release naming an earlier holding's token leaves a later holding of the same worker."""
    first = await token(domain, "w1")
    await seed_unlock(domain)
    await seed_lock(domain, "w1")
    second = await token(domain, "w1")
    assert await domain.locks.release("e1", "w1", first) == LockStatus.NOT_OWNER
    assert await domain.locks.release("e1", "w1", second) == LockStatus.RELEASED


# -- the seed's exact commands on a real redis-server ----------------------------------------
@pytest.fixture
async def redis_locks(shared_redis: RedisServer, nursery: trio.Nursery) -> AsyncIterator[Locks]:
    with shared_redis.client() as direct:
        direct.flushall()
    link = await open_link(RedisTarget(port=shared_redis.port), 5.0, nursery)
    store = RedisStore(link)
    await store.load_scripts()
    yield Locks(store, KeySpace("wks:"), ManualClock())


async def test_seed_commands_on_redis_never_hand_over_a_token(
    redis_locks: Locks, shared_redis: RedisServer
) -> None:
    """DEL, then SET NX EX by another worker or the same one: each acquire after it is new."""
    tokens = [(await redis_locks.acquire("e1", "w1", 300)).token]
    with shared_redis.client() as direct:
        assert direct.get(TOKEN) == b"%d:w1" % tokens[0]
        for worker in ("w2", "w2", "w1"):
            direct.execute_command("DEL", LOCK)
            await milliseconds_pass(2)
            assert direct.execute_command("SET", LOCK, worker, "EX", 300, "NX")
            result = await redis_locks.acquire("e1", worker, 300)
            assert result.acquired and result.holder == worker
            tokens.append(result.token)
        assert direct.get(LOCK) == b"w1"  # still the seed's plain worker id
        assert direct.pexpiretime(TOKEN) == direct.pexpiretime(LOCK)  # the same millisecond
    assert tokens == sorted(set(tokens)), tokens
    assert (await redis_locks.acquire("e1", "w1", 300)).token == tokens[-1]


async def test_a_restored_lock_keeps_the_token_memory_gave(
    redis_locks: Locks, shared_redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Write-back of an outage's lock: its token goes with it; none known, a new one next."""
    link = await open_link(RedisTarget(port=shared_redis.port), 5.0, nursery)
    redis = RedisStore(link, KeySpace("wks:"))
    await redis.load_scripts()
    assert await redis.restore_lock("e1", "w1", 300_000, 9) == "written"
    assert (await redis_locks.acquire("e1", "w1", 300)).token == 9
    assert await redis.restore_lock("e1", "w1", 300_000, 4) == "written"
    assert (await redis_locks.acquire("e1", "w1", 300)).token == 9  # Redis's holding
    assert await redis.restore_lock("e1", "w2", 300_000, 11) == "conflict"
    await redis_locks.release("e1", "w1")
    assert await redis.restore_lock("e2", "w1", 300_000, 0) == "written"
    assert (await redis_locks.acquire("e2", "w1", 300)).token > 9


# -- memory's copies and the durable journal ------------------------------------------------
def test_memory_copies_carry_the_token_with_its_holding_only() -> None:
    """mirror_lock: the same holder's lock keeps its token, another holder's drops it."""
    clock = ManualClock()
    memory = MemoryStore(keys=KeySpace("wks:"), clock=clock)
    memory.mirror_lock("e1", "w1", 5, 300_000)
    assert memory.held_token("e1") == 5
    clock.advance(1)
    memory.mirror_lock("e1", "w1", None, 300_000)  # an extension Redis confirmed
    assert memory.held_token("e1") == 5
    memory.mirror_lock("e1", "w2", None, 200_000)  # Redis says w2 holds it now
    assert memory.held_token("e1") is None
    memory.mirror_lock("e1", "w1", None, 300_000)  # and then w1 again: another holding
    assert memory.held_token("e1") is None


async def test_an_outage_acquire_after_a_copy_keeps_or_renews_the_token() -> None:
    """Memory serving an outage: the copied holder keeps its token, a new one gets a larger one."""
    clock, keys = ManualClock(), KeySpace("wks:")
    memory = MemoryStore(keys=keys, clock=clock)
    locks = Locks(memory, keys, clock)
    memory.mirror_lock("e1", "w1", 5, 300_000)
    assert (await locks.acquire("e1", "w1", 300)).token == 5
    await memory.delete(LOCK)
    await memory.set(LOCK, b"w2", 300_000)
    assert (await locks.acquire("e1", "w2", 300)).token == 6


async def test_the_token_binding_survives_a_replay(tmp_path: Path) -> None:
    """A daemon restarted on its journal still knows whose holding each token is."""
    clock, keys = ManualClock(), KeySpace("wks:")
    log = DurableLog(tmp_path)
    memory = MemoryStore(clock=clock, log=log)
    memory.load(log.open())
    locks = Locks(memory, keys, clock)
    first = (await locks.acquire("e1", "w1", 300)).token
    clock.advance(1)
    await locks.extend("e1", "w1", 300)
    log.flush()
    log.close()
    again = replayed(tmp_path, clock)
    assert again.held_token("e1") == first
    locks = Locks(again, keys, clock)
    assert (await locks.acquire("e1", "w1", 300)).token == first
    assert (await locks.acquire("e2", "w1", 300)).token == first + 1
