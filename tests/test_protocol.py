"""The msgpack-RPC decoder and encoders (clientlib.protocol).

Every message is fed whole and one byte at a time (``FEEDS``), and with the
bytes that may arrive right behind it (``TRAILERS``): the start of the next
message, which the decoder must keep for the next parse, or garbage, which it
must reject only after the message before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

#: The message after the one under test: the trailing bytes below are its start.
NEXT = encode_request(99, "cache.get", ["next"])
NEXT_EVENT = Request(99, "cache.get", ["next"])

#: A byte msgpack never uses: whatever follows a message, it is not the next one.
GARBAGE = b"\xc1"


@dataclass
class Fed:
    """What a decoder made of the bytes fed: its events, and the error that stopped it."""

    decoder: Decoder
    events: list[Any] = field(default_factory=list)
    error: ProtocolError | None = None

    def drain(self) -> Fed:
        try:
            while (event := self.decoder.next_event()) is not NEED_DATA:
                self.events.append(event)
        except ProtocolError as exc:
            self.error = exc
        return self


def feed_whole(data: bytes, limit: int = LIMIT) -> Fed:
    """All of ``data`` in one receive_data, then every event it holds."""
    fed = Fed(Decoder(limit))
    fed.decoder.receive_data(data)
    return fed.drain()


def feed_bytewise(data: bytes, limit: int = LIMIT) -> Fed:
    """``data`` one byte at a time, taking the events after each, until an error."""
    fed = Fed(Decoder(limit))
    for index in range(len(data)):
        fed.decoder.receive_data(data[index : index + 1])
        if fed.drain().error is not None:
            break
    return fed


FEEDS = pytest.mark.parametrize("feed", [feed_whole, feed_bytewise], ids=["whole", "bytewise"])

#: Bytes that arrive right behind the message under test, in the same feed.
TRAILERS = pytest.mark.parametrize(
    "trailer",
    [b"", NEXT[:1], NEXT[: len(NEXT) // 2], NEXT[:-1], GARBAGE],
    ids=["nothing", "next-first-byte", "next-half", "next-all-but-one", "garbage"],
)


def assert_trailer_kept(fed: Fed, trailer: bytes) -> None:
    """The start of the next message is kept and completes it when the rest comes;
    bytes that are not msgpack are rejected, and the decoder stays broken."""
    if trailer == GARBAGE:
        assert fed.error is not None and "undecodable" in str(fed.error)
        with pytest.raises(ProtocolError):
            fed.decoder.next_event()
        return
    assert fed.error is None
    assert fed.decoder.buffered == len(trailer)
    fed.decoder.receive_data(NEXT[len(trailer) :])
    assert fed.decoder.next_event() == NEXT_EVENT
    assert fed.decoder.next_event() is NEED_DATA and fed.decoder.buffered == 0


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
@TRAILERS
@pytest.mark.parametrize(("wire", "event"), MESSAGES)
def test_each_envelope_decodes(feed: Any, trailer: bytes, wire: bytes, event: Any) -> None:
    """Every kind of envelope decodes to its typed event, however it arrives and whatever
    arrives behind it."""
    fed = feed(wire + trailer)
    assert fed.events == [event]
    assert_trailer_kept(fed, trailer)


@FEEDS
@TRAILERS
def test_pipelined_messages_keep_their_order(feed: Any, trailer: bytes) -> None:
    """Many messages in one buffer come out one by one, in order, before the trailing bytes."""
    wire = b"".join(encode_request(i, "ping", []) for i in range(50))
    fed = feed(wire + trailer)
    assert [event.msgid for event in fed.events] == list(range(50))
    assert_trailer_kept(fed, trailer)


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
@FEEDS
@TRAILERS
def test_wrong_envelope_shapes_are_invalid_not_fatal(
    feed: Any, trailer: bytes, obj: Any, msgid: Any, reason: str
) -> None:
    """Valid msgpack with a bad envelope is an Invalid event, and the stream goes on."""
    fed = feed(msgpack.packb(obj) + encode_request(5, "ping", []) + trailer)
    invalid, after = fed.events
    assert isinstance(invalid, Invalid)
    assert invalid.msgid == msgid
    assert reason in invalid.reason
    assert after == Request(5, "ping", [])
    assert_trailer_kept(fed, trailer)


@FEEDS
@TRAILERS
def test_integer_map_keys_decode_for_a_clear_error_later(feed: Any, trailer: bytes) -> None:
    """A map with integer keys is valid msgpack and must not kill the stream."""
    fed = feed(encode_request(1, "cache.set", ["k", {1: 2}]) + trailer)
    assert fed.events == [Request(1, "cache.set", ["k", {1: 2}])]
    assert_trailer_kept(fed, trailer)


@FEEDS
@TRAILERS
@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x94\x00\x01\xa4pi\xff\xfe\x90",  # invalid UTF-8 in a str
        b"\x91" * 5000 + b"\x00",  # nested deeper than the unpacker's stack
    ],
    ids=["reserved-byte", "bad-utf8", "deeply-nested"],
)
def test_undecodable_bytes_raise_and_stay_raised(feed: Any, trailer: bytes, garbage: bytes) -> None:
    """Bytes that are not msgpack raise ProtocolError after the message before them, and
    the decoder stays broken: nothing behind them is read, now or later."""
    fed = feed(encode_request(1, "ping", []) + garbage + trailer, 16384)
    assert fed.events == [Request(1, "ping", [])]
    assert fed.error is not None and "undecodable" in str(fed.error)
    fed.decoder.receive_data(encode_request(2, "ping", []))
    with pytest.raises(ProtocolError):
        fed.decoder.next_event()


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


def request_of_size(size: int) -> bytes:
    """A cache.set request whose encoding is ``size`` bytes long."""
    base = encode_request(1, "cache.set", ["k", ""])
    wire = encode_request(1, "cache.set", ["k", "x" * (size - len(base) - 2)])
    assert len(wire) == size
    return wire


@FEEDS
@TRAILERS
def test_message_of_exactly_the_limit_passes_and_one_byte_more_fails(
    feed: Any, trailer: bytes
) -> None:
    """The limit is on one message's encoded size, exact to the byte: the bytes behind it
    belong to the next message and count towards that one's limit."""
    fed = feed(request_of_size(LIMIT) + trailer)
    assert [event.msgid for event in fed.events] == [1]
    assert_trailer_kept(fed, trailer)
    too_large = feed(request_of_size(LIMIT + 1) + trailer)
    assert too_large.events == []
    assert too_large.error is not None and "larger than" in str(too_large.error)


