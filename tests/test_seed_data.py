"""Data the seed's TypeScript app writes never breaks a handler (DESIGN 3.1, 3.3).

The seed's bytes come from node itself (``JSON.stringify``), and are written
into a real redis-server the daemon serves from, or into the store under
test on every backend: lone surrogates, ``totalSteps`` 0 with ``progress``
null, ``data`` null, odd shapes; the stale-while-revalidate metadata against
the seed's plain ``SET``; progress as JavaScript rounds it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from clientlib.errors import Conflict
from clientlib.protocol import Response
from wksd.app import Daemon
from wksd.clock import ManualClock
from wksd.config import Config
from wksd.domain import workflows as rules
from wksd.domain.values import decode
from wksd.keys import KeySpace
from wksd.store.base import WorkflowSwap

from .conftest import Domain
from .javascript import run_node
from .peers import Connect
from .proxy import Proxy
from .redis_server import RedisServer
from .test_failover import Host, make_host

NOW = 1_700_000_000_000  # the ManualClock's start, in ms

#: node builds the seed's values: a workflow state as the seed's
#: startWorkflowTracking writes it, and any value through JSON.stringify.
SEED_JS = """
const now = input.now;
const state = (id, total, data) => ({
  executionId: id, workflowId: 'wf', status: 'running',
  progress: Math.round((0 / total) * 100), currentStep: 'initializing',
  totalSteps: total, completedSteps: 0, data, startedAt: now, updatedAt: now,
});
const out = {};
for (const [name, [id, total, data]] of Object.entries(input.states)) {
  out[name] = JSON.stringify(state(id, total, data));
}
for (const [name, value] of Object.entries(input.values)) {
  out[name] = JSON.stringify(value);
}
return out;
"""

LONE = {"k\ud83d": "v\udc00", "pair": "\ud83d\ude00", "nested": ["\udfff", {"\ud800x": 1}]}
REPAIRED = {"k\ufffd": "v\ufffd", "pair": "\U0001f600", "nested": ["\ufffd", {"\ufffdx": 1}]}


def seed_bytes(
    states: dict[str, tuple[str, int, Any]] | None = None, values: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """The exact bytes the seed writes for these states and values."""
    made = run_node(SEED_JS, {"now": NOW, "states": states or {}, "values": values or {}})
    return {name: text.encode() for name, text in made.items()}


async def put_state(domain: Domain, execution_id: str, raw: bytes, active: bool = True) -> None:
    """Store a state as the seed does: SET it, and SADD its id to the active set."""
    await domain.store.set(domain.keys.workflow(execution_id), raw, 3_600_000)
    if active:
        swap = WorkflowSwap(execution_id, raw, None, None, active=True)
        assert await domain.store.swap_workflow(swap)


# -- the daemon over a real redis-server, with the seed's bytes in it -------------------
@pytest.fixture
async def seeded(
    nursery: trio.Nursery, sock_path: str, redis_server: RedisServer
) -> AsyncIterator[tuple[Daemon, Any]]:
    """A daemon serving from a private redis-server, and a direct client to it."""
    clock = ManualClock()
    config = Config(
        socket=sock_path, redis_enabled=True, redis_url=redis_server.url, cleanup_interval=0
    )
    daemon = Daemon(config, clock=clock)
    await nursery.start(daemon.run)
    assert daemon.failover is not None
    with trio.fail_after(10):
        await daemon.failover.wait_for_backend("redis")
    with redis_server.client() as direct:
        yield daemon, direct
    daemon.shutdown()


async def text_call(sock_path: str, line: str) -> Any:
    """One text-mode request; its answer line, parsed."""
    stream = await trio.open_unix_socket(sock_path)
    async with stream:
        await stream.send_all(line.encode() + b"\n")
        answer = b""
        with trio.fail_after(5):
            while not answer.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"no answer line to {line!r}"
                answer += chunk
    return json.loads(answer)


@pytest.mark.redis_server
async def test_lone_surrogates_the_seed_wrote_are_answered_as_replacement_characters(
    seeded: tuple[Daemon, Any], connect: Connect, sock_path: str
) -> None:
    """session.get, cache.get, workflow.get and active_detailed answer U+FFFD for each
    lone surrogate, over msgpack and text; Redis keeps the seed's bytes."""
    _, direct = seeded
    made = seed_bytes({"state": ("e1", 3, LONE)}, {"session": LONE, "cache": ["\ud83d"]})
    direct.set("wks:session:u1", made["session"], ex=86400)
    direct.set("wks:cache:api:h1", made["cache"], ex=3600)
    direct.set("wks:workflow:e1", made["state"], ex=7200)
    direct.sadd("wks:executions:active", "e1")
    assert b'"k\\ud83d":"v\\udc00"' in made["session"]  # the seed's escapes, as written
    peer = await connect()
    calls: list[tuple[str, list[Any]]] = [
        ("session.get", ["u1"]),
        ("cache.get", ["h1"]),
        ("workflow.get", ["e1"]),
        ("workflow.active_detailed", []),
    ]
    answers = []
    for method, params in calls:
        with trio.fail_after(5):
            response = await peer.call(method, *params)
        assert isinstance(response, Response) and response.error is None, method
        answers.append(response.result)
        line = " ".join([method, *(json.dumps(p) for p in params)])
        assert await text_call(sock_path, line) == response.result, method
    session, cache, state, detailed = answers
    assert session == REPAIRED and cache == ["\ufffd"]
    assert state["data"] == REPAIRED and detailed["workflows"] == [state]
    assert direct.get("wks:session:u1") == made["session"]
    assert direct.get("wks:workflow:e1") == made["state"]


