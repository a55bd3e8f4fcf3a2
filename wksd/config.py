"""Configuration: environment variables, each also a command-line flag.

Every setting is one row of ``SETTINGS``: its variable, its flag, how its
text is parsed, and its default. A flag wins over the variable, the variable
over the default. A value that does not parse raises ``ConfigError`` naming
the variable; ``wksd`` turns that into one line on stderr and exit status 78
(EX_CONFIG), as DESIGN section 6 asks.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from clientlib import default_socket_path
from clientlib.protocol import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["SETTINGS", "Config", "ConfigError", "default_state_dir", "load_config"]

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
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float, *, zero_ok: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
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


@dataclass(frozen=True)
class Setting:
    variable: str
    attribute: str
    parse: Callable[[str], Any]
    help: str
    default: str | None = None  # as the text a user would type; None = unset

    @property
    def flag(self) -> str:
        return "--" + self.attribute.replace("_", "-")


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
        "use Redis (default: true in production, else false)",
    ),
    Setting(
        "REDIS_URL",
        "redis_url",
        _text,
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
        _text,
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
        "Unix socket path (default: $RUNTIME_DIRECTORY/wksd.sock, "
        "else $XDG_RUNTIME_DIR/wksd/wksd.sock, else /run/wksd/wksd.sock)",
    ),
    Setting("WKSD_SOCKET_MODE", "socket_mode", _mode, "permissions of the socket", "0660"),
    Setting(
        "WKSD_ALLOWED_UIDS",
        "allowed_uids",
        _id_list,
        "uids that may connect (default: the daemon's uid and root)",
    ),
    Setting(
        "WKSD_ALLOWED_GIDS",
        "allowed_gids",
        _id_list,
        "gids whose members may connect (default: the socket's group)",
    ),
    Setting(
        "WKSD_ADMIN_UIDS",
        "admin_uids",
        _id_list,
        "uids that may call admin methods (default: the daemon's uid and root)",
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
        "WKSD_MAX_MESSAGE_BYTES",
        "max_message_bytes",
        _int_in(4096, 256 * 1024 * 1024),
        "largest message accepted",
        str(DEFAULT_MAX_MESSAGE_BYTES),
    ),
    Setting(
        "WKSD_MAX_CONNECTIONS",
        "max_connections",
        _int_in(1, 1_000_000),
        "most client connections open at once; beyond it a connection is refused "
        "(admin uids get a few more); LimitNOFILE= must leave room for them",
        "4096",
    ),
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
        "directory of the durable store; empty: memory only, nothing on disk "
        "(default: $STATE_DIRECTORY, else $XDG_STATE_HOME/wksd, else ~/.local/state/wksd)",
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
        "HOST:PORT to serve /metrics and /health over HTTP (off by default)",
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


@dataclass(frozen=True)
class Config:
    """The daemon's settings, parsed and checked."""

    env: str = "development"
    redis_enabled: bool = False
    redis_url: str | None = None
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_password: str | None = field(default=None, repr=False)
    redis_password_file: str | None = None
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    socket: str = field(default_factory=default_socket_path)
    socket_mode: int = 0o660
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    admin_uids: frozenset[int] | None = None
    redis_timeout: float = 1.0
    redis_retry_max: float = 5.0
    sweep_interval: float = 60.0
    memory_max_keys: int = 1_000_000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: 4096 workers on one host is far beyond a real deployment, and the unit's
    #: LimitNOFILE=4608 leaves room for it plus the daemon's own fds.
    max_connections: int = 4096
    #: A quarter of the total: one runaway uid cannot lock the others out.
    max_connections_per_uid: int = 1024
    workflow_stale_after: float = 3600.0
    cleanup_interval: float = 300.0
    key_prefix: str = "wks:"
    locks_fail_closed: bool = False
    shutdown_timeout: float = 10.0
    #: The durable store's directory; "" (the default here, as for tests and
    #: clientlib.testing) keeps everything in memory. ``load_config`` fills in
    #: the default of DESIGN section 6 (``default_state_dir``).
    state_dir: str = ""
    fsync: str = "everysec"
    metrics_addr: tuple[str, int] | None = None
    log_level: str = "info"
    log_format: str = "json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wksd",
        description="wksd: the local state sidecar. Every flag is also an environment variable.",
        argument_default=None,
    )
    for setting in SETTINGS:
        default = f" (default: {setting.default})" if setting.default is not None else ""
        parser.add_argument(
            setting.flag,
            dest=setting.attribute,
            metavar="VALUE",
            help=f"{setting.help}{default} [{setting.variable}]",
        )
    return parser


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Parse flags and environment into a ``Config``; ``ConfigError`` if invalid."""
    environ = os.environ if environ is None else environ
    flags = vars(_parser().parse_args(argv))
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
