"""Configuration from environment and flags (wksd.config, wksd.cli)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from wksd.config import SETTINGS, Config, ConfigError, load_config


def test_defaults_are_the_embedded_memory_setup() -> None:
    """With nothing set: development, Redis off, DESIGN section 6's defaults."""
    config = load_config([], {})
    assert config.env == "development" and config.redis_enabled is False
    assert config.socket == "/run/wksd/wksd.sock"
    assert config.socket_mode == 0o660
    assert config.redis_timeout == 1.0 and config.sweep_interval == 60
    assert config.memory_max_keys == 1_000_000 and config.max_message_bytes == 2_097_152
    assert config.workflow_stale_after == 3600 and config.cleanup_interval == 300
    assert config.metrics_addr is None and config.log_format == "json"
    assert config.key_prefix == "wks:"


def test_production_turns_redis_on_unless_told_otherwise() -> None:
    """WKSD_ENV=production enables Redis by default; REDIS_ENABLED still decides."""
    assert load_config([], {"WKSD_ENV": "production"}).redis_enabled is True
    assert load_config([], {"WKSD_ENV": "production", "REDIS_ENABLED": "0"}).redis_enabled is False


def test_socket_default_follows_the_runtime_directories() -> None:
    """$RUNTIME_DIRECTORY wins over $XDG_RUNTIME_DIR, which wins over /run/wksd."""
    both = {"RUNTIME_DIRECTORY": "/run/wksd-x", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert load_config([], both).socket == "/run/wksd-x/wksd.sock"
    xdg = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert load_config([], xdg).socket == "/run/user/1000/wksd/wksd.sock"


def test_state_dir_default_follows_systemd_then_xdg() -> None:
    """$STATE_DIRECTORY wins over $XDG_STATE_HOME/wksd, which wins over ~/.local/state/wksd."""
    systemd = {"STATE_DIRECTORY": "/var/lib/wksd:/var/lib/other", "XDG_STATE_HOME": "/x"}
    assert load_config([], systemd).state_dir == "/var/lib/wksd"
    assert load_config([], {"XDG_STATE_HOME": "/x"}).state_dir == "/x/wksd"
    assert load_config([], {"HOME": "/home/u"}).state_dir == "/home/u/.local/state/wksd"
    assert load_config([], {}).fsync == "everysec"


def test_empty_state_dir_means_memory_only() -> None:
    """WKSD_STATE_DIR= (or --state-dir '') is a choice, not "unset": nothing on disk."""
    assert load_config([], {"WKSD_STATE_DIR": "", "HOME": "/home/u"}).state_dir == ""
    assert load_config(["--state-dir", ""], {"HOME": "/home/u"}).state_dir == ""
    assert Config().state_dir == ""  # constructed directly (tests, wksd.testing)


def test_redis_retry_max_is_a_setting() -> None:
    """WKSD_REDIS_RETRY_MAX (and --redis-retry-max) caps the reconnection backoff."""
    assert load_config([], {}).redis_retry_max == 5.0
    assert load_config(["--redis-retry-max", "0.5"], {}).redis_retry_max == 0.5
    with pytest.raises(ConfigError, match="WKSD_REDIS_RETRY_MAX"):
        load_config([], {"WKSD_REDIS_RETRY_MAX": "abc"})


def test_fsync_takes_redis_words_only() -> None:
    """always, everysec, no; anything else names WKSD_FSYNC."""
    assert load_config([], {"WKSD_FSYNC": "Always"}).fsync == "always"
    with pytest.raises(ConfigError, match="WKSD_FSYNC"):
        load_config([], {"WKSD_FSYNC": "sometimes"})


def test_flags_win_over_environment() -> None:
    """A flag overrides its variable."""
    config = load_config(
        ["--socket", "/tmp/a.sock", "--memory-max-keys", "5"],
        {"WKSD_SOCKET": "/tmp/b.sock", "WKSD_MEMORY_MAX_KEYS": "9"},
    )
    assert config.socket == "/tmp/a.sock" and config.memory_max_keys == 5


def test_lists_and_addresses_parse() -> None:
    """uid lists take commas or spaces; the metrics address is HOST:PORT."""
    config = load_config(
        [], {"WKSD_ALLOWED_UIDS": "1000, 1001 0", "WKSD_METRICS_ADDR": "127.0.0.1:9464"}
    )
    assert config.allowed_uids == frozenset({0, 1000, 1001})
    assert config.metrics_addr == ("127.0.0.1", 9464)
    assert load_config([], {"WKSD_METRICS_ADDR": "9464"}).metrics_addr == ("127.0.0.1", 9464)
    assert load_config([], {"WKSD_METRICS_ADDR": "[::1]:9"}).metrics_addr == ("::1", 9)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WKSD_SOCKET_MODE", "rw-rw----"),
        ("WKSD_SOCKET_MODE", "1777"),
        ("WKSD_REDIS_TIMEOUT", "0"),
        ("WKSD_REDIS_TIMEOUT", "nan"),
        ("WKSD_MEMORY_MAX_KEYS", "0"),
        ("WKSD_MEMORY_MAX_KEYS", "many"),
        ("WKSD_MAX_MESSAGE_BYTES", "100"),
        ("WKSD_CLEANUP_INTERVAL", "-5"),
        ("WKSD_ALLOWED_UIDS", "root"),
        ("WKSD_LOG_LEVEL", "loud"),
        ("WKSD_ENV", "staging"),
        ("REDIS_ENABLED", "maybe"),
        ("REDIS_PORT", "70000"),
        ("WKSD_METRICS_ADDR", "localhost:http"),
        ("WKSD_SOCKET", "/tmp/" + "x" * 120),
        ("REDIS_PASSWORD_FILE", "/nonexistent/password"),
    ],
)
def test_invalid_values_name_their_variable(variable: str, value: str) -> None:
    """Each bad value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError) as caught:
        load_config([], {variable: value})
    assert caught.value.variable == variable


def test_invalid_flag_names_flag_and_variable() -> None:
    """A bad flag value names both the flag and its variable."""
    with pytest.raises(ConfigError, match=r"--socket-mode \(WKSD_SOCKET_MODE\)"):
        load_config(["--socket-mode", "999"], {})


def test_every_setting_has_a_config_field() -> None:
    """The settings table and the Config dataclass list the same names."""
    assert {s.attribute for s in SETTINGS} == set(Config.__dataclass_fields__)


def test_config_defaults_are_the_settings_defaults() -> None:
    """Each default of the table, parsed, is the Config field's default."""
    config = Config()
    for setting in SETTINGS:
        if setting.default is not None:
            assert getattr(config, setting.attribute) == setting.parse(setting.default)


