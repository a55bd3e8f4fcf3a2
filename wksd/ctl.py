"""``wksd ctl``: the operator's command line, readable for people, ``--json`` for scripts.

Theory of operation. ``main`` parses the arguments with argparse into one
command function and the shared options (``--socket``, ``--timeout``,
``--json``, accepted before or after the command name). The command asks the
daemon through clientlib's blocking ``Client`` with ``Client.call``, so it
holds the raw result exactly as the daemon sent it: ``--json`` prints that
raw result as one compact JSON line, and otherwise it is turned into
clientlib's typed value (``Health.from_wire`` ...) and rendered for people.

``call METHOD [ARG ...]`` is the exception: it speaks a text session (as
``echo 'METHOD ARG ...' | socat``), so its arguments are read by the text
protocol's own reader and rules in the daemon, the lenient one included
(a bare ``123`` where an identifier is expected is the id "123"). Each
shell word stays one argument: a word the text protocol would read as one
token goes as it is, any other (``'two words'``, a line break) as the JSON
string of what ``parse_arg`` reads in it.

The rendering is pure functions of their inputs and of an injected ``now``
(epoch ms), so every table, bar and relative time is unit-tested with fixed
values; only ``main`` and the command functions touch the socket, the clock
and stdout. Each command returns its exit status, and ``main`` turns
clientlib's errors into theirs:

- 0: done (``health``: healthy or degraded);
- 1: the daemon refused the request (``CODE: message`` on stderr), or it is
  unhealthy, or the workflow asked for does not exist;
- 2: the daemon could not be talked to (not running, timed out, connection
  broke); one line naming the socket on stderr;
- 64: a usage error (argparse's own 2 would read as "unreachable");
- 130: a one-shot command interrupted by Ctrl-C (a ``--watch`` ends with 0).

This module is for operators only: the daemon never imports it (``wksd.cli``
loads it lazily), and it uses neither trio nor redis.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

from clientlib import Client, Health, LockStatus, WorkflowState, WorkflowStats
from clientlib.errors import (
    ConnectionLost,
    DaemonUnavailable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    WksError,
    error_from_wire,
)
from clientlib.textmode import parse_line

__all__ = [
    "build_parser",
    "format_duration",
    "format_eta",
    "format_relative",
    "format_timestamp",
    "frame_prefix",
    "main",
    "parse_arg",
    "progress_bar",
    "render_health",
    "render_lock",
    "render_state",
    "render_stats",
    "render_table",
    "render_workflows",
    "render_workflows_frame",
    "text_argument",
    "text_method",
    "text_result",
    "text_session",
    "truncate",
]

EXIT_OK: Final = 0
#: The daemon answered, but with an error or bad news (unhealthy, not found).
EXIT_FAILED: Final = 1
#: The daemon could not be talked to at all.
EXIT_UNREACHABLE: Final = 2
#: EX_USAGE from sysexits.h, so a typo is never taken for "unreachable" (2),
#: argparse's own default.
EXIT_USAGE: Final = 64
#: 128 + SIGINT, the shell's convention, for a one-shot command interrupted.
EXIT_INTERRUPTED: Final = 130

#: Twenty cells: each one is 5 %, fine enough to see movement between refreshes.
BAR_WIDTH: Final = 20
#: Wide enough for a step name like "Processing batch 12 of 40", narrow
#: enough that the table stays within a 120-column terminal.
STEP_WIDTH: Final = 32
#: The ``--watch`` default, as watch(1): fresh enough, cheap for the daemon.
DEFAULT_WATCH_INTERVAL: Final = 2.0
#: Cursor home, then erase the screen: redraws a frame in place on a terminal.
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
#: Shown where a time does not apply (no ETA yet, never completed).
NONE: Final = "—"

_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
#: Control characters (C0, DEL, C1): an id or step text could otherwise move
#: the cursor or break a table row.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: A method-name placeholder that lets ``parse_line`` read a lone argument.
_PLACEHOLDER_METHOD: Final = "_"
#: What ends a text line: a word holding one goes as a JSON string.
_LINE_BREAKS: Final = frozenset("\r\n")
#: Bytes asked of the socket per read of a text session's answer.
_READ_CHUNK: Final = 65536


# -- pure formatting ----------------------------------------------------------
def progress_bar(percent: int | None, width: int = BAR_WIDTH) -> str:
    """``[#######.............]  35%``: cells filled only once fully earned.

    None (the seed's progress of a zero-step run) is an empty bar marked ``-``.
    """
    if percent is None:
        return f"[{'.' * width}]   -"
    percent = max(0, min(100, percent))
    filled = percent * width // 100
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:>3}%"


def format_duration(seconds: float) -> str:
    """A duration as its two largest units: ``45s``, ``2m 10s``, ``3h``, ``1d 4h``."""
    remaining = int(abs(seconds))
    parts = []
    for unit, size in _UNITS:
        amount, remaining = divmod(remaining, size)
        parts.append(f"{amount}{unit}" if amount else "")
    first = next((index for index, part in enumerate(parts) if part), None)
    if first is None:
        return "0s"
    return " ".join(part for part in parts[first : first + 2] if part)


def format_relative(at_ms: int | None, now_ms: int) -> str:
    """``3m ago``, ``in 2m 10s``, ``now`` (within a second), or ``—`` for None."""
    if at_ms is None:
        return NONE
    delta = (at_ms - now_ms) / 1000
    if abs(delta) < 1:
        return "now"
    return f"in {format_duration(delta)}" if delta > 0 else f"{format_duration(delta)} ago"


def format_eta(estimated_ms: int | None, now_ms: int) -> str:
    """The ETA column: ``in 2m 10s``, ``overdue 5s`` once past, ``—`` when none."""
    if estimated_ms is not None and now_ms - estimated_ms >= 1000:
        return f"overdue {format_duration((now_ms - estimated_ms) / 1000)}"
    return format_relative(estimated_ms, now_ms)


def format_timestamp(at_ms: int | None) -> str:
    """Epoch ms as UTC, ``2026-05-01 12:00:00Z``, the same on every host."""
    if at_ms is None:
        return NONE
    try:
        return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # beyond datetime's years: show the number
        return str(at_ms)


def truncate(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = printable(text)
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


def printable(text: str) -> str:
    """``text`` with control characters replaced, so it cannot drive the terminal."""
    return _CONTROL.sub(lambda match: " " if match.group() in "\t\n\r" else "?", text)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, headers first, no trailing spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def render_fields(fields: Sequence[tuple[str, str]]) -> str:
    """``name:  value`` lines with the values aligned."""
    width = max(len(name) for name, _ in fields) + 1
    return "\n".join(f"{name + ':':<{width}}  {value}".rstrip() for name, value in fields)


_WORKFLOW_HEADERS: Final = (
    "EXECUTION",
    "WORKFLOW",
    "STATUS",
    "PROGRESS",
    "STEPS",
    "CURRENT STEP",
    "STARTED",
    "ETA",
)


def render_workflows(states: Sequence[WorkflowState], now_ms: int) -> str:
    """The active workflows as a table, oldest first."""
    if not states:
        return "no active workflows"
    rows = [
        (
            printable(state.execution_id),
            printable(state.workflow_id),
            state.status,
            progress_bar(state.progress),
            f"{state.completed_steps}/{state.total_steps}",
            truncate(state.current_step, STEP_WIDTH),
            format_relative(state.started_at, now_ms),
            format_eta(state.estimated_completion, now_ms),
        )
        for state in sorted(states, key=lambda s: (s.started_at, s.execution_id))
    ]
    return render_table(_WORKFLOW_HEADERS, rows)


def render_workflows_frame(states: Sequence[WorkflowState], now_ms: int, header: str | None) -> str:
    """The table, under ``header · time · N active`` when watching."""
    table = render_workflows(states, now_ms)
    if header is None:
        return table
    return f"{header} · {format_timestamp(now_ms)} · {len(states)} active\n\n{table}"


def _when(at_ms: int | None, now_ms: int) -> str:
    return (
        NONE if at_ms is None else f"{format_timestamp(at_ms)} ({format_relative(at_ms, now_ms)})"
    )


def render_state(state: WorkflowState, now_ms: int) -> str:
    """Every field of one workflow state, its data as indented JSON."""
    fields = [
        ("execution", printable(state.execution_id)),
        ("workflow", printable(state.workflow_id)),
        ("status", state.status),
        ("progress", progress_bar(state.progress)),
        ("steps", f"{state.completed_steps}/{state.total_steps}"),
        ("current step", printable(state.current_step)),
        ("started", _when(state.started_at, now_ms)),
        ("updated", _when(state.updated_at, now_ms)),
        ("eta", format_eta(state.estimated_completion, now_ms)),
        ("completed", _when(state.completed_at, now_ms)),
    ]
    if state.error is not None:
        fields.append(("error", printable(state.error)))
    data = dump_json(state.data, pretty=True) if state.data else "{}"
    return render_fields(fields) + "\ndata:\n" + _indent(data)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def render_health(health: Health) -> str:
    """Status, backend, Redis and memory checks, uptime and version."""
    redis = health.redis_status
    if health.redis_latency is not None:
        redis += f", latency {health.redis_latency:g} ms"
    memory_status = health.checks.get("memory", {}).get("status", "up")
    return render_fields(
        [
            ("status", health.status),
            ("backend", health.backend),
            ("redis", redis),
            ("memory", f"{memory_status}, {health.memory_keys} keys"),
            ("uptime", format_duration(health.uptime)),
            ("version", health.version),
        ]
    )


def render_stats(stats: WorkflowStats) -> str:
    """Active count, average progress, then the count of each status."""
    fields = [
        ("active", str(stats.active_executions)),
        ("average progress", progress_bar(stats.average_progress)),
    ]
    fields += [(status, str(n)) for status, n in stats.executions_by_status.items()]
    return render_fields(fields)


def render_lock(execution_id: str, status: LockStatus) -> str:
    """``held`` with its holder and time left, or ``free``."""
    if not status.locked:
        return render_fields([("lock", printable(execution_id)), ("state", "free")])
    left = NONE if status.ttl is None else format_duration(status.ttl / 1000)
    return render_fields(
        [
            ("lock", printable(execution_id)),
            ("state", "held"),
            ("holder", printable(status.worker_id or NONE)),
            ("time left", left),
        ]
    )


def dump_json(value: Any, *, pretty: bool) -> str:
    """Pretty JSON for people, or one compact line (as the text protocol) for scripts."""
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def parse_arg(text: str) -> Any:
    """One argument by the text protocol's rule: a JSON value if it is one, else the string.

    Each shell word is read on its own (by ``textmode.parse_line``, the text
    protocol's own reader), so a quoted ``'two words'`` stays one string.
    """
    parsed = parse_line(f"{_PLACEHOLDER_METHOD} {text}".encode(errors="surrogateescape"))
    tokens = parsed[1] if parsed is not None else []
    return tokens[0] if len(tokens) == 1 else text


def _alone(word: str) -> list[Any]:
    """The tokens the text protocol reads in ``word`` as a line's only argument."""
    parsed = parse_line(f"{_PLACEHOLDER_METHOD} {word}".encode(errors="surrogateescape"))
    return parsed[1] if parsed is not None else []


def text_argument(word: str) -> str:
    """``word`` as one argument of a text line, read back there as ``parse_arg(word)``."""
    tokens = _alone(word)
    if len(tokens) == 1 and not _LINE_BREAKS.intersection(word):
        return word
    return json.dumps(parse_arg(word))


def text_method(method: str) -> str:
    """The method name as the first token of a text line: a string, however it looks."""
    if _alone(method) == [method] and not _LINE_BREAKS.intersection(method):
        return method
    return json.dumps(method)


def text_session(path: str, timeout: float, line: bytes) -> bytes:
    """Send one request line in a text session; all the daemon answers, to its end.

    The write side is shut after the line, as socat does at the end of its
    input: the daemon answers every line (waiting ones included), then closes.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot connect to wksd at {path}: {exc.strerror or exc}"
            ) from exc
        chunks = []
        try:
            sock.sendall(line + b"\n")
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(_READ_CHUNK):
                chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout(f"no answer from wksd within {timeout} s") from None
        except OSError as exc:
            raise ConnectionLost(f"connection to wksd broke: {exc}") from exc
    return b"".join(chunks)


def text_result(method: str, answer: bytes) -> Any:
    """The result in a text session's answer to one request; its error raised.

    Notification lines before it are skipped. As for any text client, a
    result shaped exactly like an error or a notification line reads as one.
    """
    text = answer.decode("utf-8", errors="replace")
    if method.lower() == "metrics" and text and not text.startswith("{"):
        return text  # the Prometheus exposition, several lines
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            raise ProtocolError(
                f"wksd answered a text line that is not JSON: {line[:80]!r}"
            ) from None
        if _shaped(value, {"notification", "params"}):
            continue
        if _shaped(value, {"error"}) and _shaped(value["error"], {"code", "message"}):
            raise error_from_wire(value["error"])
        return value
    raise ConnectionLost("wksd closed the connection before answering")


def _shaped(value: Any, keys: set[str]) -> bool:
    return isinstance(value, dict) and set(value) == keys


# -- the commands ---------------------------------------------------------------
Command = Callable[[Client, argparse.Namespace], int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _show(args: argparse.Namespace, raw: Any, render: Callable[[], str]) -> None:
    print(dump_json(raw, pretty=False) if args.json else render(), flush=True)


def _cmd_health(client: Client, args: argparse.Namespace) -> int:
    raw = client.call("health")
    health = Health.from_wire(raw)
    _show(args, raw, lambda: render_health(health))
    return EXIT_FAILED if health.status == "unhealthy" else EXIT_OK


def _cmd_stats(client: Client, args: argparse.Namespace) -> int:
    raw = client.call("workflow.stats")
    _show(args, raw, lambda: render_stats(WorkflowStats.from_wire(raw)))
    return EXIT_OK


def _workflows_frame(client: Client, args: argparse.Namespace, header: str | None) -> None:
    raw = client.call("workflow.active_detailed")
    states = [WorkflowState.from_wire(state) for state in raw["workflows"]]
    _show(args, raw, lambda: render_workflows_frame(states, _now_ms(), header))


def _cmd_workflows(client: Client, args: argparse.Namespace) -> int:
    if args.watch is None and args.count is None:
        _workflows_frame(client, args, None)
        return EXIT_OK
    interval: float = args.watch or DEFAULT_WATCH_INTERVAL
    header = f"every {interval:g}s"
    tty = sys.stdout.isatty()

    def frame(index: int) -> None:
        sys.stdout.write(frame_prefix(index, as_json=args.json, tty=tty))
        _workflows_frame(client, args, header)

    return _watch(frame, interval, args.count)


def frame_prefix(index: int, *, as_json: bool, tty: bool) -> str:
    """What precedes frame ``index`` of a watch: nothing before a JSON line, a
    redraw on a terminal, else a blank line between frames."""
    if as_json:
        return ""
    if tty:
        return CLEAR_SCREEN
    return "\n" if index else ""


def _watch(frame: Callable[[int], None], interval: float, count: int | None) -> int:
    """Show ``frame(index)`` every ``interval`` seconds, ``count`` times or until Ctrl-C."""
    started = time.monotonic()
    shown = 0
    try:
        while True:
            frame(shown)
            shown += 1
            if count is not None and shown >= count:
                return EXIT_OK
            time.sleep(max(0.0, started + shown * interval - time.monotonic()))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how a watch ends


def _cmd_workflow(client: Client, args: argparse.Namespace) -> int:
    raw = client.call("workflow.get", args.execution_id)
    if raw is None:
        if args.json:
            print(dump_json(None, pretty=False))
        print(f"wksd ctl: no workflow state for {printable(args.execution_id)}", file=sys.stderr)
        return EXIT_FAILED
    _show(args, raw, lambda: render_state(WorkflowState.from_wire(raw), _now_ms()))
    return EXIT_OK


def _cmd_lock(client: Client, args: argparse.Namespace) -> int:
    raw = client.call("lock.status", args.execution_id)
    _show(args, raw, lambda: render_lock(args.execution_id, LockStatus.from_wire(raw)))
    return EXIT_OK


def _cmd_call(client: Client, args: argparse.Namespace) -> int:
    line = " ".join([text_method(args.method), *(text_argument(arg) for arg in args.args)])
    answer = text_session(client.path, args.timeout, line.encode(errors="surrogateescape"))
    raw = text_result(args.method, answer)
    # As in the text protocol, the Prometheus exposition is printed as itself.
    text = args.method == "metrics" and isinstance(raw, str)
    _show(args, raw, lambda: raw.rstrip("\n") if text else dump_json(raw, pretty=True))
    return EXIT_OK


# -- the command line -----------------------------------------------------------
_DESCRIPTION = """\
Inspect and poke a running wksd: health, workflow progress, locks, any method.
Output is for people; add --json for one compact JSON document (per refresh
with --watch) that scripts can read.

exit status: 0 done (health: healthy or degraded), 1 the daemon answered with
an error (CODE: message on stderr) or unhealthy or not found, 2 the daemon
could not be reached, 64 a usage error.
"""

_EPILOG = """\
examples:
  wksd ctl health
  wksd ctl workflows --watch          # refresh every 2 s until Ctrl-C
  wksd ctl workflow exec-123
  wksd ctl lock exec-123
  wksd ctl call session.set u1 '{"role": "admin"}' 60
  wksd ctl --json call session.get u1 | jq .role
"""


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with ``EXIT_USAGE`` on a usage error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _shared_options(suppress: bool) -> _Parser:
    """--socket, --timeout, --json; with ``suppress``, unset ones keep the top level's value."""
    parent = _Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parent.add_argument(
        "--socket",
        metavar="PATH",
        default=default,
        help="the daemon's socket (default: $WKSD_SOCKET, else the daemon's default path)",
    )
    parent.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=argparse.SUPPRESS if suppress else 5.0,
        help="seconds to wait for each answer (default: 5)",
    )
    parent.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the raw result as one compact JSON document",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``wksd ctl`` parser; each sub-command sets ``command`` to its function."""
    parser = _Parser(
        prog="wksd ctl",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_shared_options(suppress=False)],
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    shared = _shared_options(suppress=True)

    def add(
        name: str, command: Command, summary: str, details: str = ""
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary + ("\n\n" + details if details else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[shared],
        )
        sub.set_defaults(command=command)
        return sub

    add(
        "health",
        _cmd_health,
        "status, backend, Redis status and latency, memory keys, uptime, version",
        "exit status 0 when healthy or degraded, 1 when unhealthy, 2 when unreachable",
    )
    add(
        "stats",
        _cmd_stats,
        "workflow statistics: active count, count by status, average progress",
    )
    workflows = add(
        "workflows",
        _cmd_workflows,
        "the active workflows as a table: progress, steps, current step, started, ETA",
        "--json prints the daemon's workflow.active_detailed result (one line per refresh).",
    )
    workflows.add_argument(
        "--watch",
        metavar="SECONDS",
        nargs="?",
        type=_positive_float,
        const=DEFAULT_WATCH_INTERVAL,
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_INTERVAL:g}) until Ctrl-C",
    )
    workflows.add_argument(
        "--count",
        metavar="N",
        type=_positive_int,
        help="stop after N refreshes (implies --watch)",
    )
    workflow = add("workflow", _cmd_workflow, "every field of one workflow execution")
    workflow.add_argument("execution_id", metavar="EXECUTION_ID")
    lock = add("lock", _cmd_lock, "whether an execution's lock is held, by whom, for how long")
    lock.add_argument("execution_id", metavar="EXECUTION_ID")
    call = add(
        "call",
        _cmd_call,
        "call any method and print its result as JSON",
        "The request goes as a text line (as with socat), so each ARG reads as the\n"
        "text protocol reads it: a JSON value where it parses as one, else a bare\n"
        "string. 60 is a number, '{\"a\": 1}' a map, u1 the string u1, and a number\n"
        'where an id is expected is that id (session.get 123 is user "123"). Each\n'
        "shell word is one ARG, spaces and all. Put -- before an ARG that starts\n"
        "with a dash.\n\n"
        "example: wksd ctl call workflow.update exec-123 2 'Processing data'",
    )
    call.add_argument("method", metavar="METHOD", help="e.g. session.get, workflow.cleanup")
    call.add_argument("args", metavar="ARG", nargs="*", help="positional parameters")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``wksd ctl`` with ``argv`` (the words after ``ctl``); the exit status."""
    args = build_parser().parse_args(argv)
    command: Command = args.command
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            try:
                return command(client, args)
            except RemoteError as exc:
                print(f"{exc.code}: {exc.message}", file=sys.stderr)
                return EXIT_FAILED
            except WksError as exc:
                print(_unreachable(exc, client.path), file=sys.stderr)
                return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python's
        # final flush of stdout from complaining about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _unreachable(exc: WksError, path: str) -> str:
    """One line naming the socket: clientlib's message names it only when connecting."""
    message = str(exc)
    if isinstance(exc, DaemonUnavailable) and path in message:
        return f"wksd ctl: {message}"
    return f"wksd ctl: wksd at {path}: {message}"
