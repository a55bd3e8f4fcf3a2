"""wksd as a system service, with the real tools: socket activation, sd_notify,
HTTP probes, peers of other uids, and SIGTERM under load (wksd.systemd, wksd.http)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clientlib import Client, DaemonUnavailable
from wksd.systemd import Notifier

from .polling import wait_until
from .processes import DaemonProcess, require_binary, wait_until_serving
from .redis_server import RedisServer, free_port


class NotifyReceiver:
    """A NOTIFY_SOCKET of our own, as systemd would hold it."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> dict[str, str]:
        """The next message carrying ``key`` (with ``value``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                raw = self.socket.recv(4096).decode()
            except TimeoutError:
                raise TimeoutError(f"no {key}={value or '*'} from the daemon") from None
            message = dict(line.split("=", 1) for line in raw.splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def notify(sock_path: str) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(os.path.dirname(sock_path))
    yield receiver
    receiver.close()


def test_socket_activation_serves_on_the_inherited_socket(sock_path: str) -> None:
    """Under systemd-socket-activate the daemon serves the socket it is handed, and leaves it."""
    activate = require_binary("systemd-socket-activate")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [
                activate,
                "-l",
                sock_path,
                "--fdname=wksd.socket",
                "-E",
                "WKSD_LOG_LEVEL=info",
                sys.executable,
                "-m",
                "wksd",
                "--socket",
                "/nonexistent/not-used.sock",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_serving(sock_path, process)
            with Client(sock_path) as c:  # the first connection starts the daemon
                assert c.ping() == "PONG"
                assert c.health().status == "healthy"
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read().decode()
    serving = [json.loads(line) for line in output.splitlines() if '"serving"' in line]
    assert serving and serving[0]["activated"] is True and serving[0]["socket"] == sock_path
    assert os.path.exists(sock_path)  # systemd's socket, not the daemon's to remove


def test_notify_ready_watchdog_and_stopping(sock_path: str, notify: NotifyReceiver) -> None:
    """READY=1 with a STATUS once serving, WATCHDOG=1 at half WATCHDOG_USEC, then STOPPING=1."""
    daemon = DaemonProcess(sock_path, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    daemon.start()
    try:
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"] == "serving from memory (Redis disabled)"
        assert daemon.process is not None and ready["MAINPID"] == str(daemon.process.pid)
        for _ in range(3):
            notify.wait_for("WATCHDOG", "1", timeout=5)
        daemon.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        assert daemon.wait() == 0
    finally:
        daemon.close()


def test_status_follows_the_backend(
    sock_path: str, notify: NotifyReceiver, redis_server: RedisServer
) -> None:
    """STATUS= says where data goes, and changes when Redis goes and comes back."""
    env = {
        "NOTIFY_SOCKET": notify.path,
        "REDIS_ENABLED": "1",
        "REDIS_URL": redis_server.url,
        "WKSD_REDIS_TIMEOUT": "0.25",
        "WKSD_REDIS_RETRY_MAX": "0.3",
    }
    daemon = DaemonProcess(sock_path, env).start()
    try:
        assert notify.wait_for("READY", "1")["STATUS"] == "serving from Redis"
        redis_server.kill()
        with Client(sock_path) as c:
            c.set_session("u", {})  # a request notices the loss at once
        notify.wait_for("STATUS", "serving from memory; Redis down, reconnecting")
        redis_server.start()
        notify.wait_for("STATUS", "serving from Redis")
    finally:
        daemon.close()


def test_watchdog_is_off_without_usec_or_for_another_pid() -> None:
    """No WATCHDOG_USEC, or a WATCHDOG_PID that is not ours, means no pings."""
    assert Notifier({}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    ours = Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_interval == 5.0


def test_notifier_without_notify_socket_is_silent() -> None:
    """Outside systemd every notification is a harmless no-op."""
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.stopping()


def get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        body = error.read().decode()
        headers = dict(error.headers)
        error.close()
        return error.code, body, headers


def test_metrics_and_health_over_http(sock_path: str) -> None:
    """/metrics is the exposition, /health the document (200), others 404/405."""
    port = free_port()
    daemon = DaemonProcess(sock_path, {"WKSD_METRICS_ADDR": f"127.0.0.1:{port}"}).start()
    try:
        with Client(sock_path) as c:
            c.ping()
        status, body, headers = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert 'wksd_requests_total{code="OK",method="ping"} 1.0' in body
        status, body, _ = get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and json.loads(body)["status"] == "healthy"
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", method="POST", data=b"x"
        )
        assert get(request)[0] == 405  # type: ignore[arg-type]
    finally:
        daemon.close()


def test_a_metrics_port_in_use_stops_the_daemon_at_start(sock_path: str) -> None:
    """WKSD_METRICS_ADDR on a taken port: one log line and exit 69, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "wksd",
                "--socket",
                sock_path,
                "--metrics-addr",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 69
    assert "cannot serve" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert not os.path.exists(sock_path)


