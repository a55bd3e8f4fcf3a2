"""Where Redis is, how to log in, and how to open a link to it.

A ``RedisTarget`` is plain values: a host and port or a socket path, the
database, the credentials, a TLS context, the Sentinels. ``from_url`` reads
one from a ``redis://``, ``rediss://`` or ``unix://`` URL, or from
``redis+sentinel://[[user]:password@]host:port[,host:port]/master[/db]``;
what the URL does not say keeps the value of ``defaults``. redis-py's
``parse_url`` reads the URL first, so whatever it refuses is refused; then
what it lets through is checked: the database is a whole number, every query
option is one wksd uses, and the ``ssl_*`` options of a ``rediss://`` URL
(all that redis-py's ``SSLConnection`` takes from a URL) have usable values
and go into the TLS context as redis-py would put them. A URL that cannot
be used raises ``InvalidTarget``. This module knows no setting names:
wksd.config, which does, reads the passwords from files and credentials
and turns ``InvalidTarget`` into the ``ConfigError`` naming the setting.

``open_link`` resolves the address (asking the Sentinels for the master, each
time, so a failover is followed), connects, and logs in: AUTH, SELECT and
CLIENT SETNAME wksd go out in one write. With Sentinel it also checks that the
node really is the master (ROLE), because a demoted master still accepts
connections.

For the near cache (``track``: the key prefixes it holds) the same one write
speaks RESP3 instead: ``HELLO 3`` (with AUTH and SETNAME inside it), SELECT,
then ``CLIENT TRACKING ON BCAST PREFIX ... NOLOOP``, so Redis's invalidations
arrive on this connection as pushes, in order with the replies
(``wksd.store.near_cache``). Without it the link stays on RESP2, as before.
Every reply wksd reads parses the same under both: the replies that differ
(HELLO's map, a set for SMEMBERS, which hiredis gives as a list) are none it
looks into, and scripts answer in RESP2 terms unless they ask otherwise.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import trio
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import MasterNotFoundError, Sentinel

from ..sockio import SocketIO
from .redis_link import RedisLink

__all__ = [
    "InvalidTarget",
    "RedisTarget",
    "TooOld",
    "WrongRole",
    "open_link",
    "open_stream",
    "parse_nodes",
]

#: The name wksd gives its connection (CLIENT SETNAME), so an operator can
#: count them in CLIENT LIST.
CLIENT_NAME: Final = "wksd"


class InvalidTarget(ValueError):
    """A Redis URL or node list that cannot be used; the message says why."""


class WrongRole(RedisConnectionError):
    """The node Sentinel named is not (or no longer) the master."""


class TooOld(RedisConnectionError):
    """The Redis lacks a command wksd needs: it is older than 7.0."""


#: A command of Redis 7.0 the lock and cache scripts use (they bind wksd's
#: own keys to the expiry of the seed's), sent once at connect on a key that
#: need not exist: a Redis without it is refused at once, with the reason,
#: instead of failing every lock later.
VERSION_PROBE: Final = ("PEXPIRETIME", "wksd:version-probe")

#: The query options of a URL that wksd uses besides the ``ssl_*`` ones;
#: parse_url takes any name, and one wksd would ignore is refused instead.
_URL_OPTIONS: Final = frozenset({"db", "username", "password"})

#: ssl_cert_reqs, as redis-py's SSLConnection reads it.
_CERT_REQS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}

#: The TLS options redis-py's SSLConnection takes from a ``rediss://`` URL
#: (its ``ssl_ocsp_context`` and ``ssl_ocsp_expected_cert`` are objects, not
#: text). The OCSP checks need pyOpenSSL sockets, which trio's SSLStream is
#: not: they may only be false.
_TLS_OPTIONS: Final = frozenset(
    {
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_ca_data",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
        "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled",
    }
)

_TRUE: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE: Final = frozenset({"0", "false", "f", "no", "n", "off"})


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
    def from_url(cls, url: str, defaults: RedisTarget | None = None) -> RedisTarget:
        """The target a URL names, what it leaves out taken from ``defaults``.

        Raises ``InvalidTarget`` for a URL that cannot be used.
        """
        fields = _from_sentinel_url(url) if url.startswith("redis+sentinel://") else _from_url(url)
        return dataclasses.replace(defaults or cls(), **fields)

    async def locate(self, socket_timeout: float) -> tuple[str, int] | str:
        """The address to connect to now: a (host, port) or a socket path."""
        if self.path:
            return self.path
        if not self.sentinels:
            return self.host, self.port
        try:
            host, port = await trio.to_thread.run_sync(self._ask_sentinels, socket_timeout)
        except MasterNotFoundError as exc:
            raise RedisConnectionError(
                f"no Sentinel knows a master {self.master!r}: {exc}"
            ) from exc
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


def parse_nodes(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]`` as (host, port) pairs; ``InvalidTarget`` if it is not."""
    nodes = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not _is_number(port) or not 0 < int(port) < 65536:
            raise InvalidTarget(f"expected host:port[,host:port...], got {text!r}")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def _is_number(text: str) -> bool:
    """Whether ``text`` is ASCII digits only (``str.isdigit`` also takes ``²``)."""
    return text.isascii() and text.isdigit()


