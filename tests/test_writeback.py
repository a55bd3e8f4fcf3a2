"""Write-back after an outage never undoes another host's write (wksd.store.failover).

The same partitioned setup as ``test_failover``: a proxy between the store
and a private redis-server, and a direct client playing "another host".
Also the supervisor's resilience to faults, the mirror that cannot turn a
success into an error, fail-closed lock extension and the journal's ops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from clientlib.errors import Unavailable
from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.store.base import WorkflowStamp, WorkflowSwap
from wksd.store.durable import DurableLog
from wksd.store.failover import FailoverStore
from wksd.store.memory import MemoryStore
from wksd.store.reconcile import Journal
from wksd.store.redis_target import RedisTarget

from .proxy import Proxy
from .redis_server import RedisServer, free_port
from .test_failover import Host, make_host

KEYS = KeySpace("wks:")
CONFLICT = 'wksd_reconciled_keys_total{outcome="conflict"} 1.0'


@pytest.fixture
async def proxy(redis_server: RedisServer, nursery: trio.Nursery) -> Proxy:
    proxy = Proxy(redis_server.port)
    await nursery.start(proxy.run)
    return proxy


@pytest.fixture
async def host(proxy: Proxy, nursery: trio.Nursery) -> Host:
    return await make_host(nursery, proxy.port)


def redis_json(server: RedisServer, key: str) -> Any:
    with server.client() as direct:
        raw = direct.get(key)
    return None if raw is None else json.loads(raw)


# -- workflows ------------------------------------------------------------------
async def test_completed_state_in_redis_survives_an_outage_update(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """The seed's app completed the run (updatedAt untouched): our newer update stays out."""
    started = await host.workflows.start("e1", "w", 4, {})
    await host.outage(proxy)
    host.clock.advance(5)
    ours = await host.workflows.update("e1", 1, "ours", None)
    assert ours["updatedAt"] > started["updatedAt"]
    theirs = {**started, "status": "completed", "progress": 100, "completedAt": 1}
    with redis_server.client() as direct:
        direct.set("wks:workflow:e1", json.dumps(theirs), px=7_200_000)
        direct.srem("wks:executions:active", "e1")
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:workflow:e1")["status"] == "completed"
    with redis_server.client() as direct:
        assert direct.smembers("wks:executions:active") == set()
    assert CONFLICT in host.metrics.render()
    # Memory now holds Redis's state, so a later outage starts from it.
    raw = await host.memory.get("wks:workflow:e1")
    assert raw is not None and json.loads(raw)["status"] == "completed"
    assert await host.memory.members(KEYS.active) == []


