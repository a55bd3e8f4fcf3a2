"""The real binary's life: signals, draining, exit status (wksd.cli)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from clientlib import Client
from clientlib.protocol import NEED_DATA, Decoder, Notification, Response, encode_request

from .processes import DaemonProcess


def read_to_close(sock: socket.socket) -> list[Any]:
    """Every message until the daemon closes the connection."""
    decoder = Decoder()
    messages = []
    while data := sock.recv(65536):
        decoder.receive_data(data)
        while (event := decoder.next_event()) is not NEED_DATA:
            messages.append(event)
    return messages


def read_one(sock: socket.socket) -> Any:
    """The next message on a connection that has sent nothing else yet."""
    decoder = Decoder()
    while (event := decoder.next_event()) is NEED_DATA:
        data = sock.recv(65536)
        assert data, "the daemon closed the connection"
        decoder.receive_data(data)
    return event


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests_and_exits_0(sock_path: str, sig: int) -> None:
    """On SIGTERM or SIGINT every request already sent is answered, then exit 0."""
    daemon = DaemonProcess(sock_path, {"WKSD_LOG_LEVEL": "info"}).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(sock_path)
            sock.sendall(
                b"".join(
                    encode_request(i, "session.set", [f"u{i}", {"i": i}, 60]) for i in range(2000)
                )
            )
            daemon.send_signal(sig)
            messages = read_to_close(sock)
        assert daemon.wait() == 0
        logs = [json.loads(line) for line in daemon.output.splitlines()]
    finally:
        daemon.close()
    # Whatever the daemon had read before the signal was answered, in order, OK,
    # and the last word was the closing notice.
    answers = [m for m in messages if isinstance(m, Response)]
    assert answers and [a.msgid for a in answers] == list(range(len(answers)))
    assert messages[-1] == Notification("closing", ["wksd is shutting down"])
    assert all(a.error is None for a in answers)
    assert not os.path.exists(sock_path)
    # One JSON object a line; the life story is there, no user id or value is.
    assert [entry["event"] for entry in logs][-3:] == ["signal received", "stopping", "stopped"]
    assert logs[0]["event"] == "serving"
    assert all("u1" not in json.dumps(entry) for entry in logs)


def test_idle_connections_do_not_hold_up_the_exit(sock_path: str) -> None:
    """Clients that are connected but silent are told ``closing`` and closed on SIGTERM,
    without the drain running into its shutdown timeout."""
    daemon = DaemonProcess(sock_path, {"WKSD_LOG_LEVEL": "info"}).start()
    try:
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
        for index, sock in enumerate(idle):
            sock.connect(sock_path)
            sock.sendall(encode_request(index, "ping", []))
            assert read_one(sock) == Response(index, None, "PONG")  # served, and now silent
        daemon.send_signal(signal.SIGTERM)
        heard = [read_to_close(sock) for sock in idle]
        assert daemon.wait() == 0
        logs = [json.loads(line) for line in daemon.output.splitlines()]
    finally:
        for sock in idle:
            sock.close()
        daemon.close()
    assert heard == [[Notification("closing", ["wksd is shutting down"])]] * 5
    assert next(entry for entry in logs if entry["event"] == "stopping")["connections"] == 5
    assert not [entry for entry in logs if entry["event"].startswith("shutdown timeout")]


def test_second_daemon_on_a_live_socket_exits_with_an_error(
    daemon_process: DaemonProcess,
) -> None:
    """Starting a second daemon on a served path fails (exit 69) and leaves the first alone."""
    second = subprocess.run(
        [sys.executable, "-m", "wksd", "--socket", daemon_process.path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 69
    assert "another wksd is serving" in second.stdout
    with Client(daemon_process.path) as c:
        assert c.ping() == "PONG"


def test_socket_directory_is_created() -> None:
    """The daemon makes the socket's directory when it does not exist yet."""
    with tempfile.TemporaryDirectory(prefix="wksd-", dir="/tmp") as base:
        path = os.path.join(base, "run", "wksd", "wksd.sock")
        daemon = DaemonProcess(path).start()
        try:
            with Client(path) as c:
                assert c.ping() == "PONG"
        finally:
            daemon.close()
