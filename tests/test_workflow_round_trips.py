"""``workflow.update`` in Redis mode costs one command, against a real redis-server.

The compare-and-set, the active set, both event streams and the pub/sub
message go in one script (``WORKFLOW_SWAP`` with an event), and the state
the daemon wrote last is the swap's expectation, so an update of a run this
daemon is driving sends Redis one EVALSHA and reads nothing first. The
commands are counted where the daemon sends them, on its link.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from wksd.clock import SystemClock
from wksd.coordination.feeds import Feeds
from wksd.domain import Workflows
from wksd.keys import KeySpace
from wksd.store.redis_link import RedisLink

from .conftest import Tracked
from .redis_server import RedisServer

KEYS = KeySpace()


class Sent:
    """The commands a link sends, by name, one list per round trip."""

    def __init__(self, link: RedisLink) -> None:
        self.trips: list[list[str]] = []
        execute, pipeline = link.execute, link.pipeline

        async def counted_execute(*command: Any, **options: Any) -> Any:
            self.trips.append([str(command[0])])
            return await execute(*command, **options)

        async def counted_pipeline(commands: list[list[Any]], *args: Any, **options: Any) -> Any:
            self.trips.append([str(command[0]) for command in commands])
            return await pipeline(commands, *args, **options)

        link.execute = counted_execute  # type: ignore[method-assign]
        link.pipeline = counted_pipeline  # type: ignore[method-assign]


@dataclass
class Daemon:
    workflows: Workflows
    feeds: Feeds
    sent: Sent


@pytest.fixture
async def daemon(tracked: Tracked) -> AsyncIterator[Daemon]:
    """conftest's ``tracked`` store (a near cache on a tracking link), with the
    feeds and the workflows the daemon wires over it."""
    feeds = Feeds(tracked.store, KEYS, origin="here", retain_ms=600_000)
    workflows = Workflows(
        tracked.store, KEYS, SystemClock(), stale_after=3600, sleep=trio.sleep, feed=feeds
    )
    yield Daemon(workflows, feeds, Sent(tracked.store.link))


def _events(redis_server: RedisServer, execution_id: str | None) -> list[dict[str, Any]]:
    with redis_server.client() as direct:
        entries = direct.xrange(KEYS.events(execution_id))
    return [json.loads(fields[b"e"]) for _, fields in entries]


async def test_an_update_is_one_command_with_its_events_and_message(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    with redis_server.client() as direct:
        pubsub = direct.pubsub()
        pubsub.subscribe(KEYS.workflow_channel)
        pubsub.get_message(timeout=5)  # the subscription's confirmation
        await daemon.workflows.start("e1", "w1", 10, {"a": 1})
        daemon.sent.trips.clear()
        state = await daemon.workflows.update("e1", 3, "step 3", {"b": 2})
        assert daemon.sent.trips == [["EVALSHA"]]
        messages = [pubsub.get_message(timeout=5) for _ in range(2)]
        pubsub.close()
        stored = direct.get(KEYS.workflow("e1"))
        assert direct.sismember(KEYS.active, "e1")
    assert json.loads(stored) == state
    published = [json.loads(m["data"]) for m in messages if m is not None]
    assert [(m["origin"], m["event"]["type"]) for m in published] == [
        ("here", "started"),
        ("here", "progress"),
    ]
    assert published[1]["event"]["state"] == state
    for stream in ("e1", None):
        assert [e["type"] for e in _events(redis_server, stream)] == ["started", "progress"]


async def test_a_write_by_the_seed_app_in_between_costs_one_read_and_is_kept(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    await daemon.workflows.start("e1", "w1", 10, {"a": 1})
    with redis_server.client() as direct:
        theirs = json.loads(direct.get(KEYS.workflow("e1")))
        theirs["data"] = {"seed": True}
        direct.set(KEYS.workflow("e1"), json.dumps(theirs))
    daemon.sent.trips.clear()
    state = await daemon.workflows.update("e1", 1, "mine", {"mine": 1})
    assert state["data"] == {"seed": True, "mine": 1}
    # the swap on our copy is lost, the state read (MULTI GET PTTL EXEC), swapped again
    assert daemon.sent.trips == [["EVALSHA"], ["MULTI", "GET", "PTTL", "EXEC"], ["EVALSHA"]]


async def test_an_event_that_cannot_be_recorded_leaves_the_change_applied(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    with redis_server.client() as direct:
        direct.set(KEYS.events("e1"), "not a stream")  # someone else's key, of another type
    state = await daemon.workflows.start("e1", "w1", 10, {})
    with redis_server.client() as direct:
        assert json.loads(direct.get(KEYS.workflow("e1"))) == state
        assert direct.get(KEYS.events("e1")) == b"not a stream"
    assert [e["type"] for e in _events(redis_server, None)] == []  # recorded both or neither


async def test_a_lost_swap_records_and_publishes_nothing(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    await daemon.workflows.start("e1", "w1", 10, {})
    with redis_server.client() as direct:
        direct.delete(KEYS.workflow("e1"))  # gone under us
    with pytest.raises(Exception, match="no workflow e1"):
        await daemon.workflows.update("e1", 1, "late", None)
    assert [e["type"] for e in _events(redis_server, "e1")] == ["started"]


def test_our_own_messages_are_known_without_parsing_and_others_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis sends this daemon's messages back to its subscription: they are
    skipped by their first bytes; another daemon's (even one whose origin
    begins like ours) reach the subscribers; unreadable ones nobody."""
    from wksd.coordination import feeds as feeds_module
    from wksd.store.memory import MemoryStore

    from .test_coordination import FakeSession

    parsed: list[bytes] = []
    loads = json.loads
    monkeypatch.setattr(feeds_module.json, "loads", lambda raw: parsed.append(raw) or loads(raw))

    feeds = Feeds(MemoryStore(), KEYS, origin="here", retain_ms=1000)
    session = FakeSession(1)
    trio.run(feeds.subscribe, session, None)
    state = {"executionId": "e1", "updatedAt": 5}
    event, _ = feeds.prepare("progress", state)
    feeds.on_message(event.message)  # our own, back from Redis
    assert session.pushed == [] and parsed == []
    theirs = Feeds(MemoryStore(), KEYS, origin="here2", retain_ms=1000)
    feeds.on_message(theirs.prepare("progress", state)[0].message)
    feeds.on_message(b'{"origin":')
    assert session.pushed == [
        ("workflow.event", [{"executionId": "e1", "type": "progress", "state": state, "at": 5}])
    ]