def _from_url(url: str) -> dict[str, Any]:
    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise InvalidTarget(str(exc)) from None
    parts = urlsplit(url)
    options = {name: values[0] for name, values in parse_qs(parts.query).items()}
    _check_options(parts.scheme, options)
    fields: dict[str, Any] = {
        key: parsed[key]
        for key in ("host", "port", "path", "username", "password")
        if parsed.get(key) is not None
    }
    db = _database(parts, options)
    if db is not None:
        fields["db"] = db
    if parts.scheme == "rediss":
        fields["tls"] = _tls_context(options)
    return fields


def _check_options(scheme: str, options: Mapping[str, str]) -> None:
    """Refuse the query options wksd would not use: misspelt, or TLS without rediss://."""
    for name in options:
        if name in _TLS_OPTIONS and scheme != "rediss":
            raise InvalidTarget(f"?{name}= is a TLS option: it needs a rediss:// URL")
        if name not in _URL_OPTIONS and name not in _TLS_OPTIONS:
            raise InvalidTarget(
                f"?{name}= is not an option wksd uses (it takes db, username, password "
                "and, with rediss://, the ssl_* options of redis-py)"
            )


def _database(parts: SplitResult, options: Mapping[str, str]) -> int | None:
    """The database of ``?db=``, else of a redis(s):// URL's path; None if neither says."""
    text = options.get("db")
    if text is None and parts.scheme != "unix":
        text = unquote(parts.path).strip("/") or None
    if text is None:
        return None
    if not _is_number(text):
        raise InvalidTarget(f"the database must be a whole number, 0 or more, got {text!r}")
    return int(text)


def _from_sentinel_url(url: str) -> dict[str, Any]:
    """``redis+sentinel://[[user]:password@]host:port[,host:port]/master[/db]``."""
    parts = urlsplit(url)
    credentials, _, nodes = parts.netloc.rpartition("@")
    path = [piece for piece in parts.path.split("/") if piece]
    if not nodes or not path or len(path) > 2 or (len(path) == 2 and not _is_number(path[1])):
        raise InvalidTarget("expected redis+sentinel://host:port[,host:port]/master[/db]")
    if parts.query:
        raise InvalidTarget("a redis+sentinel:// URL takes no ?options")
    fields: dict[str, Any] = {"sentinels": parse_nodes(nodes), "master": path[0]}
    if len(path) == 2:
        fields["db"] = int(path[1])
    if credentials:
        user, _, password = credentials.partition(":")
        fields["username"] = unquote(user) or None
        fields["password"] = unquote(password) or None
    return fields


def _tls_context(options: Mapping[str, str]) -> ssl.SSLContext:
    """The TLS context of a rediss:// URL's ssl_* options, as redis-py's SSLConnection makes it.

    Two differences, both wksd's from before: CAs named by ``ssl_ca_certs``,
    ``ssl_ca_path`` or ``ssl_ca_data`` replace the system's instead of
    joining them, so a private CA is the only one trusted; and
    ``ssl_cert_reqs=optional`` leaves the host name unchecked unless
    ``ssl_check_hostname=true`` says otherwise (for a client, optional
    otherwise means what required does).
    """
    for name in ("ssl_validate_ocsp", "ssl_validate_ocsp_stapled"):
        if _flag(options, name, default=False):
            raise InvalidTarget(f"?{name}=true: wksd cannot check OCSP (trio's TLS has no hook)")
    cert_reqs = _cert_reqs(options)
    check_hostname = _flag(options, "ssl_check_hostname", default=cert_reqs == ssl.CERT_REQUIRED)
    if check_hostname and cert_reqs == ssl.CERT_NONE:
        raise InvalidTarget("?ssl_check_hostname=true needs a certificate: not ssl_cert_reqs=none")
    try:
        context = ssl.create_default_context(
            cafile=options.get("ssl_ca_certs"),
            capath=options.get("ssl_ca_path"),
            cadata=options.get("ssl_ca_data"),
        )
        context.check_hostname = check_hostname
        context.verify_mode = cert_reqs
        _load_client_certificate(context, options)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidTarget(f"the TLS files of the URL: {exc}") from None
    context.verify_flags |= _verify_flags(options, "ssl_include_verify_flags")
    context.verify_flags &= ~_verify_flags(options, "ssl_exclude_verify_flags")
    if "ssl_min_version" in options:
        context.minimum_version = _tls_version(options["ssl_min_version"])
    if "ssl_ciphers" in options:
        try:
            context.set_ciphers(options["ssl_ciphers"])
        except ssl.SSLError:
            raise InvalidTarget(f"?ssl_ciphers={options['ssl_ciphers']}: no such cipher") from None
    return context


def _cert_reqs(options: Mapping[str, str]) -> ssl.VerifyMode:
    text = options.get("ssl_cert_reqs", "required")
    if text not in _CERT_REQS:
        raise InvalidTarget(f"?ssl_cert_reqs= takes none, optional or required, got {text!r}")
    return _CERT_REQS[text]