@pytest.mark.redis_server
async def test_the_seed_degenerate_states_answer_every_handler(
    seeded: tuple[Daemon, Any], connect: Connect
) -> None:
    """totalSteps 0 with progress null, and data null: get, update, stats,
    active_detailed, complete and cleanup all answer, none INTERNAL."""
    _, direct = seeded
    made = seed_bytes({"zero": ("z", 0, {}), "nulldata": ("n", 4, None)})
    assert b'"progress":null' in made["zero"] and b'"totalSteps":0' in made["zero"]
    assert b'"data":null' in made["nulldata"]
    for execution_id, name in (("z", "zero"), ("n", "nulldata")):
        direct.set(f"wks:workflow:{execution_id}", made[name], ex=7200)
        direct.sadd("wks:executions:active", execution_id)
    peer = await connect()

    async def call(method: str, *params: Any) -> Any:
        with trio.fail_after(5):
            response = await peer.call(method, *params)
        assert response.error is None, (method, response.error)
        return response.result

    assert (await call("workflow.get", "z"))["progress"] is None
    stats = await call("workflow.stats")
    assert stats["activeExecutions"] == 2 and stats["executionsByStatus"]["running"] == 2
    assert stats["averageProgress"] == 0  # null counts as 0, as in JavaScript
    assert (await call("workflow.active_detailed"))["count"] == 2
    zero = await call("workflow.update", "z", 0, "nothing to do", None)
    assert zero["progress"] is None and zero["completedSteps"] == 0
    assert "estimatedCompletion" not in zero
    bad = await peer.call("workflow.update", "z", 1, "too far", None)
    assert bad.error is not None and bad.error["code"] == "BAD_REQUEST"
    merged = await call("workflow.update", "n", 1, "one", {"a": 1})
    assert merged["data"] == {"a": 1} and merged["progress"] == 25
    assert (await call("workflow.cleanup")) == {"cleaned": 0, "errors": 0}
    done = await call("workflow.complete", "z", "completed", None, {"b": 2})
    assert done["progress"] == 100 and done["data"] == {"b": 2}
    assert json.loads(direct.get("wks:workflow:z"))["status"] == "completed"


@pytest.mark.redis_server
async def test_stats_counts_only_states_that_exist_in_redis(
    seeded: tuple[Daemon, Any], connect: Connect
) -> None:
    """Three ids in the seed's active set, one state gone: stats says 2, as the seed does."""
    _, direct = seeded
    made = seed_bytes({"a": ("a", 2, {}), "b": ("b", 2, {})})
    direct.set("wks:workflow:a", made["a"], ex=7200)
    direct.set("wks:workflow:b", made["b"], ex=7200)
    direct.sadd("wks:executions:active", "a", "b", "gone")
    peer = await connect()
    stats = (await peer.call("workflow.stats")).result
    detailed = (await peer.call("workflow.active_detailed")).result
    assert stats["activeExecutions"] == detailed["count"] == 2