def test_health_over_http_is_503_when_unhealthy(sock_path: str) -> None:
    """A memory store at its bound makes /health answer 503 for probes."""
    port = free_port()
    env = {"WKSD_METRICS_ADDR": f"127.0.0.1:{port}", "WKSD_MEMORY_MAX_KEYS": "1"}
    daemon = DaemonProcess(sock_path, env).start()
    try:
        with Client(sock_path) as c:
            c.set_session("only", {})
        status, body, _ = get(f"http://127.0.0.1:{port}/health")
        assert status == 503 and json.loads(body)["status"] == "unhealthy"
    finally:
        daemon.close()


# -- peers of other uids, for real --------------------------------------------------
NOBODY = 65534


def as_other_user(path: str, lines: str, *setpriv_args: str) -> str:
    """Send text-protocol lines through socat run as uid/gid 65534 under setpriv."""
    setpriv, socat = require_binary("setpriv"), require_binary("socat")
    done = subprocess.run(
        [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            *setpriv_args,
            socat,
            "-",
            f"UNIX-CONNECT:{path}",
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_peer_outside_the_allow_lists_is_refused(open_socket_path: str) -> None:
    """A client running as another uid, in no allowed group, gets FORBIDDEN for everything."""
    daemon = DaemonProcess(open_socket_path, {"WKSD_SOCKET_MODE": "0666"}).start()
    try:
        out = as_other_user(open_socket_path, "ping\nsession.get u1\n", "--clear-groups")
        assert [json.loads(line)["error"]["code"] for line in out.splitlines()] == [
            "FORBIDDEN",
            "FORBIDDEN",
        ]
    finally:
        daemon.close()


def test_an_allowed_peer_that_is_no_admin_is_limited(open_socket_path: str) -> None:
    """An allowed uid may work, but not call workflow.cleanup."""
    env = {"WKSD_SOCKET_MODE": "0666", "WKSD_ALLOWED_UIDS": f"0 {NOBODY}"}
    daemon = DaemonProcess(open_socket_path, env).start()
    try:
        out = as_other_user(open_socket_path, "ping\nworkflow.cleanup\n", "--clear-groups")
        first, second = out.splitlines()
        assert json.loads(first) == "PONG"
        assert json.loads(second)["error"]["code"] == "FORBIDDEN"
    finally:
        daemon.close()


def test_a_supplementary_group_admits_a_peer(open_socket_path: str) -> None:
    """A peer whose supplementary group is allowed gets in, though its uid and gid are not."""
    env = {"WKSD_SOCKET_MODE": "0666", "WKSD_ALLOWED_GIDS": "4242"}
    daemon = DaemonProcess(open_socket_path, env).start()
    try:
        assert json.loads(as_other_user(open_socket_path, "ping\n", "--groups=4242")) == "PONG"
    finally:
        daemon.close()


def test_sigterm_under_load_answers_every_request_in_flight(sock_path: str) -> None:
    """Busy clients see every request answered; after the exit, only DaemonUnavailable."""
    daemon = DaemonProcess(sock_path).start()
    answered = [0]
    lost: list[BaseException] = []
    after: list[BaseException] = []
    busy = threading.Barrier(9)

    def worker(index: int) -> None:
        with Client(sock_path, timeout=10) as c:
            c.ping()
            busy.wait(30)
            try:
                while True:
                    c.set_session(f"u{index}", {"n": answered[0]})
                    answered[0] += 1
            except DaemonUnavailable as exc:
                after.append(exc)  # the daemon is gone: nothing was sent
            except BaseException as exc:
                lost.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        busy.wait(30)
        start = answered[0]
        wait_until(lambda: answered[0] >= start + 500, what="the load to run")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait() == 0
        for thread in threads:
            thread.join(30)
    finally:
        daemon.close()
    assert lost == []
    assert len(after) == 8


def test_units_install_path_matches_the_readme() -> None:
    """The service runs /opt/wksd/venv/bin/wksd, where the README installs it."""
    unit = (Path(__file__).parent.parent / "systemd" / "wksd.service").read_text()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "ExecStart=/opt/wksd/venv/bin/wksd" in unit
    assert "/opt/wksd/venv" in readme


def test_the_metrics_port_serves_a_bounded_number_of_connections(sock_path: str) -> None:
    """Idle connections up to the cap hold their places; one more gets 503 at once, and
    the port serves again as soon as they close; the socket's clients never notice."""
    from wksd.http import MAX_CONNECTIONS

    port = free_port()
    daemon = DaemonProcess(sock_path, {"WKSD_METRICS_ADDR": f"127.0.0.1:{port}"}).start()
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        with Client(sock_path) as c:
            wait_until(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 503, timeout=10)
            status, body, _ = get(f"http://127.0.0.1:{port}/health")
            assert status == 503 and body == "too many connections\n"
            assert c.ping() == "PONG"
            for sock in idle:
                sock.close()
            wait_until(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=10)
    finally:
        for sock in idle:
            sock.close()
        daemon.close()
