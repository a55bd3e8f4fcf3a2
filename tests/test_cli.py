"""The ``wksd`` command as an operator meets it (wksd.cli, wksd.run): the real binary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import wksd
from wksd.logs import LogStream

from .processes import reap, wait_until_serving
from .test_ctl import COMMAND_TIMEOUT, read_until

#: EX_CONFIG from sysexits.h, which the unit's RestartPreventExitStatus= names.
EX_CONFIG = 78
#: EX_IOERR: the log stream (stdout) closed under the daemon.
EX_IOERR = 74
#: A byte no msgpack message starts with: the daemon logs the protocol error
#: at info level, so it is a way to make it write a log line on demand.
NOT_MSGPACK = b"\xc1"


def run_wksd(
    sock_path: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m wksd ARGS``, its socket (should it ever serve) in a private directory."""
    return subprocess.run(
        [sys.executable, "-m", "wksd", *args],
        env={**os.environ, "WKSD_SOCKET": sock_path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--bogus"], {}, "--bogus"),
        (["--bogus=1"], {}, "--bogus"),
        (["serve"], {}, "serve"),
        (["--redis-port"], {}, "--redis-port"),
        (["--redis-port", "abc"], {}, "--redis-port"),
        (["--redis-port=70000"], {}, "--redis-port"),
        (["--locks-fail-closed=maybe"], {}, "--locks-fail-closed"),
        (["--redis-retry-max", "abc"], {}, "--redis-retry-max"),
        ([], {"WKSD_REDIS_RETRY_MAX": "abc"}, "WKSD_REDIS_RETRY_MAX"),
        ([], {"REDIS_URL": "redis://localhost:6379/abc"}, "REDIS_URL"),
        ([], {"REDIS_URL": "rediss://localhost:6380/0?ssl_cert_reqs=bogus"}, "REDIS_URL"),
    ],
)
def test_invalid_settings_exit_78_with_one_line(
    sock_path: str, args: list[str], env: dict[str, str], named: str
) -> None:
    """A bad flag or value, on the command line or in the environment, is one line and 78."""
    done = run_wksd(sock_path, *args, env=env)
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("wksd: invalid configuration: ")
    assert named in done.stderr and "usage:" not in done.stderr
    assert done.stdout == ""


def test_the_unit_does_not_restart_on_a_bad_setting() -> None:
    """The exit status of a bad setting is the one the unit will not restart on."""
    unit = (Path(__file__).parent.parent / "systemd" / "wksd.service").read_text()
    prevent = [line for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")]
    assert len(prevent) == 1 and str(EX_CONFIG) in prevent[0].split("=", 1)[1].split()


def test_version(sock_path: str) -> None:
    """``wksd --version`` prints ``wksd X.Y.Z`` and exits 0."""
    done = run_wksd(sock_path, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wksd {wksd.__version__}\n"


def test_help_names_the_operator_command(sock_path: str) -> None:
    """``wksd --help`` points to ``wksd ctl`` and shows the bare boolean flags."""
    done = run_wksd(sock_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "wksd ctl" in done.stdout and "--version" in done.stdout
    assert "--no-locks-fail-closed" in done.stdout


def test_a_closed_stdout_stops_the_daemon_quietly(sock_path: str) -> None:
    """``wksd | head -1``: once the reader is gone the next log line stops the daemon, exit 74."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wksd", "--socket", sock_path],
        env={**os.environ, "WKSD_LOG_LEVEL": "info"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        wait_until_serving(sock_path, process)
        read_until(process.stdout.fileno(), b"\n")  # head read its line
        process.stdout.close()  # and went away
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)
            client.sendall(NOT_MSGPACK)  # the daemon logs it: the write fails
            client.recv(4096)
        assert process.wait(COMMAND_TIMEOUT) == EX_IOERR
        assert process.stderr.read() == b""
    finally:
        reap(process)


def test_a_stdout_closed_from_the_start_stops_the_daemon_quietly(sock_path: str) -> None:
    """A daemon started with nobody reading its stdout stops at its first log line, exit 74."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "wksd", "--socket", sock_path],
            env={**os.environ, "WKSD_LOG_LEVEL": "info"},
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
        )
    finally:
        os.close(writer)
    assert done.returncode == EX_IOERR
    assert done.stderr == b""


def test_log_stream_goes_quiet_once_its_reader_is_gone() -> None:
    """The first write to a pipe nobody reads calls on_closed once; nothing raises after."""
    reader, writer = os.pipe()
    os.close(reader)
    calls: list[None] = []
    with os.fdopen(writer, "w") as pipe:
        stream = LogStream(pipe, lambda: calls.append(None))
        for line in ("one\n", "two\n"):
            stream.write(line)
            stream.flush()
        assert calls == [None] and stream.closed
        pipe.write("buffered before the reader left\n")
        pipe.flush()  # the descriptor is /dev/null now: no BrokenPipeError at exit either
