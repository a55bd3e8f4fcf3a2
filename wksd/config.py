"""Configuration: environment variables, each also a command-line flag.

Theory of operation. Every setting is declared once, as a row of
``SETTINGS``: its environment variable, its flag, the function that reads
and checks its text, its default as the text a user would type (or, for a
default worked out at start, the words that describe it), and its help.
Everything else comes from that table: the defaults of the ``Config``
dataclass, the argparse flags and ``wksd --help``, and the README's
configuration table, which tests/test_config.py checks row by row against it.

A flag wins over the variable, the variable over the default. A boolean
flag may stand alone (``--locks-fail-closed``), take a value
(``--locks-fail-closed=false``), or be negated (``--no-locks-fail-closed``).
Whatever cannot be used, an unknown flag, a stray word, a missing or
unparsable value from either source, raises ``ConfigError`` naming it;
``wksd`` turns that into one line on stderr and exit status 78 (EX_CONFIG),
as DESIGN section 6 asks, so a bad drop-in is not restarted in a loop.

``redis_target`` turns the Redis settings into a ``RedisTarget`` (plain
values, built by wksd.store.redis_target, which knows no setting names),
reading the password from wherever it is configured.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, NoReturn

from clientlib import default_socket_path
from clientlib.protocol import DEFAULT_MAX_MESSAGE_BYTES

from . import __version__
from .store.redis_target import InvalidTarget, RedisTarget, parse_nodes

__all__ = [
    "EX_CONFIG",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "default_state_dir",
    "load_config",
    "redis_target",
]

#: EX_CONFIG from sysexits.h; the unit's RestartPreventExitStatus= names it.
EX_CONFIG: Final = 78


class ConfigError(Exception):
    """A setting has a value that cannot be used."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float, *, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {text!r}") from None
        if zero_ok and value == 0:
            return 0.0
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be a number of seconds from {low} to {high}, got {text!r}")
        return value

    return parse


def _mode(text: str) -> int:
    value = int(text.strip(), 8)
    if not 0 <= value <= 0o777:
        raise ValueError(f"must be an octal mode like 0660, got {text!r}")
    return value


