"""The msgpack-RPC decoder and encoders (clientlib.protocol)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from clientlib.errors import ProtocolError
from clientlib.protocol import (
    NEED_DATA,
    Decoder,
    Invalid,
    Notification,
    Request,
    Response,
    encode_notification,
    encode_request,
    encode_response,
    is_binary_start,
)

LIMIT = 4096


def drain(decoder: Decoder) -> list[Any]:
    events = []
    while (event := decoder.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def feed_whole(data: bytes, limit: int = LIMIT) -> list[Any]:
    decoder = Decoder(limit)
    decoder.receive_data(data)
    return drain(decoder)


def feed_bytewise(data: bytes, limit: int = LIMIT) -> list[Any]:
    decoder = Decoder(limit)
    events = []
    for index in range(len(data)):
        decoder.receive_data(data[index : index + 1])
        events.extend(drain(decoder))
    return events


FEEDS = pytest.mark.parametrize("feed", [feed_whole, feed_bytewise], ids=["whole", "bytewise"])

MESSAGES = [
    (encode_request(7, "session.get", ["u1"]), Request(7, "session.get", ["u1"])),
    (encode_response(7, None, {"a": 1}), Response(7, None, {"a": 1})),
    (
        encode_response(None, {"code": "BAD_REQUEST"}, None),
        Response(None, {"code": "BAD_REQUEST"}, None),
    ),
    (encode_notification("workflow.event", [{"x": 1}]), Notification("workflow.event", [{"x": 1}])),
]


@FEEDS
@pytest.mark.parametrize(("wire", "event"), MESSAGES)
def test_each_envelope_decodes(feed: Any, wire: bytes, event: Any) -> None:
    """Every kind of envelope decodes to its typed event, however it arrives."""
    assert feed(wire) == [event]


@FEEDS
def test_pipelined_messages_keep_their_order(feed: Any) -> None:
    """Many messages in one buffer come out one by one, in order."""
    wire = b"".join(encode_request(i, "ping", []) for i in range(50))
    assert [event.msgid for event in feed(wire)] == list(range(50))


def test_trailing_partial_message_waits_for_the_rest() -> None:
    """A complete message followed by part of the next yields one, then NEED_DATA."""
    second = encode_request(2, "cache.get", ["k"])
    decoder = Decoder(LIMIT)
    decoder.receive_data(encode_request(1, "ping", []) + second[:3])
    assert decoder.next_event() == Request(1, "ping", [])
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 3
    decoder.receive_data(second[3:])
    assert decoder.next_event() == Request(2, "cache.get", ["k"])
    assert decoder.buffered == 0


def test_truncated_message_is_never_returned() -> None:
    """A message cut short stays pending; nothing half-decoded comes out."""
    wire = encode_request(1, "session.set", ["u", {"k": "v" * 100}, 60])
    decoder = Decoder(LIMIT)
    decoder.receive_data(wire[:-1])
    assert decoder.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("obj", "msgid", "reason"),
    [
        ({"not": "an array"}, None, "non-empty array"),
        ([], None, "non-empty array"),
        ([0, 1, "ping"], None, "[0, msgid, method, params]"),
        ([0, -1, "ping", []], None, "msgid"),
        ([0, 2**32, "ping", []], None, "msgid"),
        ([0, "7", "ping", []], None, "msgid"),
        ([0, True, "ping", []], None, "msgid"),
        ([0, 9, 42, []], 9, "method must be a string"),
        ([0, 9, b"ping", []], 9, "method must be a string"),
        ([0, 9, "ping", {"a": 1}], 9, "params must be an array"),
        ([3, 1, "ping", []], None, "first element"),
        ([False, 1, "ping", []], None, "first element"),
        ([1, "x", None, None], None, "response"),
        ([2, "event"], None, "notification"),
        ("hello", None, "non-empty array"),
    ],
)
def test_wrong_envelope_shapes_are_invalid_not_fatal(obj: Any, msgid: Any, reason: str) -> None:
    """Valid msgpack with a bad envelope is an Invalid event, and the stream goes on."""
    wire = msgpack.packb(obj) + encode_request(5, "ping", [])
    events = feed_whole(wire)
    assert isinstance(events[0], Invalid)
    assert events[0].msgid == msgid
    assert reason in events[0].reason
    assert events[1] == Request(5, "ping", [])


def test_integer_map_keys_decode_for_a_clear_error_later() -> None:
    """A map with integer keys is valid msgpack and must not kill the stream."""
    assert feed_whole(encode_request(1, "cache.set", ["k", {1: 2}])) == [
        Request(1, "cache.set", ["k", {1: 2}])
    ]


@FEEDS
@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x94\x00\x01\xa4pi\xff\xfe\x90",  # invalid UTF-8 in a str
        b"\x91" * 5000 + b"\x00",  # nested deeper than the unpacker's stack
    ],
    ids=["reserved-byte", "bad-utf8", "deeply-nested"],
)
def test_undecodable_bytes_raise_and_stay_raised(feed: Any, garbage: bytes) -> None:
    """Bytes that are not msgpack raise ProtocolError, and the decoder stays broken."""
    decoder = Decoder(16384)
    decoder.receive_data(encode_request(1, "ping", []) + garbage)
    assert decoder.next_event() == Request(1, "ping", [])
    with pytest.raises(ProtocolError, match="undecodable"):
        drain(decoder)
    decoder.receive_data(encode_request(2, "ping", []))
    with pytest.raises(ProtocolError):
        decoder.next_event()


@pytest.mark.parametrize(
    "header",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
    ],
    ids=["str32", "bin32", "array32", "map32"],
)
def test_huge_length_headers_fail_without_buffering_gigabytes(header: bytes) -> None:
    """A length header beyond the limit fails once the limit's worth is buffered, or at once."""
    decoder = Decoder(LIMIT)
    decoder.receive_data(b"\x94\x00\x01\xa4ping\x91" + header)
    with pytest.raises(ProtocolError):
        for _ in range(LIMIT):
            if decoder.next_event() is NEED_DATA:
                decoder.receive_data(b"\x00" * 512)
    assert decoder.buffered <= LIMIT


