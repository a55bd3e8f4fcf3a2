"""``wksd ctl`` (wksd.ctl): the pure renderers with a fixed now, then the real command."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from clientlib import Client, Health, LockStatus, WorkflowState, WorkflowStats
from clientlib.errors import ConnectionLost, UnknownMethod
from clientlib.textmode import parse_line
from wksd import ctl
from wksd.ctl import (
    CLEAR_SCREEN,
    format_duration,
    format_eta,
    format_relative,
    format_timestamp,
    frame_prefix,
    parse_arg,
    progress_bar,
    render_health,
    render_lock,
    render_state,
    render_stats,
    render_table,
    render_workflows,
    render_workflows_frame,
    text_argument,
    text_method,
    text_result,
    truncate,
)

from .processes import DaemonProcess, reap

#: A fixed "now" for the renderers: 2023-11-14 22:13:20 UTC.
NOW = 1_700_000_000_000
#: Generous for a subprocess on a loaded CI machine; a hang fails, never waits forever.
COMMAND_TIMEOUT = 30.0


#: A running workflow as the renderers see it; tests vary it with ``replace``.
RUNNING = WorkflowState(
    execution_id="exec-1",
    workflow_id="import",
    status="running",
    progress=35,
    current_step="Processing batch 7 of 20: customer records",
    total_steps=20,
    completed_steps=7,
    data={"records": 700},
    started_at=NOW - 180_000,
    updated_at=NOW - 5_000,
    estimated_completion=NOW + 130_000,
)


# -- the pure helpers -------------------------------------------------------------
@pytest.mark.parametrize(
    ("percent", "bar"),
    [
        (0, "[....................]   0%"),
        (35, "[#######.............]  35%"),
        (99, "[###################.]  99%"),
        (100, "[####################] 100%"),
        (-5, "[....................]   0%"),
        (150, "[####################] 100%"),
        (None, "[....................]   -"),  # the seed's progress of a zero-step run
    ],
)
def test_progress_bar(percent: int | None, bar: str) -> None:
    """The bar fills a cell per 5 % earned, right-aligns the percentage, and clamps to 0-100."""
    assert progress_bar(percent) == bar


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (45, "45s"),
        (130, "2m 10s"),
        (180, "3m"),
        (3600, "1h"),
        (3725, "1h 2m"),
        (90_000, "1d 1h"),
        (-130, "2m 10s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    """A duration shows its two largest units, dropping a zero second one."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (None, "—"),
        (NOW - 180_000, "3m ago"),
        (NOW + 130_000, "in 2m 10s"),
        (NOW - 999, "now"),
        (NOW + 500, "now"),
        (NOW - 7_200_000, "2h ago"),
    ],
)
def test_format_relative(at: int | None, text: str) -> None:
    """Times relative to an injected now read as "ago", "in", "now", or a dash for none."""
    assert format_relative(at, NOW) == text


@pytest.mark.parametrize(
    ("eta", "text"),
    [(None, "—"), (NOW + 130_000, "in 2m 10s"), (NOW + 200, "now"), (NOW - 5_000, "overdue 5s")],
)
def test_format_eta(eta: int | None, text: str) -> None:
    """The ETA is "in ..." ahead, "overdue ..." once passed, and a dash when there is none."""
    assert format_eta(eta, NOW) == text


def test_format_timestamp_is_utc() -> None:
    """Absolute times are UTC, the same whatever the host's zone."""
    assert format_timestamp(NOW) == "2023-11-14 22:13:20Z"
    assert format_timestamp(None) == "—"
    assert format_timestamp(2**53) == str(2**53)  # past year 9999: the number, no crash


@pytest.mark.parametrize(
    ("text", "width", "shown"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("Processing data in batches", 10, "Processin…"),
        ("line\nbreak\x1b[2J", 40, "line break?[2J"),
    ],
)
def test_truncate(text: str, width: int, shown: str) -> None:
    """Text longer than the width is cut with an ellipsis; control characters are defused."""
    assert truncate(text, width) == shown
    assert len(truncate(text, width)) <= width


def test_render_table_aligns_columns() -> None:
    """Columns are as wide as their widest cell, two spaces apart, without trailing spaces."""
    table = render_table(("A", "LONG HEADER"), [("wide cell", "x"), ("b", "")])
    assert table.splitlines() == ["A          LONG HEADER", "wide cell  x", "b"]