def _id_list(text: str) -> frozenset[int]:
    ids = set()
    for part in text.replace(",", " ").split():
        value = int(part)
        if value < 0:
            raise ValueError(f"ids are not negative, got {value}")
        ids.add(value)
    return frozenset(ids)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _address(text: str) -> tuple[str, int]:
    """HOST:PORT, or :PORT or PORT alone for the loopback address."""
    host, _, port = text.strip().rpartition(":")
    if not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", _int_in(0, 65535)(port)


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _socket_path(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    # sockaddr_un holds 108 bytes including the terminating NUL.
    if len(os.fsencode(text)) > 107:
        raise ValueError("a Unix socket path is at most 107 bytes")
    return text


def _redis_url(text: str) -> str:
    """A URL ``RedisTarget.from_url`` can use, checked now even while Redis is off."""
    RedisTarget.from_url(_text(text))  # InvalidTarget is a ValueError
    return text


def _nodes(text: str) -> str:
    parse_nodes(text)
    return text


@dataclass(frozen=True)
class Setting:
    """One setting: where it is read from, how its text is checked, its default."""

    variable: str
    attribute: str
    parse: Callable[[str], Any]
    help: str
    #: The default as the text a user would type; None: unset, or worked out
    #: at start (``load_config`` does that, and ``computed`` says how).
    default: str | None = None
    #: How --help and the README say a default that is worked out at start.
    computed: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.attribute.replace("_", "-")

    @property
    def boolean(self) -> bool:
        """A boolean flag may stand alone, and has a ``--no-`` form."""
        return self.parse is _bool

    @property
    def documented_default(self) -> str:
        """The default as the README's table shows it (Markdown)."""
        if self.default is not None:
            return f"`{self.default}`"
        return self.computed or "—"

    @property
    def help_text(self) -> str:
        """The line of ``wksd --help``: what it does, its default, its variable."""
        if self.default is None and self.computed is None:
            return f"{self.help} [{self.variable}]"
        default = self.documented_default.replace("`", "")
        return f"{self.help} (default: {default}) [{self.variable}]"


#: Every setting, in the order of the README's configuration table.
SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "WKSD_ENV",
        "env",
        _choice("development", "production", "test"),
        "'production' turns Redis on by default",
        "development",
    ),
    Setting(
        "REDIS_ENABLED",
        "redis_enabled",
        _bool,
        "use Redis",
        computed="true in production, else false",
    ),
    Setting(
        "REDIS_URL",
        "redis_url",
        _redis_url,
        "redis://, rediss://, unix:// or redis+sentinel:// URL; overrides REDIS_HOST/PORT/DB",
    ),
    Setting("REDIS_HOST", "redis_host", _text, "Redis host", "localhost"),
    Setting("REDIS_PORT", "redis_port", _int_in(1, 65535), "Redis port", "6379"),
    Setting("REDIS_DB", "redis_db", _int_in(0, 1_000_000), "Redis database number", "0"),
    Setting(
        "REDIS_PASSWORD",
        "redis_password",
        str,
        "Redis password (prefer REDIS_PASSWORD_FILE or a systemd credential)",
    ),
    Setting(
        "REDIS_PASSWORD_FILE",
        "redis_password_file",
        _text,
        "file holding the Redis password; $CREDENTIALS_DIRECTORY/redis-password is also read",
    ),
    Setting(
        "REDIS_SENTINELS",
        "redis_sentinels",
        _nodes,
        "comma-separated host:port list of Sentinels (with REDIS_SENTINEL_MASTER)",
    ),
    Setting(
        "REDIS_SENTINEL_MASTER",
        "redis_sentinel_master",
        _text,
        "name of the master the Sentinels watch",
        "mymaster",
    ),
    Setting(
        "WKSD_SOCKET",
        "socket",
        _socket_path,
        "Unix socket path; the clients resolve the same default",
        computed="`$RUNTIME_DIRECTORY/wksd.sock`, else `$XDG_RUNTIME_DIR/wksd/wksd.sock`, "
        "else `/run/wksd/wksd.sock`",
    ),
    Setting("WKSD_SOCKET_MODE", "socket_mode", _mode, "permissions of the socket", "0660"),
    Setting(
        "WKSD_ALLOWED_UIDS",
        "allowed_uids",
        _id_list,
        "uids that may connect",
        computed="the daemon's uid, root",
    ),
    Setting(
        "WKSD_ALLOWED_GIDS",
        "allowed_gids",
        _id_list,
        "gids whose members may connect",
        computed="the socket's group",
    ),
    Setting(
        "WKSD_ADMIN_UIDS",
        "admin_uids",
        _id_list,
        "uids that may call admin methods",
        computed="the daemon's uid, root",
    ),
    Setting(
        "WKSD_REDIS_TIMEOUT",
        "redis_timeout",
        _seconds(0.01, 60),
        "seconds a Redis command may take before it counts as failed",
        "1.0",
    ),
    Setting(
        "WKSD_REDIS_RETRY_MAX",
        "redis_retry_max",
        _seconds(0.01, 3600),
        "longest wait in seconds between Redis reconnection attempts",
        "5",
    ),
    Setting(
        "WKSD_SWEEP_INTERVAL",
        "sweep_interval",
        _seconds(0.01, 86400),
        "seconds between sweeps of expired keys in memory",
        "60",
    ),
    Setting(
        "WKSD_MEMORY_MAX_KEYS",
        "memory_max_keys",
        _int_in(1, 100_000_000),
        "most keys the memory store holds",
        "1000000",
    ),
    Setting(
        "WKSD_NEAR_CACHE_BYTES",
        "near_cache_bytes",
        _int_in(0, 64 * 1024**3),
        "bytes the near cache of Redis reads holds (0: none)",
        "67108864",
    ),
    Setting(
        "WKSD_MAX_MESSAGE_BYTES",
        "max_message_bytes",
        _int_in(4096, 256 * 1024 * 1024),
        "largest message accepted",
        str(DEFAULT_MAX_MESSAGE_BYTES),
    ),
    # 4096 workers on one host is far beyond a real deployment, and the unit's
    # LimitNOFILE=4608 leaves room for it plus the daemon's own fds.
    Setting(
        "WKSD_MAX_CONNECTIONS",
        "max_connections",
        _int_in(1, 1_000_000),
        "most client connections open at once; beyond it a connection is refused "
        "(admin uids get a few more); LimitNOFILE= must leave room for them",
        "4096",
    ),
    # A quarter of the total: one runaway uid cannot lock the others out.
    Setting(
        "WKSD_MAX_CONNECTIONS_PER_UID",
        "max_connections_per_uid",
        _int_in(1, 1_000_000),
        "most client connections open at once from one peer uid",
        "1024",
    ),
    Setting(
        "WKSD_WORKFLOW_STALE_AFTER",
        "workflow_stale_after",
        _seconds(1, 365 * 86400),
        "seconds without an update before a running workflow is marked failed",
        "3600",
    ),
    Setting(
        "WKSD_CLEANUP_INTERVAL",
        "cleanup_interval",
        _seconds(1, 365 * 86400, zero_ok=True),
        "seconds between stale-workflow cleanups, 0 = off",
        "300",
    ),
    Setting("WKSD_KEY_PREFIX", "key_prefix", _text, "prefix of every key", "wks:"),
    Setting(
        "WKSD_LOCKS_FAIL_CLOSED",
        "locks_fail_closed",
        _bool,
        "answer UNAVAILABLE to lock.acquire while Redis is down",
        "false",
    ),
    Setting(
        "WKSD_SHUTDOWN_TIMEOUT",
        "shutdown_timeout",
        _seconds(0, 3600, zero_ok=True),
        "seconds to finish in-flight requests after SIGTERM",
        "10",
    ),
    Setting(
        "WKSD_STATE_DIR",
        "state_dir",
        str,
        "directory of the durable store; empty: memory only, nothing on disk",
        computed="`$STATE_DIRECTORY`, else `$XDG_STATE_HOME/wksd`, else `~/.local/state/wksd`",
    ),
    Setting(
        "WKSD_FSYNC",
        "fsync",
        _choice("always", "everysec", "no"),
        "when the journal is fsynced, as Redis's appendfsync",
        "everysec",
    ),
    Setting(
        "WKSD_METRICS_ADDR",
        "metrics_addr",
        _address,
        "HOST:PORT, or PORT for loopback, to serve /metrics and /health over HTTP",
        computed="off",
    ),
    Setting(
        "WKSD_LOG_LEVEL",
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "log level",
        "info",
    ),
    Setting(
        "WKSD_LOG_FORMAT",
        "log_format",
        _choice("json", "console"),
        "json lines, or console for people",
        "json",
    ),
)