def test_limit_counts_a_message_made_of_many_small_items() -> None:
    """An array of many one-byte items cannot outgrow the limit while being consumed."""
    decoder = Decoder(LIMIT)
    # 4000 items, each within every per-item limit, 12 KB in all.
    decoder.receive_data(b"\x94\x00\x01\xa4ping\xdc\x0f\xa0")
    with pytest.raises(ProtocolError, match="larger than"):
        for _ in range(4000):
            decoder.receive_data(b"\x92\x01\x01")
            assert decoder.next_event() is NEED_DATA


@TRAILERS
def test_many_small_messages_in_one_buffer_exceed_no_limit(trailer: bytes) -> None:
    """The limit is per message: a buffer of many small ones is fine."""
    wire = b"".join(encode_request(i, "ping", ["x" * 100]) for i in range(200))
    assert len(wire) > 4 * LIMIT
    fed = feed_whole(wire + trailer)
    assert len(fed.events) == 200
    assert_trailer_kept(fed, trailer)


def test_request_encoding_round_trips() -> None:
    """encode_request produces the four-element msgpack-RPC request array."""
    assert msgpack.unpackb(encode_request(3, "lock.status", ("e",))) == [0, 3, "lock.status", ["e"]]


def test_decoder_refuses_a_useless_limit() -> None:
    """A limit too small for any message is a programming error, caught at once."""
    with pytest.raises(ValueError):
        Decoder(8)


@FEEDS
@TRAILERS
@pytest.mark.parametrize(
    "key",
    [b"\x91\x01", b"\x81\xa1a\x01"],
    ids=["array-key", "map-key"],
)
def test_an_unhashable_map_key_is_a_protocol_error(feed: Any, trailer: bytes, key: bytes) -> None:
    """A map keyed by an array or map raises ProtocolError (never a TypeError), whole
    or byte by byte, after the message before it; the decoder stays broken."""
    wire = encode_request(1, "ping", []) + b"\x94\x00\x02\xa4ping\x91\x81" + key + b"\x02"
    fed = feed(wire + trailer)
    assert fed.events == [Request(1, "ping", [])]
    assert fed.error is not None and "unsupported map key" in str(fed.error)
    with pytest.raises(ProtocolError):
        fed.decoder.next_event()


@FEEDS
@TRAILERS
def test_lone_surrogates_are_sent_as_replacement_characters(feed: Any, trailer: bytes) -> None:
    """A string UTF-8 cannot hold goes out with U+FFFD per surrogate, keys included."""
    wire = encode_response(3, None, {"a\udc00": ["x\ud83dy", 1]})
    fed = feed(wire + trailer)
    assert fed.events == [Response(3, None, {"a\ufffd": ["x\ufffdy", 1]})]
    assert_trailer_kept(fed, trailer)
    note = feed(encode_notification("workflow.event", ["\ud83d"]) + trailer)
    assert note.events == [Notification("workflow.event", ["\ufffd"])]
    assert_trailer_kept(note, trailer)


@pytest.mark.parametrize("first", [*range(0x90, 0xA0), 0xDC, 0xDD])
def test_every_request_starts_with_an_array_header(first: int) -> None:
    """is_binary_start accepts the three array headers every msgpack-RPC message begins with."""
    assert is_binary_start(first)
    assert (
        msgpack.packb([0] * {0x90: 0, 0xDC: 16, 0xDD: 65536}.get(first, first - 0x90))[0] == first
    )