def _flag(options: Mapping[str, str], name: str, *, default: bool) -> bool:
    text = options.get(name)
    if text is None:
        return default
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise InvalidTarget(f"?{name}= takes true or false, got {text!r}")


def _load_client_certificate(context: ssl.SSLContext, options: Mapping[str, str]) -> None:
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if certfile is None:
        if keyfile is not None or "ssl_password" in options:
            raise InvalidTarget("?ssl_keyfile= and ?ssl_password= need ?ssl_certfile=")
        return
    context.load_cert_chain(certfile, keyfile, options.get("ssl_password"))


def _verify_flags(options: Mapping[str, str], name: str) -> ssl.VerifyFlags:
    """``VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN`` (brackets allowed), as redis-py reads it."""
    flags = ssl.VerifyFlags(0)
    text = options.get(name, "")
    for word in filter(None, (part.strip() for part in text.strip("[]").split(","))):
        try:
            flags |= ssl.VerifyFlags[word]
        except KeyError:
            raise InvalidTarget(f"?{name}=: no verify flag {word!r} in ssl.VerifyFlags") from None
    return flags


def _tls_version(text: str) -> ssl.TLSVersion:
    """ssl_min_version as parse_url reads it: a number, an ``ssl.TLSVersion`` value."""
    try:
        return ssl.TLSVersion(int(text))
    except ValueError:
        known = ", ".join(f"{v.value} ({v.name})" for v in ssl.TLSVersion if v.value > 0)
        raise InvalidTarget(f"?ssl_min_version= takes one of {known}, got {text!r}") from None


async def open_link(
    target: RedisTarget,
    command_timeout: float,
    nursery: trio.Nursery,
    metrics: Any = None,
    *,
    track: Sequence[str] = (),
    on_push: Callable[[list[Any]], None] | None = None,
) -> RedisLink:
    """Connect and log in; the link's reader runs in ``nursery``.

    ``command_timeout`` bounds the connection attempt and, afterwards, every
    command on the link (WKSD_REDIS_TIMEOUT). ``track`` (prefixes, none of
    them a prefix of another) opens it in RESP3 with tracking on, and
    ``on_push`` is given the pushes from the start.

    Raises redis-py's ``ConnectionError`` (``RedisConnectionError`` here), or
    its subclass ``AuthenticationError``, when Redis cannot be reached or
    refuses us.
    """
    stream = await open_stream(target, command_timeout)
    link = RedisLink(stream, command_timeout, metrics)
    link.on_push = on_push
    await nursery.start(link.run)
    handshake = _handshake(target, track)
    replies = await link.pipeline(handshake)
    probe = replies[handshake.index(list(VERSION_PROBE))]
    if isinstance(probe, ResponseError) and "unknown command" in str(probe).lower():
        link.fail(TooOld("no PEXPIRETIME"))
        raise TooOld("this Redis has no PEXPIRETIME: wksd needs Redis 7.0 or later")
    for reply in replies:
        if isinstance(reply, Exception):
            link.fail(reply)
            if isinstance(reply, AuthenticationError):  # WRONGPASS, NOAUTH
                raise AuthenticationError(f"Redis refused our login: {reply}")
            raise RedisConnectionError(f"Redis refused the handshake: {reply}")
    if target.sentinels and replies[-1][0] != b"master":
        link.fail(WrongRole("not the master"))
        raise WrongRole(f"the node Sentinel named is a {replies[-1][0].decode()}, not the master")
    return link


def _handshake(target: RedisTarget, track: Sequence[str]) -> list[list[Any]]:
    """The commands of the login, sent in one write (the module doc)."""
    handshake: list[list[Any]] = []
    if track:
        hello: list[Any] = ["HELLO", 3]
        if target.password is not None:
            hello += ["AUTH", target.username or "default", target.password]
        handshake.append([*hello, "SETNAME", CLIENT_NAME])
    elif target.password is not None:
        handshake.append(["AUTH", *([target.username] if target.username else []), target.password])
    if target.db:
        handshake.append(["SELECT", target.db])
    if not track:
        handshake.append(["CLIENT", "SETNAME", CLIENT_NAME])
    handshake.append(list(VERSION_PROBE))
    if track:
        prefixes = [word for prefix in track for word in ("PREFIX", prefix)]
        handshake.append(["CLIENT", "TRACKING", "ON", "BCAST", *prefixes, "NOLOOP"])
    if target.sentinels:
        handshake.append(["ROLE"])
    return handshake


async def open_stream(target: RedisTarget, connect_timeout: float) -> Any:
    """Find the node (asking the Sentinels if any) and connect, within the timeout."""
    with trio.move_on_after(connect_timeout):
        address = await target.locate(connect_timeout)
        return await _open_stream(target, address)
    raise RedisConnectionError(f"connecting to {target.describe()} took over {connect_timeout} s")


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
        raise RedisConnectionError(f"cannot connect to {target.describe()}: {exc}") from exc
    # trio opened it (resolving names, trying every address); from here on
    # the link drives the socket itself.
    trio_socket = opened.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    return SocketIO(socket.socket(family, kind, proto, fileno=trio_socket.detach()))