#: Settings where an empty value is a choice, not "unset": an empty password,
#: and an empty state directory (memory only).
_EMPTY_MEANS_SOMETHING: Final = frozenset({"redis_password", "state_dir"})


def default_state_dir(environ: Mapping[str, str]) -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else the XDG state home."""
    state_directory = environ.get("STATE_DIRECTORY")
    if state_directory:
        # systemd joins several StateDirectory= entries with colons.
        return state_directory.split(":", 1)[0]
    xdg = environ.get("XDG_STATE_HOME")
    if xdg:
        return os.path.join(xdg, "wksd")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "wksd")


def _default(attribute: str) -> Any:
    """The parsed default of a setting: the ``Config`` field's default."""
    (setting,) = (setting for setting in SETTINGS if setting.attribute == attribute)
    assert setting.default is not None, f"{attribute} has no default of its own"
    return setting.parse(setting.default)


@dataclass(frozen=True)
class Config:
    """The daemon's settings, parsed and checked; the defaults are ``SETTINGS``'s.

    The fields without a default of their own are None ("not set"), except
    three that ``load_config`` works out: ``redis_enabled`` (False here,
    true in production there), ``socket`` and ``state_dir``. ``state_dir``
    is "" here (as for tests and wksd.testing), which keeps everything in
    memory; ``load_config`` fills in the default of DESIGN section 6.
    """

    env: str = _default("env")
    redis_enabled: bool = False
    redis_url: str | None = None
    redis_host: str = _default("redis_host")
    redis_port: int = _default("redis_port")
    redis_db: int = _default("redis_db")
    redis_password: str | None = field(default=None, repr=False)
    redis_password_file: str | None = None
    redis_sentinels: str | None = None
    redis_sentinel_master: str = _default("redis_sentinel_master")
    socket: str = field(default_factory=default_socket_path)
    socket_mode: int = _default("socket_mode")
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    admin_uids: frozenset[int] | None = None
    redis_timeout: float = _default("redis_timeout")
    redis_retry_max: float = _default("redis_retry_max")
    sweep_interval: float = _default("sweep_interval")
    memory_max_keys: int = _default("memory_max_keys")
    near_cache_bytes: int = _default("near_cache_bytes")
    max_message_bytes: int = _default("max_message_bytes")
    max_connections: int = _default("max_connections")
    max_connections_per_uid: int = _default("max_connections_per_uid")
    workflow_stale_after: float = _default("workflow_stale_after")
    cleanup_interval: float = _default("cleanup_interval")
    key_prefix: str = _default("key_prefix")
    locks_fail_closed: bool = _default("locks_fail_closed")
    shutdown_timeout: float = _default("shutdown_timeout")
    state_dir: str = ""
    fsync: str = _default("fsync")
    metrics_addr: tuple[str, int] | None = None
    log_level: str = _default("log_level")
    log_format: str = _default("log_format")


_DESCRIPTION: Final = """\
Run wksd, the local state sidecar. Every flag is also an environment
variable (shown in brackets); a flag wins over its variable.
"""

