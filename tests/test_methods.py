"""The method table and its dispatcher: params checked and typed at the edge,
typed results turned into wire maps, access denied unless granted (wksd.methods,
wksd.dispatch)."""

from __future__ import annotations

from typing import Any

import pytest

from clientlib.errors import BadRequest, Forbidden, InternalError, UnknownMethod
from wksd.app import Daemon
from wksd.clock import ManualClock
from wksd.config import Config
from wksd.coordination.singleflight import LeaseAnswer, LeaseStatus
from wksd.dispatch import Dispatcher, Method, Param
from wksd.domain.values import MAX_SAFE_INTEGER
from wksd.methods import MAX_ID_BYTES, MAX_TTL_SECONDS, present_lease, text
from wksd.metrics import Metrics
from wksd.session import Later


@pytest.fixture
def daemon() -> Daemon:
    return Daemon(Config(), clock=ManualClock())


async def call(daemon: Daemon, method: str, *params: Any, **options: Any) -> Any:
    """A call from an allowed peer, unless ``options`` say otherwise."""
    return await daemon.dispatcher.call(method, list(params), **{"allowed": True, **options})


def test_every_design_method_is_in_the_table(daemon: Daemon) -> None:
    """The table holds DESIGN section 3's methods plus docs/protocol-extensions.md's."""
    assert set(daemon.dispatcher.methods) == {
        "ping",
        "health",
        "metrics",
        "session.set",
        "session.get",
        "session.delete",
        "session.touch",
        "cache.set",
        "cache.get",
        "cache.delete",
        "workflow.start",
        "workflow.update",
        "workflow.complete",
        "workflow.get",
        "workflow.active",
        "workflow.active_detailed",
        "workflow.stats",
        "workflow.cleanup",
        "lock.acquire",
        "lock.release",
        "lock.extend",
        "lock.status",
        # extensions
        "workflow.subscribe",
        "workflow.unsubscribe",
        "workflow.events",
        "cache.lease",
        "cache.fill",
        "cache.abandon",
    }


async def test_connection_methods_need_a_connection(daemon: Daemon) -> None:
    """A method tied to its connection (keepalive, subscribe) is refused without one."""
    with pytest.raises(BadRequest, match="needs a connection"):
        await call(daemon, "workflow.subscribe")


async def test_identifier_of_exactly_256_bytes_passes_and_257_fails(daemon: Daemon) -> None:
    """Identifiers are at most 256 bytes, counted in UTF-8, not characters."""
    assert await call(daemon, "session.set", "é" * (MAX_ID_BYTES // 2), {}) is True
    with pytest.raises(BadRequest, match="user_id is longer than 256 bytes"):
        await call(daemon, "session.set", "é" * 128 + "x", {})
    with pytest.raises(BadRequest, match="execution_id"):
        await call(daemon, "lock.status", "x" * (MAX_ID_BYTES + 1))


@pytest.mark.parametrize("bad", ["", 5, b"u1", ["u1"], True])
async def test_identifiers_must_be_non_empty_strings(daemon: Daemon, bad: Any) -> None:
    """An empty, numeric, binary or list id is BAD_REQUEST naming the parameter."""
    with pytest.raises(BadRequest, match="user_id must be a non-empty string"):
        await call(daemon, "session.get", bad)


@pytest.mark.parametrize(
    "bad", [0, -1, "60", True, float("nan"), float("inf"), MAX_TTL_SECONDS + 1]
)
async def test_ttls_must_be_positive_finite_seconds(daemon: Daemon, bad: Any) -> None:
    """TTLs are int or float > 0 and at most ten years."""
    with pytest.raises(BadRequest, match="ttl"):
        await call(daemon, "cache.set", "k", 1, bad)


async def test_ttl_accepts_floats_and_the_maximum(daemon: Daemon) -> None:
    """A float TTL and the largest allowed TTL both work."""
    assert await call(daemon, "cache.set", "k", 1, 0.5) is True
    assert await call(daemon, "cache.set", "k", 1, MAX_TTL_SECONDS) is True


async def test_omitted_and_nil_optionals_take_defaults(daemon: Daemon) -> None:
    """ttl omitted or nil means the seed's default (86400 s for sessions)."""
    await call(daemon, "session.set", "u1", {"a": 1})
    await call(daemon, "session.set", "u2", {"a": 1}, None)
    for user in ("wks:session:u1", "wks:session:u2"):
        _, ttl = await daemon.store.get_with_ttl(user)
        assert ttl == 86_400_000


async def test_missing_required_param_is_a_bad_request(daemon: Daemon) -> None:
    """A required param that is absent or nil is refused by name."""
    with pytest.raises(BadRequest, match="data is required"):
        await call(daemon, "session.set", "u1")
    with pytest.raises(BadRequest, match="worker_id is required"):
        await call(daemon, "lock.acquire", "e1", None)


async def test_too_many_params_is_a_bad_request(daemon: Daemon) -> None:
    """Extra params are refused, not ignored."""
    with pytest.raises(BadRequest, match="at most 1 params"):
        await call(daemon, "session.get", "u1", "extra")


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("session.set", ["u", [1, 2]], "data must be a map"),
        ("workflow.start", ["e", "w", 0], "total_steps must be an integer from 1"),
        ("workflow.start", ["e", "w", 1.0], "total_steps must be an integer"),
        ("workflow.start", ["e", "w", MAX_SAFE_INTEGER + 1], "total_steps"),
        ("workflow.start", ["e", "w", True], "total_steps"),
        ("workflow.update", ["e", -1, "s"], "completed_steps must be an integer from 0"),
        ("workflow.update", ["e", 1, 5], "current_step must be a string"),
        ("workflow.complete", ["e", "done"], "status must be one of"),
        ("workflow.complete", ["e", "running"], "status must be one of"),
        ("workflow.complete", ["e", "failed", 42], "error must be a string"),
    ],
)
async def test_typed_params_are_checked(
    daemon: Daemon, method: str, params: list[Any], message: str
) -> None:
    """Each param's type and range is checked before the handler runs."""
    with pytest.raises(BadRequest, match=message):
        await call(daemon, method, *params)


