"""Execution locks, on every backend (wksd.domain.locks)."""

from __future__ import annotations

from wksd.domain import Acquisition, LockState, LockStatus

from .conftest import Domain


async def test_free_lock_is_acquired_with_a_token(domain: Domain) -> None:
    """A free lock goes to the caller, stored as the seed's plain worker id."""
    now = int(domain.clock.time() * 1000)
    result = await domain.locks.acquire("e1", "w1", 300)
    assert result == Acquisition(True, "w1", result.token, now + 300_000)
    assert isinstance(result.token, int) and result.token >= 1
    assert await domain.store.get("wks:lock:execution:e1") == b"w1"


async def test_held_lock_is_refused_with_the_holder(domain: Domain) -> None:
    """Another worker gets acquired: false and learns who holds it; no token, no expiry."""
    await domain.locks.acquire("e1", "w1", 300)
    refused = await domain.locks.acquire("e1", "w2", 300)
    assert (refused.acquired, refused.holder, refused.token, refused.expires_at) == (
        False,
        "w1",
        None,
        None,
    )
    assert refused.holder_ttl_ms is not None and 299_000 < refused.holder_ttl_ms <= 300_000
    assert await domain.store.get("wks:lock:execution:e1") == b"w1"


async def test_reacquire_by_the_holder_keeps_the_token(domain: Domain) -> None:
    """The holder may acquire again: success, same token, TTL refreshed."""
    first = await domain.locks.acquire("e1", "w1", 10)
    again = await domain.locks.acquire("e1", "w1", 300)
    assert again.acquired and again.token == first.token
    status = await domain.locks.status("e1")
    assert status.ttl_ms is not None and status.ttl_ms > 10_000


async def test_fencing_token_grows_with_each_fresh_acquisition(domain: Domain) -> None:
    """Release and acquire again, or acquire another id: the token only grows."""
    tokens = []
    for worker in ("w1", "w2", "w1"):
        tokens.append((await domain.locks.acquire("e1", worker, 300)).token)
        await domain.locks.release("e1", worker)
    tokens.append((await domain.locks.acquire("e2", "w1", 300)).token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


async def test_release_checks_the_owner(domain: Domain) -> None:
    """Only the holder releases; others get not_owner, a free lock not_found."""
    await domain.locks.acquire("e1", "w1", 300)
    assert await domain.locks.release("e1", "w2") is LockStatus.NOT_OWNER
    assert (await domain.locks.status("e1")).holder == "w1"
    assert await domain.locks.release("e1", "w1") is LockStatus.RELEASED
    assert await domain.locks.release("e1", "w1") is LockStatus.NOT_FOUND
    assert await domain.locks.status("e1") == LockState(None, None)


async def test_extend_checks_the_owner(domain: Domain) -> None:
    """Only the holder extends; the TTL becomes the new one."""
    await domain.locks.acquire("e1", "w1", 5)
    assert await domain.locks.extend("e1", "w2", 600) is LockStatus.NOT_OWNER
    assert await domain.locks.extend("e1", "w1", 600) is LockStatus.EXTENDED
    ttl = (await domain.locks.status("e1")).ttl_ms
    assert ttl is not None and 599_000 < ttl <= 600_000
    assert await domain.locks.extend("e9", "w1", 600) is LockStatus.NOT_FOUND


async def test_status_reports_holder_and_ttl_in_ms(domain: Domain) -> None:
    """status: the holder's id and the ms left."""
    await domain.locks.acquire("e1", "w1", 300)
    status = await domain.locks.status("e1")
    assert status.holder == "w1"
    assert status.ttl_ms is not None and 299_000 < status.ttl_ms <= 300_000


async def test_a_stale_holder_cannot_release_its_successor(domain: Domain) -> None:
    """After a lock expired and was taken, the old holder's release leaves it alone."""
    await domain.locks.acquire("e1", "w1", 300)
    await domain.store.delete("wks:lock:execution:e1")  # as if its TTL ran out
    taken = await domain.locks.acquire("e1", "w2", 300)
    assert taken.acquired
    assert await domain.locks.release("e1", "w1") is LockStatus.NOT_OWNER
    assert await domain.locks.extend("e1", "w1", 300) is LockStatus.NOT_OWNER
    assert (await domain.locks.status("e1")).holder == "w2"


async def test_lock_taken_by_the_seed_app_gets_a_token_on_reacquire(domain: Domain) -> None:
    """A lock the TypeScript app set (no token key) still works for its holder."""
    await domain.store.set("wks:lock:execution:e1", b"w1", 300_000)
    result = await domain.locks.acquire("e1", "w1", 300)
    assert result.acquired and isinstance(result.token, int)
    assert (await domain.locks.acquire("e1", "w2", 300)).holder == "w1"


async def test_sub_millisecond_ttl_still_sets_a_ttl(domain: Domain) -> None:
    """A TTL below 1 ms rounds up to 1 ms instead of meaning 'no expiry'."""
    result = await domain.locks.acquire("e1", "w1", 0.0001)
    assert result.acquired
    status = await domain.locks.status("e1")
    assert status.ttl_ms is None or status.ttl_ms <= 1