_EPILOG: Final = """\
To ask a running daemon, use the operator's command, wksd ctl:
  wksd ctl health | stats | workflows [--watch] | workflow ID | lock ID
  wksd ctl call METHOD [ARG ...]
("wksd ctl --help" says more.)

An invalid flag or value stops wksd with one line naming it, exit status 78.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, raising ``ConfigError`` instead of printing the usage and exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(*_blame(message))


#: argparse's messages that name a flag: "argument --x: expected one argument",
#: "ambiguous option: --x could match --xa, --xb".
_ARGPARSE_BLAME: Final = (
    re.compile(r"argument (?P<name>\S+?): (?P<problem>.+)"),
    re.compile(r"ambiguous option: (?P<name>[^=\s]+)\S* (?P<problem>could match .+)"),
)


def _blame(message: str) -> tuple[str, str]:
    """The flag an argparse message is about, and what is wrong with it."""
    for pattern in _ARGPARSE_BLAME:
        found = pattern.fullmatch(message)
        if found:
            return found["name"], found["problem"]
    return "the command line", message


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wksd",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wksd {__version__}")
    for setting in SETTINGS:
        if setting.boolean:
            parser.add_argument(
                setting.flag,
                dest=setting.attribute,
                metavar="BOOL",
                nargs="?",
                const="true",
                help=setting.help_text,
            )
            parser.add_argument(
                "--no-" + setting.flag[2:],
                dest=setting.attribute,
                action="store_const",
                const="false",
                help=f"the same as {setting.flag}=false",
            )
        else:
            parser.add_argument(
                setting.flag, dest=setting.attribute, metavar="VALUE", help=setting.help_text
            )
    return parser


def _flags(argv: Sequence[str] | None) -> dict[str, str | None]:
    """The flags given, as text by attribute; ``ConfigError`` for anything else."""
    known, rest = _parser().parse_known_args(argv)
    if rest:
        word = rest[0]
        if word.startswith("-"):
            raise ConfigError(word.split("=", 1)[0], "no such flag (wksd --help lists them)")
        raise ConfigError(word, "wksd takes flags only; the operator's commands are wksd ctl ...")
    return vars(known)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Parse flags and environment into a ``Config``; ``ConfigError`` if invalid."""
    environ = os.environ if environ is None else environ
    flags = _flags(argv)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = flags.get(setting.attribute)
        source = setting.flag if given is not None else setting.variable
        text = given if given is not None else environ.get(setting.variable)
        if text is None or (text == "" and setting.attribute not in _EMPTY_MEANS_SOMETHING):
            if setting.default is None:
                continue
            text = setting.default
        try:
            values[setting.attribute] = setting.parse(text)
        except ValueError as exc:
            name = (
                setting.variable if source == setting.variable else f"{source} ({setting.variable})"
            )
            raise ConfigError(name, str(exc) or f"invalid value {text!r}") from None
    if "redis_enabled" not in values:
        values["redis_enabled"] = values["env"] == "production"
    if "socket" not in values:
        values["socket"] = default_socket_path(environ)
    if "state_dir" not in values:
        values["state_dir"] = default_state_dir(environ)
    config = Config(**values)
    if config.redis_password_file is not None and not Path(config.redis_password_file).is_file():
        raise ConfigError("REDIS_PASSWORD_FILE", f"no such file: {config.redis_password_file}")
    return config


def redis_target(config: Config, environ: Mapping[str, str] | None = None) -> RedisTarget:
    """Where Redis is and how to log in, from the Redis settings.

    ``REDIS_URL`` wins over ``REDIS_HOST``/``PORT``/``DB``; what it leaves
    out keeps their values. The password comes from the URL, else
    ``REDIS_PASSWORD``, else ``REDIS_PASSWORD_FILE``, else
    ``$CREDENTIALS_DIRECTORY/redis-password`` (systemd's LoadCredential).
    ``ConfigError`` names the setting that cannot be used.
    """
    environ = os.environ if environ is None else environ
    try:
        sentinels = parse_nodes(config.redis_sentinels) if config.redis_sentinels else ()
    except InvalidTarget as exc:
        raise ConfigError("REDIS_SENTINELS", str(exc)) from None
    target = RedisTarget(
        host=config.redis_host,
        port=config.redis_port,
        db=config.redis_db,
        sentinels=sentinels,
        master=config.redis_sentinel_master,
    )
    if config.redis_url:
        try:
            target = RedisTarget.from_url(config.redis_url, target)
        except InvalidTarget as exc:
            raise ConfigError("REDIS_URL", str(exc)) from None
    if target.password is None:
        target = replace(target, password=_redis_password(config, environ))
    return target


def _redis_password(config: Config, environ: Mapping[str, str]) -> str | None:
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
