"""A scripted fake daemon, for what the real one never does (both clients' tests).

A ``FakeDaemon`` listens on a Unix socket in a thread and serves each
connection it accepts with the next behaviour the test gave it: a function
of the connected socket and a fresh ``Decoder`` that reads requests, answers,
pushes notifications, sends garbage or hangs up. The connections stay open
until the test is done with the fake (``close``), so a hang-up is always one
the behaviour made.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clientlib.protocol import Decoder, Request, encode_response

#: How long a fake daemon thread waits for a connection, or for the test to
#: be done with it: far longer than any test takes, short enough not to hang CI.
FAKE_LIFETIME = 10.0

Behaviour = Callable[[socket.socket, Decoder], object]


def read_requests(conn: socket.socket, decoder: Decoder, count: int) -> list[Request]:
    """Block until ``count`` more requests have arrived (or the client hung up)."""
    requests: list[Request] = []
    while len(requests) < count:
        event = decoder.next_event()
        if isinstance(event, Request):
            requests.append(event)
            continue
        data = conn.recv(65536)
        if not data:
            break
        decoder.receive_data(data)
    return requests


def answer(conn: socket.socket, request: Request, result: Any) -> None:
    conn.sendall(encode_response(request.msgid, None, result))


class FakeDaemon:
    """A socket in a thread that serves each accepted connection with the next behaviour."""

    def __init__(self, path: str, behaviours: list[Behaviour]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.listener.settimeout(FAKE_LIFETIME)
        self.done = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, args=(behaviours,), daemon=True)
        self.thread.start()

    def _serve(self, behaviours: list[Behaviour]) -> None:
        held = []
        try:
            for behave in behaviours:
                conn, _ = self.listener.accept()
                self.connections += 1
                held.append(conn)
                behave(conn, Decoder())
            self.done.wait(FAKE_LIFETIME)
        except OSError:
            pass  # the listener was closed: the test is over
        finally:
            for conn in held:
                conn.close()

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        self.thread.join(FAKE_LIFETIME)


@pytest.fixture(name="fake")
def fake_daemons(sock_path: str) -> Iterator[Callable[..., FakeDaemon]]:
    """``fake(behaviour, ...)`` makes a FakeDaemon on ``sock_path``: one
    behaviour per connection it accepts. (Import ``fake_daemons`` into a test
    module to use the fixture ``fake``.)"""
    made: list[FakeDaemon] = []

    def make(*behaviours: Behaviour) -> FakeDaemon:
        made.append(FakeDaemon(sock_path, list(behaviours)))
        return made[-1]

    yield make
    for daemon in made:
        daemon.close()