def test_boolean_flags_work_bare_and_with_a_value() -> None:
    """--x means true, --x=BOOL and --x BOOL say which, --no-x means false."""
    assert load_config(["--locks-fail-closed"], {}).locks_fail_closed is True
    assert load_config(["--locks-fail-closed=false"], {}).locks_fail_closed is False
    assert load_config(["--locks-fail-closed", "yes"], {}).locks_fail_closed is True
    enabled = {"WKSD_LOCKS_FAIL_CLOSED": "true"}
    assert load_config(["--no-locks-fail-closed"], enabled).locks_fail_closed is False
    assert load_config(["--redis-enabled", "--socket", "/tmp/s"], {}).redis_enabled is True
    production = {"WKSD_ENV": "production"}
    assert load_config(["--no-redis-enabled"], production).redis_enabled is False


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--bogus"], "--bogus"),
        (["--bogus=x"], "--bogus"),
        (["serve"], "serve"),
        (["--socket"], "--socket"),
        (["--no-locks-fail-closed=1"], "--no-locks-fail-closed"),
    ],
)
def test_command_line_mistakes_are_config_errors(argv: list[str], named: str) -> None:
    """An unknown flag, a stray word or a missing value raises ConfigError naming it."""
    with pytest.raises(ConfigError) as caught:
        load_config(argv, {})
    assert caught.value.variable == named


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/abc",
        "redis://localhost:6379/0?db=x",
        "rediss://localhost/0?ssl_cert_reqs=bogus",
        "redis://localhost/0?ssl_cert_reqs=none",
        "redis://localhost/0?socket_timeout=5",
    ],
)
def test_redis_url_is_checked_even_with_redis_off(url: str) -> None:
    """An unusable REDIS_URL is refused at start, whether or not Redis is enabled yet."""
    with pytest.raises(ConfigError) as caught:
        load_config([], {"REDIS_URL": url})
    assert caught.value.variable == "REDIS_URL"


def test_redis_retry_max_caps_the_reconnection_backoff() -> None:
    """WKSD_REDIS_RETRY_MAX reaches the store's and the subscriber's backoff as their cap."""
    from wksd.app import Daemon

    config = load_config([], {"REDIS_ENABLED": "1", "WKSD_REDIS_RETRY_MAX": "0.3"})
    daemon = Daemon(replace(config, state_dir=""))
    assert daemon.failover is not None and daemon.subscriber is not None
    for backoff in (daemon.failover._backoff, daemon.subscriber._backoff):
        waits = [backoff.compute(failures) for failures in range(10, 74)]
        assert max(waits) <= 0.3 < 5 * max(waits)  # capped there, not at the 5 s default


def test_daemon_exits_78_with_one_line_naming_the_variable() -> None:
    """`wksd` with an invalid value prints one line and exits 78 (EX_CONFIG)."""
    done = subprocess.run(
        [sys.executable, "-m", "wksd"],
        env={"WKSD_SWEEP_INTERVAL": "soon", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78
    assert done.stderr.count("\n") == 1 and "WKSD_SWEEP_INTERVAL" in done.stderr
    assert done.stdout == ""


def test_help_lists_every_flag_with_its_variable() -> None:
    """`wksd --help` shows each flag and the variable it stands for."""
    done = subprocess.run(
        [sys.executable, "-m", "wksd", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in done.stdout and setting.variable in done.stdout


def readme_settings() -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (flag, default), as written."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 4:
            variable, flag, default = cells[0].strip("`"), cells[1].strip("`"), cells[2]
            assert variable not in rows, f"{variable} twice in the README"
            rows[variable] = (flag, default)
    return rows


def test_readme_table_is_the_settings_table() -> None:
    """Each setting is a README row with its flag and default, and each row a setting."""
    documented = readme_settings()
    declared = {s.variable: (s.flag, s.documented_default) for s in SETTINGS}
    assert documented == declared