def test_render_workflows_table() -> None:
    """The table shows ids, bars, steps, the truncated step, started and ETA, oldest first."""
    old = replace(
        RUNNING,
        execution_id="exec-2",
        workflow_id="report",
        progress=0,
        current_step="initializing",
        total_steps=4,
        completed_steps=0,
        started_at=NOW - 3_600_000,
        estimated_completion=None,
    )
    assert render_workflows([RUNNING, old], NOW).splitlines() == [
        "EXECUTION  WORKFLOW  STATUS   PROGRESS                     STEPS"
        "  CURRENT STEP                      STARTED  ETA",
        "exec-2     report    running  [....................]   0%  0/4  "
        "  initializing                      1h ago   —",
        "exec-1     import    running  [#######.............]  35%  7/20 "
        "  Processing batch 7 of 20: custo…  3m ago   in 2m 10s",
    ]


def test_render_workflows_empty_and_watch_header() -> None:
    """No workflows is a sentence, and a watch frame carries its interval, time and count."""
    assert render_workflows([], NOW) == "no active workflows"
    frame = render_workflows_frame([], NOW, "every 2s")
    assert frame == "every 2s · 2023-11-14 22:13:20Z · 0 active\n\nno active workflows"


def test_render_state_shows_every_field() -> None:
    """One state shows all fields, the whole step text, times absolute and relative, and data."""
    text = render_state(replace(RUNNING, error="boom", completed_at=NOW - 1_000), NOW)
    assert text.splitlines() == [
        "execution:     exec-1",
        "workflow:      import",
        "status:        running",
        "progress:      [#######.............]  35%",
        "steps:         7/20",
        "current step:  Processing batch 7 of 20: customer records",
        "started:       2023-11-14 22:10:20Z (3m ago)",
        "updated:       2023-11-14 22:13:15Z (5s ago)",
        "eta:           in 2m 10s",
        "completed:     2023-11-14 22:13:19Z (1s ago)",
        "error:         boom",
        "data:",
        "  {",
        '    "records": 700',
        "  }",
    ]


def test_render_health() -> None:
    """Health shows status, backend, Redis with its latency, memory keys, uptime and version."""
    health = Health.from_wire(
        {
            "status": "healthy",
            "backend": "redis",
            "checks": {
                "redis": {"status": "up", "latency": 0.42},
                "memory": {"status": "up", "keys": 3},
            },
            "uptime": 3725.5,
            "version": "0.1.0",
        }
    )
    assert render_health(health).splitlines() == [
        "status:   healthy",
        "backend:  redis",
        "redis:    up, latency 0.42 ms",
        "memory:   up, 3 keys",
        "uptime:   1h 2m",
        "version:  0.1.0",
    ]


def test_render_stats() -> None:
    """Stats show the active count, the average as a bar, and each status's count."""
    stats = WorkflowStats(2, {"pending": 0, "running": 2, "completed": 5}, 35)
    assert render_stats(stats).splitlines() == [
        "active:            2",
        "average progress:  [#######.............]  35%",
        "pending:           0",
        "running:           2",
        "completed:         5",
    ]


def test_render_lock_held_and_free() -> None:
    """A held lock shows its holder and time left; a free one says so."""
    assert render_lock("e1", LockStatus(True, "worker-1", 95_500)).splitlines() == [
        "lock:       e1",
        "state:      held",
        "holder:     worker-1",
        "time left:  1m 35s",
    ]
    assert render_lock("e1", LockStatus(False, None, None)).splitlines() == [
        "lock:   e1",
        "state:  free",
    ]


def test_frame_prefix() -> None:
    """A watch redraws on a terminal, separates frames by a blank line in a pipe, never in JSON."""
    assert frame_prefix(0, as_json=False, tty=True) == CLEAR_SCREEN
    assert frame_prefix(1, as_json=False, tty=True) == CLEAR_SCREEN
    assert frame_prefix(0, as_json=False, tty=False) == ""
    assert frame_prefix(1, as_json=False, tty=False) == "\n"
    assert frame_prefix(1, as_json=True, tty=True) == ""


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("60", 60),
        ("1.5", 1.5),
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("null", None),
        ("true", True),
        ("u1", "u1"),
        ('"123"', "123"),
        ("123abc", "123abc"),
        ("NaN", "NaN"),
        ("two words", "two words"),
        ("", ""),
    ],
)
def test_parse_arg_follows_the_text_protocol(word: str, value: object) -> None:
    """Each shell word is JSON where it parses as one, else the word itself as a string."""
    assert parse_arg(word) == value