async def test_finished_outage_state_still_replaces_a_running_one(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """The finished rule is one way: completing a run during the outage still goes back."""
    await host.workflows.start("e1", "w", 4, {})
    await host.outage(proxy)
    host.clock.advance(5)
    await host.workflows.complete("e1", "failed", "boom", None)
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:workflow:e1")["status"] == "failed"


async def test_the_write_back_compares_the_stamp_the_writer_gave(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """The rules compare what the swap's writer said of its state, never what the
    state's JSON says: a state claiming an old updatedAt, stamped newer, goes back."""
    theirs = {"status": "running", "updatedAt": 2000}
    with redis_server.client() as direct:
        direct.set("wks:workflow:e1", json.dumps(theirs), px=60_000)
    await host.outage(proxy)
    ours = json.dumps({"status": "running", "updatedAt": 1}).encode()
    stamped = WorkflowSwap("e1", None, ours, 60_000, active=True, updated_at=3000)
    assert await host.store.swap_workflow(stamped)
    await host.recovered(proxy)
    with redis_server.client() as direct:
        assert direct.get("wks:workflow:e1") == ours
        assert direct.smembers("wks:executions:active") == {b"e1"}


async def test_a_journal_from_before_stamps_goes_back_by_the_same_rules(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A state directory whose outage journal has no stamps (a wksd before them wrote
    it) replays, and its workflows go back by the rules, read from the states."""
    clock, stale = ManualClock(), {"status": "running", "updatedAt": 2000}
    outage = {  # id: (ours, theirs)
        "newer": ({"status": "completed", "updatedAt": 3000, "completedAt": 2500}, stale),
        "older": ({"status": "running", "updatedAt": 1000}, stale),
        "ended": ({"status": "running", "updatedAt": 3000}, {**stale, "status": "failed"}),
    }
    log = DurableLog(tmp_path)
    old = MemoryStore(clock=clock, log=log, keep_writes=True)
    old.load(log.open())
    for execution_id, (ours, _) in outage.items():
        raw, running = json.dumps(ours).encode(), ours["status"] == "running"
        assert await old.swap_workflow(WorkflowSwap(execution_id, None, raw, 60_000, running))
        old.record(["jn", "workflow", execution_id])  # all a wksd before stamps journaled
    log.flush()
    log.close()
    with redis_server.client() as direct:
        for execution_id, (_, theirs) in outage.items():
            direct.set(f"wks:workflow:{execution_id}", json.dumps(theirs), px=60_000)
    log = DurableLog(tmp_path)
    memory = MemoryStore(clock=clock, log=log, keep_writes=True)
    memory.load(log.open())
    store = FailoverStore(memory, RedisTarget(port=redis_server.port), Metrics(), timeout=5.0)
    assert store.pending_writes == 3
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    assert redis_json(redis_server, "wks:workflow:newer") == outage["newer"][0]
    assert redis_json(redis_server, "wks:workflow:older") == stale
    assert redis_json(redis_server, "wks:workflow:ended") == outage["ended"][1]
    with redis_server.client() as direct:
        assert direct.zscore("wks:executions:finished", "newer") == 2500
    assert store.pending_writes == 0
    log.close()


# -- sessions, cache entries, deletes ------------------------------------------
async def test_session_another_host_wrote_meanwhile_survives(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """An outage session.set does not overwrite what another host wrote to Redis meanwhile."""
    await host.sessions.set("u1", {"v": "before"}, 60)
    await host.outage(proxy)
    await host.sessions.set("u1", {"v": "ours"}, 60)
    with redis_server.client() as direct:
        direct.set("wks:session:u1", json.dumps({"v": "theirs"}), px=60_000)
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:session:u1") == {"v": "theirs"}
    assert CONFLICT in host.metrics.render()
    assert await host.memory.get("wks:session:u1") == json.dumps({"v": "theirs"}).encode()
    assert host.store.pending_writes == 0


async def test_outage_delete_of_a_key_another_host_rewrote_keeps_it(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """A delete goes back only where Redis still holds what this host saw."""
    await host.sessions.set("u1", {"v": "before"}, 60)
    await host.outage(proxy)
    assert await host.sessions.delete("u1")
    with redis_server.client() as direct:
        direct.set("wks:session:u1", json.dumps({"v": "theirs"}), px=60_000)
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:session:u1") == {"v": "theirs"}
    assert CONFLICT in host.metrics.render()


async def test_outage_writes_over_unchanged_keys_go_back(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """Keys Redis still holds as this host saw them take the outage write, delete or touch."""
    await host.sessions.set("u1", {"v": "before"}, 60)
    await host.sessions.set("gone", {"v": "before"}, 60)
    await host.sessions.set("touched", {"v": "same"}, 60)
    await host.store.set("wks:cache:api:h", b"[1]", 30_000)
    await host.outage(proxy)
    await host.sessions.set("u1", {"v": "ours"}, 60)
    await host.sessions.set("u1", {"v": "ours again"}, 60)  # the base stays the first one seen
    await host.sessions.delete("gone")
    await host.sessions.touch("touched", 600)
    await host.store.set("wks:cache:api:h", b"[2]", 30_000)
    await host.sessions.set("new", {"v": "fresh"}, 60)  # absent before, absent in Redis
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:session:u1") == {"v": "ours again"}
    assert redis_json(redis_server, "wks:session:gone") is None
    assert redis_json(redis_server, "wks:session:new") == {"v": "fresh"}
    with redis_server.client() as direct:
        assert direct.get("wks:cache:api:h") == b"[2]"
        assert direct.pttl("wks:session:touched") > 60_000
    assert "conflict" not in host.metrics.render()
    assert host.store.pending_writes == 0


async def test_a_key_this_host_never_saw_is_expected_absent(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """With no copy here, the outage write goes back only if Redis has no such key."""
    with redis_server.client() as direct:
        direct.set("wks:session:theirs", json.dumps({"v": "theirs"}), px=60_000)
    await host.outage(proxy)
    await host.sessions.set("theirs", {"v": "ours"}, 60)
    await host.recovered(proxy)
    assert redis_json(redis_server, "wks:session:theirs") == {"v": "theirs"}
    assert CONFLICT in host.metrics.render()


# -- the supervisor ----------------------------------------------------------------
async def test_a_fault_in_the_write_back_is_retried(
    host: Host, proxy: Proxy, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError in _restore is logged, counted and retried; memory serves meanwhile."""
    store = host.store
    original = store._reconciler._restore
    failed = trio.Event()

    async def faulty(*args: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise ValueError("injected")
        return await original(*args)

    monkeypatch.setattr(store._reconciler, "_restore", faulty)
    await host.outage(proxy)
    await host.sessions.set("u1", {"v": "ours"}, 60)
    proxy.restore()
    with trio.fail_after(10):
        await failed.wait()
    assert store.backend == "memory"
    assert await host.sessions.get("u1") == {"v": "ours"}  # still serving
    await host.sessions.set("u2", {"v": "after the fault"}, 60)
    assert store.pending_writes == 2  # nothing lost
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    assert redis_json(redis_server, "wks:session:u1") == {"v": "ours"}
    assert redis_json(redis_server, "wks:session:u2") == {"v": "after the fault"}
    assert 'wksd_supervisor_errors_total{task="write_back"} 1.0' in host.metrics.render()


# -- the mirror ----------------------------------------------------------------------
async def test_a_failing_mirror_never_turns_a_redis_success_into_an_error(
    host: Host, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write Redis applied is answered true; the stale memory copy is dropped."""
    await host.sessions.set("u1", {"v": 1}, 60)
    assert await host.memory.get("wks:session:u1") is not None

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    for name in ("mirror_set", "mirror_workflow", "mirror_lock"):
        monkeypatch.setattr(host.memory, name, broken)
    assert await host.sessions.set("u1", {"v": 2}, 60) is True
    await host.workflows.start("e1", "w", 2, {})
    assert (await host.locks.acquire("e1", "w", 60)).acquired
    assert redis_json(redis_server, "wks:session:u1") == {"v": 2}
    assert redis_json(redis_server, "wks:workflow:e1")["status"] == "running"
    assert await host.memory.get("wks:session:u1") is None
    assert 'wksd_supervisor_errors_total{task="mirror"} 3.0' in host.metrics.render()


# -- fail-closed locks ---------------------------------------------------------------
async def test_fail_closed_extend_during_an_outage_is_unavailable(
    proxy: Proxy, nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    """No extension past Redis's last confirmed expiry; the copy expires then; releases go back."""
    closed = await make_host(nursery, proxy.port, fail_closed=True)
    assert (await closed.locks.acquire("e1", "w", 60)).acquired
    assert (await closed.locks.acquire("e2", "w", 60)).acquired
    closed.clock.advance(30)
    assert await closed.locks.extend("e1", "w", 60) == "extended"  # confirmed by Redis: 90 s
    await closed.outage(proxy)
    with pytest.raises(Unavailable):
        await closed.locks.extend("e1", "w", 60)
    assert await closed.locks.release("e2", "w") == "released"
    closed.clock.advance(59)
    assert (await closed.locks.status("e1")).holder is not None
    closed.clock.advance(2)
    assert (await closed.locks.status("e1")).holder is None
    await closed.recovered(proxy)
    with redis_server.client() as direct:
        assert direct.get("wks:lock:execution:e2") is None


# -- the journal's ops ----------------------------------------------------------------
def _journal_state(
    journal: Journal,
) -> tuple[list[tuple[str, str]], dict[Any, Any], dict[str, Any]]:
    entries = [(kind, name) for kind, name, _ in journal.pending()]
    bases = {entry: (journal.base(*entry), journal.alternates(*entry)) for entry in entries}
    owners = {name: journal.owner(name) for kind, name in entries if kind == "lock"}
    stamps = {name: journal.stamp(name) for kind, name in entries if kind == "workflow"}
    return entries, bases, {**owners, **stamps}


def _busy_journal(ops: list[list[Any]]) -> Journal:
    journal = Journal(ops.append)
    journal.note("key", "wks:session:a", b'{"v":1}')
    journal.note("key", "wks:session:b", None)  # seen absent
    journal.also_seen("key", "wks:session:b", b'{"v":"in flight"}')
    journal.note("key", "wks:session:a", b"ignored: not the first")
    journal.note_stamp("e1", WorkflowStamp(1, False, None))
    journal.note("workflow", "e1")
    journal.note_stamp("e3", WorkflowStamp(2, True, 3))
    journal.note("workflow", "e3")
    journal.note("workflow", "e4")  # as a journal from before stamps has it
    journal.note_owner("e2", "worker-1")
    journal.note("lock", "e2")
    journal.note("fencing", "wks:lock:fencing")
    journal.note("key", "wks:session:c", b"old")
    [(_, _, version)] = [p for p in journal.pending() if p[1] == "wks:session:c"]
    journal.note("key", "wks:session:c", b"ignored")
    assert not journal.settle("key", "wks:session:c", version)
    journal.rebase("key", "wks:session:c", b"written back")
    [(_, _, version)] = [p for p in journal.pending() if p[1] == "e1"]
    assert journal.settle("workflow", "e1", version)
    assert journal.stamp("e1") is None  # settled with its entry
    return journal


def test_journal_ops_rebuild_the_same_journal() -> None:
    """Replaying the recorded ops (through msgpack) gives the same entries, versions and bases."""
    ops: list[list[Any]] = []
    journal = _busy_journal(ops)
    assert all(isinstance(op[0], str) and op[0].startswith("j") for op in ops)
    replayed = Journal()
    for op in msgpack.unpackb(msgpack.packb(ops, use_bin_type=True), raw=False):
        replayed.apply(op)
    assert replayed.pending() == journal.pending()
    assert _journal_state(replayed) == _journal_state(journal)
    assert replayed.base("key", "wks:session:a") == b'{"v":1}'
    assert replayed.base("key", "wks:session:c") == b"written back"
    assert replayed.owner("e2") == "worker-1"
    assert replayed.stamp("e3") == WorkflowStamp(2, True, 3)
    assert replayed.stamp("e4") is None
    assert replayed.alternates("key", "wks:session:b") == [b'{"v":"in flight"}']


def test_journal_snapshot_rebuilds_the_same_journal() -> None:
    """The snapshot source's ops rebuild the pending entries, in order, with their bases."""
    journal = _busy_journal([])
    rebuilt = Journal()
    for op in msgpack.unpackb(msgpack.packb(journal.snapshot(), use_bin_type=True), raw=False):
        rebuilt.apply(op)
    assert _journal_state(rebuilt) == _journal_state(journal)
    settled = Journal()
    for kind, name, version in journal.pending():
        journal.settle(kind, name, version)
    for op in journal.snapshot():
        settled.apply(op)
    assert len(settled) == 0 and journal.snapshot() == []


def test_failover_store_replays_and_registers_its_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At construction the store applies the log's journal ops and registers its snapshot."""
    memory = MemoryStore()
    ops: list[list[Any]] = []
    _busy_journal(ops)
    sources: list[Any] = []
    monkeypatch.setattr(memory, "take_foreign_ops", lambda: list(ops))
    monkeypatch.setattr(memory, "register_snapshot_source", sources.append)
    recorded: list[list[Any]] = []
    monkeypatch.setattr(memory, "record", recorded.append)
    store = FailoverStore(memory, RedisTarget(port=free_port()), Metrics(), timeout=0.3)
    assert store.pending_writes == 7
    assert recorded == []  # replaying records nothing again
    [source] = sources
    rebuilt = Journal()
    for op in source():
        rebuilt.apply(op)
    assert len(rebuilt) == 7


async def test_outage_writes_are_recorded_with_their_base(nursery: trio.Nursery) -> None:
    """A write served from memory records a journal op carrying what this host last saw."""
    memory = MemoryStore()
    recorded: list[list[Any]] = []
    memory.record = recorded.append  # type: ignore[method-assign]
    store = FailoverStore(memory, RedisTarget(port=free_port()), Metrics(), timeout=0.3)
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.set("wks:session:u", b"1", 60_000)
        await store.set("wks:session:u", b"2", 60_000)
        await store.delete("wks:session:u")
    journal_ops = [op for op in recorded if op[0].startswith("j")]
    assert journal_ops[0] == ["jn", "key", "wks:session:u", None]
    assert journal_ops[1] == ["jn", "key", "wks:session:u", b"1"]
    assert store.pending_writes == 1


async def test_a_write_in_flight_when_redis_froze_does_not_win_over_later_ones(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A frozen Redis runs the write it had been sent when it resumes, after the
    daemon answered it from memory; the outage's later writes still go back."""
    host = await make_host(nursery, redis_server.port)
    await host.sessions.set("u1", {"v": 0}, 60)
    redis_server.pause()
    try:
        await host.sessions.set("u1", {"v": 1}, 60)  # sent to Redis, then timed out
        assert host.store.backend == "memory"
        await host.sessions.set("u1", {"v": 2}, 60)
    finally:
        redis_server.resume()  # ... and Redis applies {"v": 1} now
    with trio.fail_after(10):
        await host.store.wait_for_backend("redis")
    assert redis_json(redis_server, "wks:session:u1") == {"v": 2}
    assert CONFLICT not in host.metrics.render()