def test_message_of_exactly_the_limit_passes_and_one_byte_more_fails() -> None:
    """The limit is on one message's encoded size, exact to the byte."""

    def request_of_size(size: int) -> bytes:
        base = encode_request(1, "cache.set", ["k", ""])
        wire = encode_request(1, "cache.set", ["k", "x" * (size - len(base) - 2)])
        assert len(wire) == size
        return wire

    assert feed_bytewise(request_of_size(LIMIT))[0].msgid == 1
    with pytest.raises(ProtocolError, match="larger than"):
        feed_whole(request_of_size(LIMIT + 1))


def test_limit_counts_a_message_made_of_many_small_items() -> None:
    """An array of many one-byte items cannot outgrow the limit while being consumed."""
    decoder = Decoder(LIMIT)
    # 4000 items, each within every per-item limit, 12 KB in all.
    decoder.receive_data(b"\x94\x00\x01\xa4ping\xdc\x0f\xa0")
    with pytest.raises(ProtocolError, match="larger than"):
        for _ in range(4000):
            decoder.receive_data(b"\x92\x01\x01")
            assert decoder.next_event() is NEED_DATA


def test_many_small_messages_in_one_buffer_exceed_no_limit() -> None:
    """The limit is per message: a buffer of many small ones is fine."""
    wire = b"".join(encode_request(i, "ping", ["x" * 100]) for i in range(200))
    assert len(wire) > 4 * LIMIT
    assert len(feed_whole(wire)) == 200


def test_request_encoding_round_trips() -> None:
    """encode_request produces the four-element msgpack-RPC request array."""
    assert msgpack.unpackb(encode_request(3, "lock.status", ("e",))) == [0, 3, "lock.status", ["e"]]


def test_decoder_refuses_a_useless_limit() -> None:
    """A limit too small for any message is a programming error, caught at once."""
    with pytest.raises(ValueError):
        Decoder(8)


@FEEDS
@pytest.mark.parametrize(
    "key",
    [b"\x91\x01", b"\x81\xa1a\x01"],
    ids=["array-key", "map-key"],
)
def test_an_unhashable_map_key_is_a_protocol_error(feed: Any, key: bytes) -> None:
    """A map keyed by an array or map raises ProtocolError (never a TypeError),
    whole or byte by byte, and the decoder stays broken."""
    wire = encode_request(1, "ping", []) + b"\x94\x00\x02\xa4ping\x91\x81" + key + b"\x02"
    with pytest.raises(ProtocolError, match="unsupported map key"):
        feed(wire)


def test_lone_surrogates_are_sent_as_replacement_characters() -> None:
    """A string UTF-8 cannot hold goes out with U+FFFD per surrogate, keys included."""
    wire = encode_response(3, None, {"a\udc00": ["x\ud83dy", 1]})
    assert feed_whole(wire) == [Response(3, None, {"a\ufffd": ["x\ufffdy", 1]})]
    note = encode_notification("workflow.event", ["\ud83d"])
    assert feed_whole(note) == [Notification("workflow.event", ["\ufffd"])]


@pytest.mark.parametrize("first", [*range(0x90, 0xA0), 0xDC, 0xDD])
def test_every_request_starts_with_an_array_header(first: int) -> None:
    """is_binary_start accepts the three array headers every msgpack-RPC message begins with."""
    assert is_binary_start(first)
    assert (
        msgpack.packb([0] * {0x90: 0, 0xDC: 16, 0xDD: 65536}.get(first, first - 0x90))[0] == first
    )