async def test_text_params_have_a_length_limit(daemon: Daemon) -> None:
    """current_step and error are at most 64 KiB."""
    await call(daemon, "workflow.start", "e", "w", 2)
    await call(daemon, "workflow.update", "e", 1, "s" * 65536)
    with pytest.raises(BadRequest, match="current_step is longer than 65536 bytes"):
        await call(daemon, "workflow.update", "e", 1, "s" * 65537)


async def test_unknown_method_is_counted_as_other(daemon: Daemon) -> None:
    """An unknown method is UNKNOWN_METHOD, and metrics never grow a label per name."""
    with pytest.raises(UnknownMethod):
        await call(daemon, "no.such.thing")
    text_out = daemon.metrics.render()
    assert 'wksd_requests_total{code="UNKNOWN_METHOD",method="other"} 1.0' in text_out
    assert "no.such.thing" not in text_out


async def test_requests_are_counted_by_method_and_code(daemon: Daemon) -> None:
    """wksd_requests_total counts each answer under its method and code."""
    await call(daemon, "ping")
    with pytest.raises(BadRequest):
        await call(daemon, "session.get", "")
    rendered = daemon.metrics.render()
    assert 'wksd_requests_total{code="OK",method="ping"} 1.0' in rendered
    assert 'wksd_requests_total{code="BAD_REQUEST",method="session.get"} 1.0' in rendered
    assert 'wksd_request_duration_seconds_count{method="ping"} 1.0' in rendered


async def test_admin_methods_need_an_admin(daemon: Daemon) -> None:
    """workflow.cleanup is FORBIDDEN to a peer that is allowed but not admin."""
    with pytest.raises(Forbidden, match="admins only"):
        await call(daemon, "workflow.cleanup", admin=False)
    assert await call(daemon, "workflow.cleanup", admin=True) == {"cleaned": 0, "errors": 0}


async def test_a_peer_not_allowed_is_refused_everything(daemon: Daemon) -> None:
    """A peer outside the allow-lists gets FORBIDDEN, even for ping."""
    with pytest.raises(Forbidden, match="not allowed"):
        await call(daemon, "ping", allowed=False)