@pytest.mark.parametrize(
    "word",
    ["60", "u1", "123abc", '{"a": 1}', '"123"', "two words", "line\nbreak", "", " ", "NaN", "é"],
)
def test_text_argument_reads_back_as_the_word(word: str) -> None:
    """Each word, put on a text line, is read there as that one argument parse_arg reads."""
    parsed = parse_line(f"{text_method('session.get')} {text_argument(word)}".encode())
    assert parsed == ("session.get", [parse_arg(word)])


@pytest.mark.parametrize("method", ["session.get", "123", "a b", '"quoted"'])
def test_text_method_is_always_a_name(method: str) -> None:
    """The method goes as a string, even one that looks like a number or has a space."""
    parsed = parse_line(text_method(method).encode())
    assert parsed == (method.lower(), [])


def test_text_result_skips_notifications_and_raises_errors() -> None:
    """The answer line is the first that is not a notification; an error line raises."""
    notice = b'{"notification":"lock.lost","params":["e1"]}\n'
    assert text_result("session.get", notice + b'{"a":1}\n') == {"a": 1}
    with pytest.raises(UnknownMethod, match="no such"):
        text_result("nope", b'{"error":{"code":"UNKNOWN_METHOD","message":"no such"}}\n')
    with pytest.raises(ConnectionLost):
        text_result("ping", b"")
    exposition = b"# TYPE x counter\nx 1\n"
    assert text_result("metrics", exposition) == exposition.decode()


def test_shared_options_go_before_or_after_the_command() -> None:
    """--socket, --timeout and --json are accepted on either side of the command name."""
    parser = ctl.build_parser()
    before = parser.parse_args(["--json", "--socket", "/s", "--timeout", "2", "call", "ping"])
    after = parser.parse_args(["call", "ping", "--json", "--socket", "/s", "--timeout", "2"])
    for args in (before, after):
        assert (args.json, args.socket, args.timeout, args.method) == (True, "/s", 2.0, "ping")
    assert parser.parse_args(["workflows", "--watch"]).watch == ctl.DEFAULT_WATCH_INTERVAL