# -- on every backend -------------------------------------------------------------------
async def test_lone_surrogates_are_repaired_on_every_backend(domain: Domain) -> None:
    """A session, cache value and workflow with lone surrogates read back with U+FFFD."""
    made = seed_bytes({"state": ("e1", 2, LONE)}, {"value": LONE})
    await domain.store.set("wks:session:u1", made["value"], None)
    await domain.store.set("wks:cache:api:h", made["value"], None)
    await put_state(domain, "e1", made["state"])
    assert await domain.sessions.get("u1") == REPAIRED
    assert await domain.cache.get("h") == REPAIRED
    state = await domain.workflows.get("e1")
    assert state is not None and state["data"] == REPAIRED
    assert await domain.workflows.active_detailed() == [state]
    assert await domain.store.get("wks:session:u1") == made["value"]  # untouched


def test_decode_repairs_only_lone_surrogates() -> None:
    """Pairs join, lone halves (escaped in either case) become U+FFFD; other values are as
    json.loads gives them, and an escaped backslash before "ud83d" is plain text."""
    pair_lone_text = b'["\\uD83D\\uDE00","\\uDBFF","a\\\\ud83d"]'
    assert decode(pair_lone_text) == ["\U0001f600", "\ufffd", "a\\ud83d"]
    assert decode(b'{"\\ud83d":{"\\udc00":["\\ud83d"]}}') == {"\ufffd": {"\ufffd": ["\ufffd"]}}
    assert decode(b'"\\ud83d"') == "\ufffd"
    assert decode(b'"\\\\\\ud83d\\ud83d\\ude00\\ude00"') == "\\\ufffd\U0001f600\ufffd"
    assert decode(b'{"plain":[1,2.5,null,true]}') == {"plain": [1, 2.5, None, True]}


