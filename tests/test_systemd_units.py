"""The systemd units: systemd's own checkers accept them, and they say what
DESIGN section 8 asks.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` run
for real (they need no systemd as PID 1, so they work in a CI container); the
rest parses the unit files with the rules of systemd.syntax(7): sections,
repeated keys that accumulate, an empty assignment that resets, comments and
line continuations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clientlib import default_socket_path
from wksd.config import SETTINGS

from .processes import require_binary

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SOCKET = UNITS / "wksd.socket"
SERVICE = UNITS / "wksd.service"
ENV_EXAMPLE = UNITS / "wksd.env.example"
SYSUSERS = UNITS / "wksd.sysusers.conf"
TMPFILES = UNITS / "wksd.tmpfiles.conf"

#: Where the README installs the daemon: a venv under /opt/wksd.
INSTALLED_VENV = "/opt/wksd/venv"
INSTALLED_EXEC_START = f"{INSTALLED_VENV}/bin/wksd"

#: The bar issue 4 sets for `systemd-analyze security` (0 best, 10 worst).
MAX_EXPOSURE = 1.5

#: systemd-analyze runs in well under a second; this only bounds a hang.
ANALYZE_TIMEOUT = 60

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """A unit file as {section: {key: [values]}}, per systemd.syntax(7)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not logical and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        line, logical = logical + stripped, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} before any [Section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()  # an empty assignment resets the list
    return unit


def only(unit: Unit, section: str, key: str) -> str:
    """The single value of ``key``; fails when it is missing or repeated."""
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, found {values}"
    return values[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """Every whitespace-separated word of every assignment of ``key``."""
    return [word for value in unit.get(section, {}).get(key, []) for word in value.split()]


def seconds(timespan: str) -> float:
    """A systemd time span ("10s", "1min 30s", "500ms", "15") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze without pager or colours; its result."""
    binary = require_binary("systemd-analyze")
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(
        [binary, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET)


def env_example_assignments() -> list[tuple[str, str]]:
    """Every NAME=value of the env example, commented out or not."""
    found = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found.append((match[1], match[2]))
    return found


def table_rows(path: Path) -> list[list[str]]:
    """The non-comment lines of a sysusers.d or tmpfiles.d file, split in columns."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            # The GECOS column of sysusers.d is quoted and may hold spaces.
            rows.append(re.findall(r'"[^"]*"|\S+', line))
    return rows


# --- systemd's own checkers ---------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts both units without a word, with ExecStart
    pointing at this test run's venv (same layout as /opt/wksd/venv) since
    verify insists that the binary exists."""
    local_wksd = Path(sys.prefix, "bin", "wksd")
    assert local_wksd.is_file(), f"{local_wksd} missing: install the package (pip install -e .)"
    text = SERVICE.read_text(encoding="utf-8")
    line = f"ExecStart={INSTALLED_EXEC_START}\n"
    assert text.count(line) == 1, f"wksd.service should contain {line!r} once"
    (tmp_path / SERVICE.name).write_text(
        text.replace(line, f"ExecStart={local_wksd}\n"), encoding="utf-8"
    )
    shutil.copy(SOCKET, tmp_path / SOCKET.name)

    result = analyze("verify", SOCKET.name, SERVICE.name, cwd=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_service_security_exposure_is_at_most_1_5() -> None:
    """`systemd-analyze security --offline=true` rates the service 1.5 or better."""
    result = analyze("security", "--offline=true", "--no-pager", str(SERVICE))

    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for wksd\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


# --- what DESIGN section 8 asks ---------------------------------------------------


def test_socket_listens_where_the_daemon_and_clients_look(socket_unit: Unit) -> None:
    """The socket unit listens on /run/wksd/wksd.sock, the default path of a
    daemon whose $RUNTIME_DIRECTORY is /run/wksd and of every client."""
    listen = only(socket_unit, "Socket", "ListenStream")
    assert listen == "/run/wksd/wksd.sock"
    assert listen == default_socket_path({"RUNTIME_DIRECTORY": "/run/wksd"})
    assert listen == default_socket_path({})


def test_socket_is_for_the_daemon_and_its_client_group(socket_unit: Unit, service: Unit) -> None:
    """The socket is mode 0660, owned by the service's user and the wksd-clients
    group, and enabled by sockets.target."""
    assert only(socket_unit, "Socket", "SocketMode") == "0660"
    assert only(socket_unit, "Socket", "SocketUser") == only(service, "Service", "User")
    assert only(socket_unit, "Socket", "SocketGroup") == "wksd-clients"
    assert "sockets.target" in words(socket_unit, "Install", "WantedBy")


def test_service_is_notify_type_with_a_watchdog(service: Unit) -> None:
    """The service waits for READY=1 from the daemon itself and restarts it when
    its WATCHDOG=1 pings stop or it fails."""
    assert only(service, "Service", "Type") == "notify"
    assert only(service, "Service", "NotifyAccess") == "main"
    assert seconds(only(service, "Service", "WatchdogSec")) > 0
    assert only(service, "Service", "Restart") == "on-failure"


def test_service_is_started_by_the_socket(service: Unit) -> None:
    """The service requires and follows wksd.socket, and runs the installed venv's wksd."""
    assert "wksd.socket" in words(service, "Unit", "Requires")
    assert "wksd.socket" in words(service, "Unit", "After")
    assert only(service, "Service", "ExecStart") == INSTALLED_EXEC_START


def test_service_runtime_directory_holds_the_socket(service: Unit, socket_unit: Unit) -> None:
    """RuntimeDirectory= is the socket's directory and outlives a stopped service,
    so socket activation keeps working."""
    assert words(service, "Service", "RuntimeDirectory") == ["wksd"]
    assert only(service, "Service", "RuntimeDirectoryPreserve") == "yes"
    listen = only(socket_unit, "Socket", "ListenStream")
    assert os.path.dirname(listen) == "/run/wksd"


def test_service_state_directory_is_the_durable_store(service: Unit) -> None:
    """StateDirectory= gives $STATE_DIRECTORY, the daemon's default WKSD_STATE_DIR,
    private to the service; a damaged one (exit 65) is not restarted in a loop."""
    from wksd.config import load_config

    assert words(service, "Service", "StateDirectory") == ["wksd"]
    assert only(service, "Service", "StateDirectoryMode") == "0700"
    assert "65" in words(service, "Service", "RestartPreventExitStatus")
    environ = {"STATE_DIRECTORY": "/var/lib/wksd"}
    assert load_config([], environ).state_dir == "/var/lib/wksd"


def test_service_reads_env_file_and_redis_password_credential(service: Unit) -> None:
    """The service takes an optional /etc/wksd/wksd.env and the credential
    redis-password that the daemon reads from $CREDENTIALS_DIRECTORY."""
    assert "-/etc/wksd/wksd.env" in service["Service"].get("EnvironmentFile", [])
    credentials = dict(
        value.split(":", 1) for value in service["Service"].get("LoadCredential", [])
    )
    assert credentials.get("redis-password") == "/etc/wksd/redis-password"


def test_service_stop_timeout_exceeds_the_drain_deadline(service: Unit) -> None:
    """systemd waits longer than the daemon's default drain (WKSD_SHUTDOWN_TIMEOUT)
    before it kills, and signals the main process only."""
    drain = next(s for s in SETTINGS if s.variable == "WKSD_SHUTDOWN_TIMEOUT").default
    assert drain is not None
    assert seconds(only(service, "Service", "TimeoutStopSec")) > float(drain)
    assert only(service, "Service", "KillMode") == "mixed"


def test_service_keeps_what_the_daemon_needs(service: Unit) -> None:
    """Hardening leaves the daemon its network (Redis), real peer credentials
    (no user namespace) and other users' /proc/PID/status (groups fallback)."""
    settings = service["Service"]
    assert settings.get("PrivateNetwork", ["no"]) == ["no"]
    assert settings.get("PrivateUsers", ["no"]) == ["no"]
    assert settings.get("ProtectProc", ["default"]) == ["default"]
    assert set(words(service, "Service", "RestrictAddressFamilies")) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }
    assert words(service, "Service", "IPAddressAllow") == ["localhost"]


# --- the files that come with the units -------------------------------------------


def test_env_example_names_only_variables_the_daemon_knows() -> None:
    """Every NAME= in wksd.env.example is a setting of wksd.config.SETTINGS."""
    known = {setting.variable for setting in SETTINGS}
    named = {name for name, _ in env_example_assignments()}
    assert named, "wksd.env.example names no variable"
    assert named <= known, f"unknown to the daemon: {sorted(named - known)}"


def test_env_example_lists_every_setting() -> None:
    """wksd.env.example mentions every setting, so it stays the full reference."""
    named = {name for name, _ in env_example_assignments()}
    missing = sorted({setting.variable for setting in SETTINGS} - named)
    assert not missing, f"add to systemd/wksd.env.example: {missing}"


def test_env_example_values_are_accepted_by_the_daemon() -> None:
    """Each example value, commented out or not, parses as its setting."""
    by_variable = {setting.variable: setting for setting in SETTINGS}
    for name, value in env_example_assignments():
        if value:  # an empty example is a placeholder to fill in
            by_variable[name].parse(value)


def test_sysusers_declares_the_accounts_the_units_name(socket_unit: Unit, service: Unit) -> None:
    """wksd.sysusers.conf creates every user and group the units refer to."""
    declared = {(row[0], row[1]) for row in table_rows(SYSUSERS)}
    user = only(service, "Service", "User")
    assert ("u", user) in declared
    # "u NAME" also makes the group NAME; other groups need a "g" line.
    groups = {name for kind, name in declared if kind in ("u", "g")}
    assert only(service, "Service", "Group") in groups
    assert only(socket_unit, "Socket", "SocketUser") == user
    assert only(socket_unit, "Socket", "SocketGroup") in groups


def test_tmpfiles_makes_the_runtime_directory_as_the_service_wants_it(service: Unit) -> None:
    """tmpfiles.d creates /run/wksd with RuntimeDirectory='s owner and mode, so the
    service's start does not re-own the socket file below it."""
    rows = {row[1]: row for row in table_rows(TMPFILES)}
    kind, _, mode, user, group, *_ = rows["/run/wksd"]
    assert kind == "d"
    assert mode == only(service, "Service", "RuntimeDirectoryMode")
    assert (user, group) == (only(service, "Service", "User"), only(service, "Service", "Group"))


def test_socket_runs_tmpfiles_before_binding(socket_unit: Unit) -> None:
    """wksd.socket applies wksd.conf (installed from wksd.tmpfiles.conf) before it
    binds, so /run/wksd is right even on the first start after installing."""
    command = only(socket_unit, "Socket", "ExecStartPre").split()
    assert os.path.basename(command[0]) == "systemd-tmpfiles"
    assert command[1:] == ["--create", "wksd.conf"]


def test_tmpfiles_creates_the_credential_file(service: Unit) -> None:
    """The credential's source file exists after tmpfiles runs, so the service
    can start before an operator has set a password."""
    rows = {row[1]: row for row in table_rows(TMPFILES)}
    credentials = dict(
        value.split(":", 1) for value in service["Service"].get("LoadCredential", [])
    )
    row = rows[credentials["redis-password"]]
    assert row[0] == "f", "f creates the file if missing and never overwrites it"
    assert row[2] == "0600"


def test_fd_limit_leaves_room_for_the_connection_caps(service: Unit) -> None:
    """LimitNOFILE= covers the default connection cap, the admin reserve, the
    connections being refused and the daemon's own fds: the daemon cannot raise
    it itself under SystemCallFilter=~@resources."""
    from wksd.config import Config
    from wksd.server import ADMIN_RESERVE, MAX_REFUSING, OWN_FDS

    assert "@resources" in " ".join(words(service, "Service", "SystemCallFilter"))
    limit = int(only(service, "Service", "LimitNOFILE"))
    assert limit >= Config().max_connections + ADMIN_RESERVE + MAX_REFUSING + OWN_FDS
