"""Raw msgpack-RPC connections for tests: bytes out, decoded messages in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from clientlib.protocol import NEED_DATA, Decoder, Notification, Response, encode_request


class Peer:
    """A raw client: bytes out, decoded messages in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = Decoder(64 * 1024 * 1024)

    async def request(self, msgid: int, method: str, *params: Any) -> None:
        await self.stream.send_all(encode_request(msgid, method, list(params)))

    async def next(self) -> Any:
        """The next message, or None at end of stream."""
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.receive_data(data)

    async def call(self, method: str, *params: Any) -> Response:
        await self.request(1, method, *params)
        response = await self.next()
        assert isinstance(response, Response)
        return response

    async def next_response(self) -> Response:
        """The next response, skipping notifications."""
        while True:
            message = await self.next()
            assert message is not None, "connection closed"
            if isinstance(message, Response):
                return message

    async def next_notification(self) -> Notification:
        """The next notification, skipping responses."""
        while True:
            message = await self.next()
            assert message is not None, "connection closed"
            if isinstance(message, Notification):
                return message


Connect = Callable[[], Awaitable[Peer]]


@pytest.fixture
async def connect(sock_path: str) -> AsyncIterator[Connect]:
    """Opens raw connections to the daemon; all are closed after the test."""
    opened: list[Peer] = []

    async def open_peer() -> Peer:
        peer = Peer(await trio.open_unix_socket(sock_path))
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        await peer.stream.aclose()
