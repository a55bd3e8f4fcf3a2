"""Sessions and the API cache, on every backend (wksd.domain.documents)."""

from __future__ import annotations

import json

import pytest

from clientlib.errors import BadRequest, TooLarge
from wksd.domain.values import MAX_VALUE_BYTES

from .conftest import Domain


async def test_session_round_trip(domain: Domain) -> None:
    """A session written is read back equal, and stored as the seed's JSON string."""
    assert await domain.sessions.set("u1", {"role": "admin", "n": [1, 2]}, 60)
    assert await domain.sessions.get("u1") == {"role": "admin", "n": [1, 2]}
    raw = await domain.store.get("wks:session:u1")
    assert raw == b'{"role":"admin","n":[1,2]}'


async def test_session_ttl_is_set_and_touch_resets_it(domain: Domain) -> None:
    """set stores the TTL given; touch replaces it and says whether the session existed."""
    await domain.sessions.set("u1", {}, 60)
    _, ttl = await domain.store.get_with_ttl("wks:session:u1")
    assert ttl is not None and 59_000 < ttl <= 60_000
    assert await domain.sessions.touch("u1", 86400)
    _, ttl = await domain.store.get_with_ttl("wks:session:u1")
    assert ttl is not None and 86_399_000 < ttl <= 86_400_000
    assert not await domain.sessions.touch("nobody", 60)


async def test_session_delete_reports_existence(domain: Domain) -> None:
    """delete is True once, then False; the session is gone."""
    await domain.sessions.set("u1", {}, 60)
    assert await domain.sessions.delete("u1")
    assert not await domain.sessions.delete("u1")
    assert await domain.sessions.get("u1") is None


async def test_cache_holds_any_json_value(domain: Domain) -> None:
    """The cache stores lists, strings, numbers and null under wks:cache:api:."""
    for value in ([1, "a"], "text", 3.25, None, {"nested": {"x": True}}):
        await domain.cache.set("h", value, 10)
        assert await domain.cache.get("h") == value
    assert await domain.store.get("wks:cache:api:h") == b'{"nested":{"x":true}}'
    assert await domain.cache.delete("h")
    assert await domain.cache.get("h") is None


async def test_value_at_the_limit_is_stored_and_one_byte_more_is_too_large(
    domain: Domain,
) -> None:
    """A value of exactly 1 MiB encoded fits; one byte more is TOO_LARGE and not stored."""
    exact = "x" * (MAX_VALUE_BYTES - 2)  # the two quotes make it exact
    await domain.cache.set("big", exact, 10)
    assert len(await domain.store.get("wks:cache:api:big") or b"") == MAX_VALUE_BYTES
    with pytest.raises(TooLarge):
        await domain.cache.set("bigger", exact + "x", 10)
    assert await domain.cache.get("bigger") is None


@pytest.mark.parametrize(
    "value",
    [b"bytes", {b"k": "bytes key"}, {"x": float("nan")}, {"x": float("inf")}, {"s": {1, 2}}],
    ids=["bytes", "bytes-key", "nan", "inf", "set"],
)
async def test_values_without_a_json_form_are_bad_requests(domain: Domain, value: object) -> None:
    """What JSON cannot hold faithfully is refused, and nothing is stored."""
    with pytest.raises(BadRequest):
        await domain.cache.set("k", value, 10)
    assert await domain.cache.get("k") is None


async def test_number_map_keys_become_strings_as_in_json(domain: Domain) -> None:
    """JSON (and JavaScript) keys are strings: {1: x} reads back as {"1": x}."""
    await domain.cache.set("k", {1: "one", None: "nil"}, 10)
    assert await domain.cache.get("k") == {"1": "one", "null": "nil"}


async def test_deeply_nested_value_is_a_bad_request(domain: Domain) -> None:
    """A value nested deeper than JSON encoding allows is refused cleanly."""
    value: object = "leaf"
    for _ in range(5000):
        value = [value]
    with pytest.raises(BadRequest, match="nested"):
        await domain.cache.set("k", value, 10)


async def test_non_ascii_is_stored_as_utf8(domain: Domain) -> None:
    """Non-ASCII text is kept as UTF-8, as JSON.stringify writes it."""
    await domain.sessions.set("u", {"name": "Zoë"}, 10)
    raw = await domain.store.get("wks:session:u")
    assert raw is not None and json.loads(raw) == {"name": "Zoë"}
    assert "Zoë".encode() in raw


async def test_a_value_read_again_is_not_parsed_again_until_it_changes(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoded form of the bytes read last is kept (values.Decoded): the same
    bytes answer the same value without json.loads; bytes written by anyone
    else (here straight into the store, as the seed's app would) are parsed."""
    from wksd.domain import values

    parsed: list[bytes] = []
    loads = json.loads

    def counting_loads(raw: bytes) -> object:
        parsed.append(raw)
        return loads(raw)

    monkeypatch.setattr(values.json, "loads", counting_loads)
    await domain.sessions.set("u1", {"v": 1}, 60)
    first = await domain.sessions.get("u1")
    assert await domain.sessions.get("u1") is first and len(parsed) == 1
    await domain.store.set("wks:session:u1", b'{"v":2}', 60_000)
    assert await domain.sessions.get("u1") == {"v": 2} and len(parsed) == 2
    await domain.store.delete("wks:session:u1")
    assert await domain.sessions.get("u1") is None
    await domain.store.set("wks:session:u1", b'{"v":2}', 60_000)
    assert await domain.sessions.get("u1") == {"v": 2} and len(parsed) == 3


@pytest.mark.parametrize(
    "raw",
    [b'{"a":"\\ud83d"}', b"", b"not json", b'{"x":1}', b"[1,2]", b"null"],
    ids=["lone-surrogate", "empty", "not-json", "map", "list", "null"],
)
def test_the_memory_answers_exactly_what_decode_does(raw: bytes) -> None:
    from wksd.domain.values import Decoded, decode

    decoded = Decoded(1 << 20)
    assert decoded("k", raw) == decode(raw)
    assert decoded("k", bytes(raw)) == decode(raw)  # equal bytes, another object


def test_the_memory_is_bounded_in_bytes() -> None:
    """At most max_bytes of JSON, least recently read out first, no value over
    a sixteenth of the bound."""
    from wksd.domain.values import Decoded

    decoded = Decoded(1600)
    for index in range(40):
        decoded(f"k{index}", b'"' + b"x" * 98 + b'"')
    assert decoded.bytes <= 1600 and len(decoded) == 16
    decoded("big", b'"' + b"x" * 99 + b'"')  # 101 bytes: over 1600 // 16
    assert len(decoded) == 16 and decoded.bytes <= 1600
    assert decoded("k39", None) is None and len(decoded) == 15
