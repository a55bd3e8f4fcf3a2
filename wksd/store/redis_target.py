"""Where Redis is, how to log in, and how to open a link to it.

``RedisTarget.from_config`` reads the configuration once at start: a
``redis://``, ``rediss://`` or ``unix://`` URL (parsed by redis-py), or a
``redis+sentinel://host:port[,host:port]/master[/db]`` URL, or the
``REDIS_HOST``/``PORT``/``DB`` and ``REDIS_SENTINELS`` variables. The password
comes from the URL, else ``REDIS_PASSWORD``, else ``REDIS_PASSWORD_FILE``,
else ``$CREDENTIALS_DIRECTORY/redis-password`` (systemd's LoadCredential).

``open_link`` resolves the address (asking the Sentinels for the master, each
time, so a failover is followed), connects, and logs in: AUTH, SELECT and
CLIENT SETNAME wksd go out in one write. With Sentinel it also checks that the
node really is the master (ROLE), because a demoted master still accepts
connections.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import trio
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError
from redis.sentinel import MasterNotFoundError, Sentinel

from ..config import Config, ConfigError
from ..sockio import SocketIO
from .redis_link import RedisLink

__all__ = ["RedisTarget", "TooOld", "WrongRole", "open_link", "open_stream"]

#: The name wksd gives its connection (CLIENT SETNAME), so an operator can
#: count them in CLIENT LIST.
CLIENT_NAME: Final = "wksd"


class WrongRole(ConnectionError):
    """The node Sentinel named is not (or no longer) the master."""


class TooOld(ConnectionError):
    """The Redis lacks a command wksd needs: it is older than 7.0."""


#: A command of Redis 7.0 the lock and cache scripts use (they bind wksd's
#: own keys to the expiry of the seed's), sent once at connect on a key that
#: need not exist: a Redis without it is refused at once, with the reason,
#: instead of failing every lock later.
VERSION_PROBE: Final = ("PEXPIRETIME", "wksd:version-probe")


@dataclass(frozen=True)
class RedisTarget:
    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "mymaster"

    def describe(self) -> str:
        """Where Redis is, for logs: never the password."""
        if self.sentinels:
            nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {nodes} master {self.master} db {self.db}"
        if self.path:
            return f"unix:{self.path} db {self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> RedisTarget:
        environ = os.environ if environ is None else environ
        settings: dict[str, Any] = {
            "host": config.redis_host,
            "port": config.redis_port,
            "db": config.redis_db,
            "master": config.redis_sentinel_master,
        }
        if config.redis_sentinels:
            settings["sentinels"] = _nodes(config.redis_sentinels, "REDIS_SENTINELS")
        if config.redis_url:
            settings.update(_from_url(config.redis_url))
        if settings.get("password") is None:
            settings["password"] = _password(config, environ)
        return cls(**settings)

    async def locate(self, socket_timeout: float) -> tuple[str, int] | str:
        """The address to connect to now: a (host, port) or a socket path."""
        if self.path:
            return self.path
        if not self.sentinels:
            return self.host, self.port
        try:
            host, port = await trio.to_thread.run_sync(self._ask_sentinels, socket_timeout)
        except MasterNotFoundError as exc:
            raise ConnectionError(f"no Sentinel knows a master {self.master!r}: {exc}") from exc
        return str(host), int(port)

    def _ask_sentinels(self, socket_timeout: float) -> tuple[str, int]:
        # redis-py's blocking Sentinel client, in a worker thread: this runs
        # once per connection attempt, never on the request path.
        sentinel = Sentinel(list(self.sentinels), socket_timeout=socket_timeout)
        try:
            return sentinel.discover_master(self.master)  # type: ignore[no-any-return]
        finally:
            for node in sentinel.sentinels:
                node.close()


def _nodes(text: str, variable: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(variable, f"expected host:port[,host:port...], got {text!r}")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def _from_url(url: str) -> dict[str, Any]:
    if url.startswith("redis+sentinel://"):
        return _from_sentinel_url(url)
    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise ConfigError("REDIS_URL", str(exc)) from None
    settings: dict[str, Any] = {
        key: parsed[key]
        for key in ("host", "port", "path", "db", "username", "password")
        if parsed.get(key) is not None
    }
    if url.startswith("rediss://"):
        settings["tls"] = _tls_context(parsed)
    return settings


def _from_sentinel_url(url: str) -> dict[str, Any]:
    """``redis+sentinel://[[user]:password@]host:port[,host:port]/master[/db]``."""
    parts = urlsplit(url)
    credentials, _, nodes = parts.netloc.rpartition("@")
    path = [piece for piece in parts.path.split("/") if piece]
    if not nodes or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            "REDIS_URL", "expected redis+sentinel://host:port[,host:port]/master[/db]"
        )
    settings: dict[str, Any] = {"sentinels": _nodes(nodes, "REDIS_URL"), "master": path[0]}
    if len(path) == 2:
        settings["db"] = int(path[1])
    if credentials:
        user, _, password = credentials.partition(":")
        settings["username"] = unquote(user) or None
        settings["password"] = unquote(password) or None
    return settings