async def test_access_is_denied_unless_stated(daemon: Daemon) -> None:
    """A call that does not say its peer is allowed (or an admin) is refused."""
    with pytest.raises(Forbidden, match="not allowed"):
        await daemon.dispatcher.call("ping", [])
    with pytest.raises(Forbidden, match="admins only"):
        await daemon.dispatcher.call("workflow.cleanup", [], allowed=True)


async def test_a_later_answer_is_presented_and_revoked_as_the_handler_gave_it() -> None:
    """A waiting answer reaches the server as its wire map; a revoke gets the typed one."""
    revoked: list[Any] = []

    async def waited() -> int:
        return 7

    async def revoke(answer: Any) -> None:
        revoked.append(answer)

    async def handler() -> Later:
        return Later(waited, lambda: 0, revoke)

    method = Method("wait", (), handler, present=lambda n: {"n": n})
    later = await Dispatcher([method], Metrics()).call("wait", [], allowed=True)
    assert isinstance(later, Later) and later.revoke is not None
    assert later.give_up() == {"n": 0}
    sent = await later.wait()
    assert sent == {"n": 7}
    await later.revoke(sent)
    assert revoked == [7]


@pytest.mark.parametrize(
    ("answer", "keys"),
    [
        (LeaseAnswer(LeaseStatus.HIT, 1), ["status", "value"]),
        (LeaseAnswer(LeaseStatus.STALE, 1, None), ["status", "value", "token"]),
        (LeaseAnswer(LeaseStatus.LEASE, token="t"), ["status", "token"]),
        (LeaseAnswer(LeaseStatus.TIMEOUT), ["status"]),
        (LeaseAnswer(LeaseStatus.FAILED, error="e"), ["status", "error"]),
    ],
)
def test_a_lease_answer_has_the_fields_of_its_status(answer: LeaseAnswer, keys: list[str]) -> None:
    """cache.lease's map holds the fields its status has, in the wire's order."""
    assert list(present_lease(answer)) == keys


async def test_lenient_mode_reads_integers_as_identifiers(daemon: Daemon) -> None:
    """In text mode, `session.get 123` means the user "123"; binary mode stays strict."""
    await call(daemon, "session.set", "123", {"a": 1})
    assert await call(daemon, "session.get", 123, lenient=True) == {"a": 1}
    with pytest.raises(BadRequest):
        await call(daemon, "session.get", 123)


async def test_handler_crash_is_an_internal_error_without_detail(daemon: Daemon) -> None:
    """An unexpected exception becomes INTERNAL, its text kept out of the answer."""

    async def broken(value: str) -> None:
        raise KeyError(value)

    daemon.dispatcher.methods["broken"] = Method("broken", (Param("value", text),), broken)
    with pytest.raises(InternalError) as caught:
        await call(daemon, "broken", "secret-value")
    assert "secret-value" not in caught.value.message


async def test_health_on_the_memory_default(daemon: Daemon) -> None:
    """health: healthy, memory backend, Redis disabled (not down), key count."""
    await call(daemon, "session.set", "u1", {})
    health = await call(daemon, "health")
    assert health["status"] == "healthy" and health["backend"] == "memory"
    assert health["checks"]["redis"]["status"] == "disabled"
    assert health["checks"]["memory"] == {"status": "up", "keys": 1}
    assert health["version"] and health["uptime"] >= 0


async def test_health_is_unhealthy_when_memory_is_full() -> None:
    """A memory store at its bound (writes would fail FULL) reports unhealthy."""
    daemon = Daemon(Config(memory_max_keys=1), clock=ManualClock())
    await call(daemon, "session.set", "u1", {})
    health = await call(daemon, "health")
    assert health["status"] == "unhealthy"
    assert health["checks"]["memory"]["status"] == "full"


async def test_metrics_carry_the_seed_names_and_memory_figures(daemon: Daemon) -> None:
    """metrics has the seed's three names and the wksd_ ones for memory and backend."""
    await call(daemon, "cache.set", "k", 1)
    rendered = await call(daemon, "metrics")
    for name in (
        "redis_commands_total",
        "redis_commands_failed_total",
        "redis_connection_status 0.0",
        "wksd_memory_keys 1.0",
        'wksd_backend{backend="memory"} 1.0',
        "wksd_memory_evictions_total 0.0",
        "wksd_connections 0.0",
        "wksd_sweeper_evictions_total 0.0",
    ):
        assert name in rendered