def test_usage_errors_exit_64(capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error exits 64, so it is never mistaken for "daemon unreachable" (2)."""
    with pytest.raises(SystemExit) as exc_info:
        ctl.main(["workflows", "--watch", "0"])
    assert exc_info.value.code == ctl.EXIT_USAGE
    assert "--watch" in capsys.readouterr().err


# -- the real command against the real daemon -------------------------------------
def run_ctl(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wksd", "ctl", "--socket", path, *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def start_with_future_eta(client: Client, execution_id: str) -> None:
    """Start a run whose ETA is far ahead: 1 of 100,000 steps done after >= 1 ms.

    The ETA is startedAt + elapsed / fraction, so it needs the daemon's clock
    to have moved; the update is repeated (with a deadline) until it has.
    """
    client.start_workflow_tracking(execution_id, "bulk-export", 100_000)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while True:
        updated = client.update_workflow_progress(execution_id, 1, "Exporting rows")
        if updated.estimated_completion is not None and updated.updated_at > updated.started_at:
            return
        assert time.monotonic() < deadline, "the daemon's clock did not move"


@pytest.fixture
def seeded(daemon_process: DaemonProcess) -> Iterator[str]:
    """A daemon with three active workflows and a held lock; its socket path."""
    with Client(daemon_process.path) as client:
        client.start_workflow_tracking("exec-aaa", "nightly-import", 20, {"userId": "u1"})
        client.update_workflow_progress("exec-aaa", 7, "Processing batch 7 of 20")
        client.start_workflow_tracking("exec-bbb", "thumbnails", 8)
        start_with_future_eta(client, "exec-ccc")
        assert client.acquire_lock("exec-aaa", "worker-1", 120)
    yield daemon_process.path


def test_health_text_and_json(seeded: str) -> None:
    """health prints a readable report, or the raw document with --json, and exits 0."""
    text = run_ctl(seeded, "health")
    assert text.returncode == 0, text.stderr
    assert "status:   healthy" in text.stdout
    assert "backend:  memory" in text.stdout
    assert "redis:    disabled" in text.stdout
    raw = run_ctl(seeded, "health", "--json")
    assert raw.returncode == 0, raw.stderr
    document = json.loads(raw.stdout)
    assert document["status"] == "healthy" and document["checks"]["memory"]["keys"] > 0
    assert raw.stdout.count("\n") == 1


def test_health_unhealthy_exits_1(sock_path: str) -> None:
    """health exits 1 when the daemon reports itself unhealthy (memory store at its bound)."""
    daemon = DaemonProcess(sock_path, {"WKSD_MEMORY_MAX_KEYS": "1"}).start()
    try:
        with Client(sock_path) as client:
            client.set_session("u1", {}, ttl=60)
        result = run_ctl(sock_path, "health")
    finally:
        daemon.close()
    assert result.returncode == 1
    assert "status:   unhealthy" in result.stdout


def test_stats(seeded: str) -> None:
    """stats shows the active count, the average progress and the count per status."""
    result = run_ctl(seeded, "stats")
    assert result.returncode == 0, result.stderr
    assert "active:            3" in result.stdout
    assert "running:           3" in result.stdout
    assert "average progress:  [" in result.stdout
    assert json.loads(run_ctl(seeded, "--json", "stats").stdout)["activeExecutions"] == 3


def test_workflows_table(seeded: str) -> None:
    """workflows lists every active run with its bar, steps, step text and ETA."""
    result = run_ctl(seeded, "workflows")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert result.stdout.startswith("EXECUTION  WORKFLOW")
    assert set(rows) == {"exec-aaa", "exec-bbb", "exec-ccc"}
    assert "[#######.............]  35%  7/20" in rows["exec-aaa"]
    assert "Processing batch 7 of 20" in rows["exec-aaa"]
    assert rows["exec-bbb"].rstrip().endswith("—")  # nothing done yet: no ETA
    assert "[....................]   0%" in rows["exec-ccc"]
    assert " in " in rows["exec-ccc"]  # an ETA ahead


def test_workflows_json(seeded: str) -> None:
    """workflows --json prints the daemon's active_detailed result as one JSON line."""
    result = run_ctl(seeded, "workflows", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["count"] == 3
    assert {s["executionId"] for s in document["workflows"]} == {"exec-aaa", "exec-bbb", "exec-ccc"}


def test_workflows_watch_counts_frames(seeded: str) -> None:
    """--watch 0.1 --count 2 prints two frames, without screen codes in a pipe, and exits 0."""
    result = run_ctl(seeded, "workflows", "--watch", "0.1", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("every 0.1s · ") == 2
    assert result.stdout.count("exec-aaa") == 2
    assert "\x1b" not in result.stdout
    frames = run_ctl(seeded, "workflows", "--json", "--watch", "0.1", "--count", "2")
    assert [json.loads(line)["count"] for line in frames.stdout.splitlines()] == [3, 3]


def test_workflows_watch_ends_on_ctrl_c(seeded: str) -> None:
    """Ctrl-C ends a watch with exit status 0 and no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wksd", "ctl", "--socket", seeded, "workflows", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell's background job, or CI, may start pytest with SIGINT ignored;
        # the child would inherit that and never see the Ctrl-C sent below.
        preexec_fn=default_sigint,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        read_until(process.stdout.fileno(), b"exec-aaa")  # the first frame is out
        process.send_signal(signal.SIGINT)
        assert process.wait(COMMAND_TIMEOUT) == 0
        assert b"Traceback" not in process.stderr.read()
    finally:
        reap(process)


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, whatever pytest inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(fd: int, wanted: bytes, timeout: float = COMMAND_TIMEOUT) -> bytes:
    """Read ``fd`` until ``wanted`` appears, with a deadline."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{wanted!r} not seen within {timeout} s: {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"end of output before {wanted!r}: {seen!r}"
            seen += chunk
    return seen


def test_workflow_shows_one_state(seeded: str) -> None:
    """workflow ID shows every field readably, --json the raw state, and exits 1 for none."""
    result = run_ctl(seeded, "workflow", "exec-aaa")
    assert result.returncode == 0, result.stderr
    assert "execution:     exec-aaa" in result.stdout
    assert "workflow:      nightly-import" in result.stdout
    assert "steps:         7/20" in result.stdout
    assert "current step:  Processing batch 7 of 20" in result.stdout
    assert '"userId": "u1"' in result.stdout
    raw = json.loads(run_ctl(seeded, "workflow", "exec-aaa", "--json").stdout)
    assert raw["executionId"] == "exec-aaa" and raw["completedSteps"] == 7
    missing = run_ctl(seeded, "workflow", "exec-none")
    assert missing.returncode == 1
    assert "exec-none" in missing.stderr


def test_lock_held_and_free(seeded: str) -> None:
    """lock ID says who holds the lock and for how long, or that it is free."""
    held = run_ctl(seeded, "lock", "exec-aaa")
    assert held.returncode == 0, held.stderr
    assert "state:      held" in held.stdout
    assert "holder:     worker-1" in held.stdout
    assert "time left:  1m" in held.stdout or "time left:  2m" in held.stdout
    free = run_ctl(seeded, "lock", "exec-bbb")
    assert "state:  free" in free.stdout
    assert (
        json.loads(run_ctl(seeded, "--json", "lock", "exec-aaa").stdout)["workerId"] == "worker-1"
    )


def test_call_any_method(daemon_process: DaemonProcess) -> None:
    """call parses each argument as JSON where it can, and --json prints the raw result."""
    path = daemon_process.path
    stored = run_ctl(path, "call", "session.set", "u1", '{"a": 1}', "60")
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == "true\n"
    fetched = run_ctl(path, "call", "session.get", "u1", "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout) == {"a": 1}
    assert run_ctl(path, "call", "session.get", "u1").stdout == '{\n  "a": 1\n}\n'
    assert run_ctl(path, "call", "cache.set", "k", "two words").returncode == 0
    with Client(path) as client:
        assert client.get_cached_api_response("k") == "two words"


def text_session(path: str, line: bytes) -> bytes:
    """What the daemon answers ``line`` with in a text session (as ``echo line | socat``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(COMMAND_TIMEOUT)
        sock.connect(path)
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_call_reads_a_number_as_an_identifier(daemon_process: DaemonProcess) -> None:
    """call session.get 123 asks for user "123", exactly as the text line does."""
    path = daemon_process.path
    with Client(path) as client:
        client.set_session("123", {"role": "admin"}, ttl=60)
    fetched = run_ctl(path, "--json", "call", "session.get", "123")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.encode() == text_session(path, b"session.get 123")
    assert json.loads(fetched.stdout) == {"role": "admin"}
    stored = run_ctl(path, "call", "session.set", "456", '{"b": 2}', "60")
    assert stored.returncode == 0, stored.stderr
    with Client(path) as client:
        assert client.get_session("456") == {"b": 2}


def test_call_keeps_each_shell_word_one_argument(daemon_process: DaemonProcess) -> None:
    """A word with spaces, a line break or quotes in it reaches the daemon as that one string."""
    path = daemon_process.path
    words = [("two words", "two words"), ("line\nbreak", "line\nbreak"), ('"12"', "12"), ("", "")]
    for index, (word, meant) in enumerate(words):
        result = run_ctl(path, "call", "cache.set", f"k{index}", word)
        assert result.returncode == 0, result.stderr
        with Client(path) as client:
            assert client.get_cached_api_response(f"k{index}") == meant


def test_call_metrics_prints_the_exposition(daemon_process: DaemonProcess) -> None:
    """call metrics prints the Prometheus text itself, as the text protocol does."""
    result = run_ctl(daemon_process.path, "call", "metrics")
    assert result.returncode == 0, result.stderr
    assert "# TYPE wksd_requests_total counter" in result.stdout


def test_remote_error_exits_1(daemon_process: DaemonProcess) -> None:
    """A method the daemon does not know exits 1 with CODE: message on stderr."""
    result = run_ctl(daemon_process.path, "call", "no.such.method")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("UNKNOWN_METHOD: ")


def test_missing_daemon_exits_2(sock_path: str) -> None:
    """With no daemon on the socket, every command exits 2 with one line naming the socket."""
    for command in (["health"], ["workflows", "--watch", "0.1"], ["call", "ping"]):
        result = run_ctl(sock_path, *command)
        assert result.returncode == 2
        assert result.stdout == ""
        assert sock_path in result.stderr
        assert result.stderr.count("\n") == 1


def test_help_is_useful() -> None:
    """ctl --help lists the commands, and a command's --help explains its arguments."""
    overview = subprocess.run(
        [sys.executable, "-m", "wksd", "ctl", "--help"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert overview.returncode == 0
    for command in ("health", "stats", "workflows", "workflow", "lock", "call", "--json"):
        assert command in overview.stdout
    call_help = subprocess.run(
        [sys.executable, "-m", "wksd", "ctl", "call", "--help"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert call_help.returncode == 0
    assert "METHOD" in call_help.stdout and "JSON" in call_help.stdout