def _tls_context(parsed: Mapping[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=parsed.get("ssl_ca_certs"))
    if parsed.get("ssl_cert_reqs") in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = (
            ssl.CERT_NONE if parsed["ssl_cert_reqs"] == "none" else ssl.CERT_OPTIONAL
        )
    if parsed.get("ssl_certfile"):
        context.load_cert_chain(parsed["ssl_certfile"], parsed.get("ssl_keyfile"))
    return context


def _password(config: Config, environ: Mapping[str, str]) -> str | None:
    if config.redis_password:
        return config.redis_password
    files = [(config.redis_password_file, "REDIS_PASSWORD_FILE")]
    if environ.get("CREDENTIALS_DIRECTORY"):
        files.append(
            (
                os.path.join(environ["CREDENTIALS_DIRECTORY"], "redis-password"),
                "CREDENTIALS_DIRECTORY",
            )
        )
    for path, variable in files:
        if path is None or (variable == "CREDENTIALS_DIRECTORY" and not os.path.exists(path)):
            continue
        try:
            with open(path, encoding="utf-8") as secret:
                # Empty means none: systemd's LoadCredential needs the file to
                # exist even for a Redis without a password.
                return secret.read().rstrip("\r\n") or None
        except OSError as exc:
            raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
    return None


async def open_link(
    target: RedisTarget, command_timeout: float, nursery: trio.Nursery, metrics: Any = None
) -> RedisLink:
    """Connect and log in; the link's reader runs in ``nursery``.

    ``command_timeout`` bounds the connection attempt and, afterwards, every
    command on the link (WKSD_REDIS_TIMEOUT).

    Raises redis-py's ``ConnectionError`` (or ``AuthenticationError``, a
    subclass) when Redis cannot be reached or refuses us.
    """
    stream = await open_stream(target, command_timeout)
    link = RedisLink(stream, command_timeout, metrics)
    await nursery.start(link.run)
    handshake: list[list[Any]] = []
    if target.password is not None:
        handshake.append(["AUTH", *([target.username] if target.username else []), target.password])
    if target.db:
        handshake.append(["SELECT", target.db])
    handshake.append(["CLIENT", "SETNAME", CLIENT_NAME])
    handshake.append(list(VERSION_PROBE))
    if target.sentinels:
        handshake.append(["ROLE"])
    replies = await link.pipeline(handshake)
    probe = replies[len(handshake) - (2 if target.sentinels else 1)]
    if isinstance(probe, ResponseError) and "unknown command" in str(probe).lower():
        link.fail(TooOld("no PEXPIRETIME"))
        raise TooOld("this Redis has no PEXPIRETIME: wksd needs Redis 7.0 or later")
    for reply in replies:
        if isinstance(reply, Exception):
            link.fail(reply)
            if isinstance(reply, AuthenticationError):  # WRONGPASS, NOAUTH
                raise AuthenticationError(f"Redis refused our login: {reply}")
            raise ConnectionError(f"Redis refused the handshake: {reply}")
    if target.sentinels and replies[-1][0] != b"master":
        link.fail(WrongRole("not the master"))
        raise WrongRole(f"the node Sentinel named is a {replies[-1][0].decode()}, not the master")
    return link


async def open_stream(target: RedisTarget, connect_timeout: float) -> Any:
    """Find the node (asking the Sentinels if any) and connect, within the timeout."""
    with trio.move_on_after(connect_timeout):
        address = await target.locate(connect_timeout)
        return await _open_stream(target, address)
    raise ConnectionError(f"connecting to {target.describe()} took over {connect_timeout} s")


async def _open_stream(target: RedisTarget, address: tuple[str, int] | str) -> Any:
    """A stream to Redis: trio's SSLStream for TLS, else a ``SocketIO``."""
    try:
        if isinstance(address, str):
            opened = await trio.open_unix_socket(address)
        else:
            host, port = address
            if target.tls is not None:
                return await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=target.tls, https_compatible=False
                )
            opened = await trio.open_tcp_stream(host, port)  # TCP_NODELAY set
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {target.describe()}: {exc}") from exc
    # trio opened it (resolving names, trying every address); from here on
    # the link drives the socket itself.
    trio_socket = opened.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    return SocketIO(socket.socket(family, kind, proto, fileno=trio_socket.detach()))