def test_only_values_with_a_surrogate_escape_are_rewritten(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value whose bytes hold no \\ud8..\\udf escape costs one regex search, no rewrite."""
    from wksd.domain import values

    # Escapes JSON.stringify never writes but json reads: U+00E9 and U+CAFE, no surrogate.
    plain = ('{"k":"' + "é\U0001f600 \\u00e9 \\ucafe " * 40_000 + '"}').encode()
    lone = plain.replace(b"\\ucafe", b"\\udcaf", 1)
    assert values.decode(lone)["k"].count("\ufffd") == 1

    class Refuse:
        def sub(self, *args: object) -> bytes:
            raise AssertionError("rewrote a value without a surrogate escape")

    monkeypatch.setattr(values, "_ESCAPES", Refuse())
    assert values.decode(plain) == json.loads(plain)


def test_decode_agrees_with_javascript_on_generated_strings() -> None:
    """For strings of backslashes, quotes, lone and paired surrogates, decoding the seed's
    JSON.stringify bytes gives JavaScript's toWellFormed() string, as key and as value."""
    import random

    units = ["\\", '"', "a", "u", "d83d", "\ud83d", "\ude00", "\udbff", "\udc00", "é", "😀"]
    rng = random.Random(9)
    strings = ["".join(rng.choices(units, k=rng.randrange(9))) for _ in range(3000)]
    body = "return input.map((s) => [JSON.stringify({[s]: [s]}), s.toWellFormed()]);"
    for (stringified, well_formed), original in zip(run_node(body, strings), strings, strict=True):
        assert decode(stringified.encode()) == {well_formed: [well_formed]}, original


async def test_degenerate_seed_states_on_every_backend(domain: Domain) -> None:
    """totalSteps 0 / progress null and data null, read by every workflow handler."""
    made = seed_bytes({"zero": ("z", 0, {}), "nulldata": ("n", 3, None)})
    await put_state(domain, "z", made["zero"])
    await put_state(domain, "n", made["nulldata"])
    workflows = domain.workflows
    stats = await workflows.stats()
    assert stats.active_executions == 2 and stats.average_progress == 0
    zero = await workflows.update("z", 0, "s", {"x": 1})
    assert zero["progress"] is None and "estimatedCompletion" not in zero
    assert zero["data"] == {"x": 1}
    assert (await workflows.update("n", 0, "s", None))["data"] is None  # left as written
    assert (await workflows.update("n", 1, "s", {"y": 2}))["data"] == {"y": 2}
    assert (await workflows.stats()).average_progress == 17  # (0 + 33) / 2 = 16.5
    assert await workflows.cleanup() == rules.Cleanup(cleaned=0, errors=0)
    assert (await workflows.complete("n", "failed", "e", None))["data"] == {"y": 2}
    assert (await workflows.complete("z", "cancelled", None, None))["progress"] is None


async def test_stats_counts_active_ids_whose_state_exists(domain: Domain) -> None:
    """An id left in the active set after its state expired is not counted."""
    for execution_id in ("a", "b", "c"):
        await domain.workflows.start(execution_id, "w", 2, {})
    await domain.store.delete("wks:workflow:c")
    stats = await domain.workflows.stats()
    assert stats.active_executions == 2
    assert stats.by_status[rules.WorkflowStatus.RUNNING] == 2


ODD_STATES: dict[str, Any] = {
    "no-status": {"executionId": "x", "totalSteps": 2, "startedAt": NOW, "updatedAt": NOW},
    "list-status": {"executionId": "x", "status": ["running"], "totalSteps": 2},
    "dict-id": {"executionId": {"a": 1}, "status": "completed", "completedAt": "soon"},
    "text-numbers": {
        "status": "running",
        "totalSteps": "4",
        "progress": "50",
        "startedAt": "then",
        "updatedAt": "now",
    },
    "float-total": {"status": "running", "totalSteps": 2.5, "updatedAt": None},
    "huge-numbers": {
        "status": "running",
        "totalSteps": 2**60,
        "progress": 10**400,
        "startedAt": 2**53,
        "updatedAt": -(2**60),
    },
    "negative-total": {"status": "running", "totalSteps": -1, "data": [1]},
    "a-list": [1, 2, 3],
    "a-string": "running",
    "null": None,
}


@pytest.mark.parametrize("shape", sorted(ODD_STATES))
async def test_odd_state_shapes_never_raise_internal(domain: Domain, shape: str) -> None:
    """Whatever JSON a state holds, every handler answers: a value or a clear error."""
    raw = json.dumps(ODD_STATES[shape]).encode()
    await put_state(domain, "x", raw)
    workflows = domain.workflows
    assert await workflows.get("x") == ODD_STATES[shape]
    await workflows.active_detailed()
    stats = await workflows.stats()
    assert stats.active_executions == 1
    await workflows.cleanup()
    for change in (
        lambda: workflows.update("x", 1, "s", {"k": 1}),
        lambda: workflows.complete("x", "failed", "e", {"k": 1}),
        lambda: workflows.start("x", "w", 2, {}),
    ):
        with contextlib.suppress(Conflict):  # "cannot change that state"; nothing else
            await change()
    await workflows.stats()


@pytest.mark.parametrize("raw", [b"", b"undefined", b"{not json", b"[" * 100_000])
async def test_stored_bytes_that_are_not_json_read_as_no_value(domain: Domain, raw: bytes) -> None:
    """The seed's ``setex(key, ttl, undefined)`` writes ""; that, other non-JSON and
    JSON too deep to read are no value (the seed's ``data ? JSON.parse(data) : null``),
    never INTERNAL, on every handler."""
    await domain.store.set("wks:session:u1", raw, None)
    await domain.store.set("wks:cache:api:h", raw, None)
    await put_state(domain, "x", raw)
    assert await domain.sessions.get("u1") is None
    assert await domain.cache.get("h") is None
    workflows = domain.workflows
    assert await workflows.get("x") is None
    await workflows.active_detailed()
    assert (await workflows.stats()).active_executions == 1
    await workflows.cleanup()
    with contextlib.suppress(Conflict):
        await workflows.update("x", 1, "s", {"k": 1})
    await workflows.start("x", "w", 2, {})
    assert (await workflows.get("x"))["status"] == "running"


async def test_numbers_beyond_javascripts_safe_integers_are_no_numbers(domain: Domain) -> None:
    """A progress or time past 2**53 - 1 (MAX_SAFE_INTEGER) is not the seed's: progress
    counts 0, a run with no readable time is stale, and no ETA comes from it."""
    state = {"status": "running", "totalSteps": 4, "progress": 2**53, "startedAt": 2**53}
    await put_state(domain, "x", json.dumps(state).encode())
    assert (await domain.workflows.stats()).average_progress == 0
    assert "estimatedCompletion" not in await domain.workflows.update("x", 1, "s", None)
    state = {"status": "running", "totalSteps": 4, "progress": 2**53 - 1, "updatedAt": 2**53}
    await put_state(domain, "y", json.dumps(state).encode())
    assert (await domain.workflows.stats()).average_progress == round((2**53 - 1 + 25) / 2)
    assert await domain.workflows.cleanup() == rules.Cleanup(cleaned=1, errors=0)
    assert (await domain.workflows.get("y") or {})["status"] == "failed"


async def test_an_unreadable_state_is_replaced_by_start(domain: Domain) -> None:
    """A state that is not a map (or not JSON) is not active: start replaces it;
    update and complete answer CONFLICT."""
    await put_state(domain, "x", b"[1,2]")
    with pytest.raises(Conflict, match="not a map"):
        await domain.workflows.update("x", 1, "s", None)
    with pytest.raises(Conflict, match="not a map"):
        await domain.workflows.complete("x", "completed", None, None)
    assert (await domain.workflows.start("x", "w", 2, {}))["status"] == "running"


async def test_update_of_a_state_without_a_usable_total_conflicts(domain: Domain) -> None:
    """totalSteps missing, fractional or negative: update is CONFLICT, complete works."""
    await put_state(domain, "x", b'{"executionId":"x","status":"running"}')
    with pytest.raises(Conflict, match="totalSteps"):
        await domain.workflows.update("x", 0, "s", None)
    assert (await domain.workflows.complete("x", "completed", None, None))["progress"] == 100


# -- progress, as JavaScript computes it ------------------------------------------------
def test_progress_matches_javascript_for_every_pair_up_to_200() -> None:
    """Math.round((completed / total) * 100) in doubles, for 0 <= completed <= total <= 200."""
    pairs = [(c, t) for t in range(201) for c in range(t + 1)]
    body = "return input.map(([c, t]) => Math.round((c / t) * 100));"
    expected = run_node(body, pairs)
    ours = [rules.js_progress(c, t) for c, t in pairs]
    exact = [None if t == 0 else (200 * c + t) // (2 * t) for c, t in pairs]
    print(
        f"{len(pairs)} pairs; exact half-up rounding differs from node on "
        f"{sum(e != x for e, x in zip(exact, expected, strict=True))}"
    )
    assert ours == expected
    assert rules.js_progress(23, 40) == 57


def test_js_round_is_not_floor_of_x_plus_a_half() -> None:
    """0.49999999999999994 rounds to 0 (x + 0.5 would round up to 1.0), as in node."""
    values = [0.49999999999999994, 0.5, 1.5, 2.5, -0.5, 57.49999999999999, 4503599627370497.0]
    assert [rules.js_round(v) for v in values] == run_node("return input.map(Math.round);", values)
    assert rules.js_round(float("nan")) is None


async def test_update_writes_the_seed_progress_on_every_backend(domain: Domain) -> None:
    """23 of 40 steps is 57, as the seed writes it; the ETA keeps the exact fraction."""
    started = (await domain.workflows.start("e1", "w", 40, {}))["startedAt"]
    domain.clock.advance(23)
    state = await domain.workflows.update("e1", 23, "s", None)
    assert state["progress"] == 57
    assert state["estimatedCompletion"] == started + 40_000  # 23 s / (23/40)


# -- stale-while-revalidate metadata against the seed's SET ------------------------------
@pytest.fixture(params=["memory", "redis"])
async def swr(
    request: pytest.FixtureRequest, nursery: trio.Nursery, sock_path: str
) -> AsyncIterator[tuple[Daemon, ManualClock, Any]]:
    """A daemon (memory, or over a private redis-server) with a manual clock, and a
    function writing a cache value as the seed does (a plain SET EX)."""
    clock = ManualClock()
    direct = None
    if request.param == "memory":
        daemon = Daemon(Config(socket=sock_path, cleanup_interval=0), clock=clock)

        async def seed_set(key: str, raw: bytes, ttl: int) -> None:
            await daemon.store.set(f"wks:cache:api:{key}", raw, ttl * 1000)

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        config = Config(
            socket=sock_path, redis_enabled=True, redis_url=server.url, cleanup_interval=0
        )
        daemon = Daemon(config, clock=clock)
        direct = server.client()

        async def seed_set(key: str, raw: bytes, ttl: int) -> None:
            direct.set(f"wks:cache:api:{key}", raw, ex=ttl)

    await nursery.start(daemon.run)
    if daemon.failover is not None:
        with trio.fail_after(10):
            await daemon.failover.wait_for_backend("redis")
    yield daemon, clock, seed_set
    daemon.shutdown()
    if direct is not None:
        direct.close()


async def stale_fill(peer: Any, clock: ManualClock, key: str, value: Any) -> None:
    """Fill ``key`` for 10 s fresh + 60 s stale, then let it go stale."""
    token = (await peer.call("cache.lease", key)).result["token"]
    assert (await peer.call("cache.fill", key, token, value, 10, 60)).result == {"filled": True}
    clock.advance(11)
    stale = (await peer.call("cache.lease", key, 30, 0)).result
    assert stale["status"] == "stale" and stale["value"] == value
    # The refresh lease that came with it, handed back: no flight is left over.
    await peer.call("cache.abandon", key, stale["token"], None)


async def test_a_seed_set_after_a_stale_fill_is_fresh(
    swr: tuple[Daemon, ManualClock, Any], connect: Connect
) -> None:
    """The seed's SET EX of a new value, or of the same bytes, ends the old metadata."""
    _, clock, seed_set = swr
    peer = await connect()
    await stale_fill(peer, clock, "k", "old")
    await seed_set("k", b'"new"', 3600)
    assert (await peer.call("cache.lease", "k")).result == {"status": "hit", "value": "new"}
    await stale_fill(peer, clock, "k2", "same")
    await seed_set("k2", b'"same"', 3600)
    assert (await peer.call("cache.lease", "k2")).result == {"status": "hit", "value": "same"}


async def test_cache_set_and_delete_after_a_stale_fill_end_the_metadata(
    swr: tuple[Daemon, ManualClock, Any], connect: Connect
) -> None:
    """cache.set of a new value is fresh; after cache.delete a new value is a miss, then fresh."""
    _, clock, _ = swr
    peer = await connect()
    await stale_fill(peer, clock, "k", "old")
    await peer.call("cache.set", "k", "new", 3600)
    assert (await peer.call("cache.lease", "k")).result == {"status": "hit", "value": "new"}
    await stale_fill(peer, clock, "k2", "old")
    await peer.call("cache.delete", "k2")
    lease = (await peer.call("cache.lease", "k2")).result
    assert lease["status"] == "lease"
    await peer.call("cache.fill", "k2", lease["token"], "v", 10, 0)
    assert (await peer.call("cache.lease", "k2")).result == {"status": "hit", "value": "v"}


async def test_the_metadata_never_outlives_its_value(
    swr: tuple[Daemon, ManualClock, Any], connect: Connect
) -> None:
    """The metadata expires with the value it describes; a fill without stale_ttl drops it."""
    daemon, clock, _ = swr
    peer = await connect()
    token = (await peer.call("cache.lease", "k")).result["token"]
    await peer.call("cache.fill", "k", token, "v", 10, 60)
    _, value_ttl = await daemon.store.get_with_ttl("wks:cache:api:k")
    meta, meta_ttl = await daemon.store.get_with_ttl("wks:cache:meta:k")
    assert meta is not None and value_ttl is not None and meta_ttl is not None
    assert meta_ttl <= value_ttl
    assert await daemon.store.cache_lookup("k") == (b'"v"', meta)  # bound
    clock.advance(11)
    token = (await peer.call("cache.lease", "k")).result["token"]
    await peer.call("cache.fill", "k", token, "w", 10, 0)
    assert await daemon.store.get("wks:cache:meta:k") is None


async def test_metadata_of_an_older_format_is_ignored(
    swr: tuple[Daemon, ManualClock, Any], connect: Connect
) -> None:
    """A bare fresh-until time (no fingerprint) cannot say whose it is: the value is fresh."""
    daemon, _, seed_set = swr
    await seed_set("k", b'"v"', 3600)
    await daemon.store.set("wks:cache:meta:k", str(NOW - 1).encode(), 3_600_000)
    peer = await connect()
    assert (await peer.call("cache.lease", "k")).result == {"status": "hit", "value": "v"}
    await daemon.store.set("wks:cache:meta:k", b"junk \xff", 3_600_000)
    assert (await peer.call("cache.lease", "k")).result == {"status": "hit", "value": "v"}


# -- write-back after an outage ----------------------------------------------------------
@pytest.fixture
async def host(redis_server: RedisServer, nursery: trio.Nursery) -> tuple[Host, Proxy]:
    """A failover store behind a proxy that can cut it off its redis-server."""
    proxy = Proxy(redis_server.port)
    await nursery.start(proxy.run)
    return await make_host(nursery, proxy.port), proxy


@pytest.mark.redis_server
async def test_write_back_reads_a_seed_state_with_a_lone_surrogate(
    host: tuple[Host, Proxy], redis_server: RedisServer
) -> None:
    """The seed completed the run meanwhile, its data holding a lone surrogate (which
    Redis's cjson refuses): our outage update stays out, the seed's bytes stay."""
    store, proxy = host
    started = await store.workflows.start("e1", "w", 4, {})
    await store.outage(proxy)
    store.clock.advance(5)
    await store.workflows.update("e1", 1, "ours", None)
    theirs = {**started, "status": "completed", "completedAt": 1, "data": {"k": "\ud83d"}}
    made = seed_bytes(values={"theirs": theirs})["theirs"]
    with redis_server.client() as direct:
        direct.set("wks:workflow:e1", made, px=7_200_000)
    await store.recovered(proxy)
    with redis_server.client() as direct:
        assert direct.get("wks:workflow:e1") == made
    assert store.store.pending_writes == 0


@pytest.mark.redis_server
async def test_an_outage_cache_fill_goes_back(
    host: tuple[Host, Proxy], redis_server: RedisServer
) -> None:
    """A fill during an outage is journaled, value and metadata, and written back."""
    store, proxy = host
    await store.outage(proxy)
    await store.store.cache_fill("k", b'"v"', 60_000, b"1 fingerprint")
    assert store.store.pending_writes == 2
    await store.recovered(proxy)
    assert store.store.pending_writes == 0
    with redis_server.client() as direct:
        assert direct.get("wks:cache:api:k") == b'"v"'
        assert direct.get("wks:cache:meta:k") == b"1 fingerprint"
        # Written back one by one, each key keeps what was left of the fill's TTL
        # (their expiries may differ by the milliseconds between the two writes,
        # and the metadata then no longer counts: the value is fresh).
        assert 0 < direct.pttl("wks:cache:meta:k") <= 60_000
        assert 0 < direct.pttl("wks:cache:api:k") <= 60_000


@pytest.mark.parametrize("shape", sorted(ODD_STATES))
def test_cleanup_stamps_any_state_shape_for_the_write_back(shape: str) -> None:
    """What the write-back compares a state by (updatedAt, finished) comes with cleanup's
    swap for a map of any shape; a state that is no map is cleanup's error, nothing else."""
    from clientlib.errors import WksError
    from wksd.store.base import WorkflowStamp
    from wksd.store.memory import MemoryStore

    workflows = Domain(MemoryStore(), KeySpace("wks:"), ManualClock()).workflows
    state = ODD_STATES[shape]
    try:
        swap = workflows._cleanup_swap("x", json.dumps(state).encode(), NOW + 3_601_000)
    except WksError:
        assert not isinstance(state, dict)
        return
    assert swap is not None  # each is finished, or stale an hour on
    if shape == "dict-id":  # completed, without an updatedAt or a usable completedAt
        assert swap.stamp == WorkflowStamp(0, True, NOW + 3_601_000)
    else:  # a stale run, failed now
        assert swap.stamp == WorkflowStamp(NOW + 3_601_000, True, NOW + 3_601_000)


def test_metadata_counts_only_for_the_bytes_it_was_written_for() -> None:
    """A value rewritten with its expiry kept (SET KEEPTTL) has other bytes: the
    fingerprint no longer matches, and the metadata says nothing of it."""
    from wksd.coordination.singleflight import _fingerprint, _fresh_until

    meta = b"%d %s" % (NOW, _fingerprint(b'"v"'))
    assert _fresh_until(b'"v"', meta) == NOW
    assert _fresh_until(b'"w"', meta) is None
    assert _fresh_until(b'"v"', b"%d" % NOW) is None
    assert _fresh_until(b'"v"', b"-1 " + _fingerprint(b'"v"')) is None
