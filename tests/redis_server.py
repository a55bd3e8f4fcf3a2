"""Private redis-server (and Sentinel) processes that tests may kill, pause and restart.

Never the machine's shared Redis: every server here has its own port and
directory, and dies with its test (or with the chaos run or benchmark that
started it: they use this helper too). Nothing is kept on disk unless asked
for (``aof``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .polling import wait_until
from .processes import require_binary

#: How long a redis-server may take to answer PING on a loaded CI machine.
START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server on 127.0.0.1:``port``, data in ``directory``.

    ``aof`` runs it with ``appendonly yes`` and ``appendfsync always``: a
    SIGKILL and restart then keeps everything it acknowledged. ``sentinel``
    runs a Sentinel whose configuration is ``args``, one line each; ``tls``
    (certificate, key) serves TLS only, on ``port``.
    """

    def __init__(
        self,
        directory: Path,
        *args: str,
        port: int | None = None,
        aof: bool = False,
        sentinel: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.binary = require_binary("redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = args
        self.aof = aof
        self.sentinel = sentinel
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches the caller only, which stops it last
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.kill()  # a server that never came up is not left behind
            raise
        return self

    def _command(self) -> list[str]:
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        if self.sentinel:
            config = self.directory / "sentinel.conf"
            if not config.exists():
                config.write_text("\n".join(self.args) + "\n")
            return [self.binary, str(config), "--sentinel", *where]
        command = [self.binary, *where, "--save", "", "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            command += ["--appendfsync", "always"]
        command += self.args
        if self.tls is not None:
            cert, key = map(str, self.tls)
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", cert, "--tls-key-file", key]
            command += ["--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
        return command

    def _wait_until_up(self) -> None:
        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited at start")
            try:
                with self.client(socket_timeout=1, socket_connect_timeout=1) as probe:
                    probe.ping()
            except redis.exceptions.AuthenticationError:
                return True  # up, and wants a password
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                return False
            return True

        wait_until(up, START_TIMEOUT, f"redis-server on {self.port}")

    def client(self, **options: Any) -> redis.Redis:
        """A plain redis-py client, for checking what the daemon wrote.

        No retries: redis-py retries connection errors by default, which would
        hide what the test is looking at (and slow the start-up polling).
        """
        options.setdefault("retry", Retry(NoBackoff(), 0))
        options.setdefault("socket_timeout", 5)
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls[0]))
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def kill(self) -> None:
        """SIGKILL: gone at once, without a word to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
