"""The scenarios: set up, load, inject faults, settle, check; and the figures table.

- ``redis``: one daemon on a durable redis-server, three writers. Redis is
  killed and restarted, frozen and resumed; the daemon is restarted with
  SIGTERM and with SIGKILL, also while Redis is down (outage writes then live
  only in the daemon's journal until Redis returns).
- ``embedded``: one daemon on the embedded default (no Redis) with a state
  directory, three writers, the daemon restarted with SIGKILL and SIGTERM.
- ``locks``: two daemons on one durable Redis, locks fail-closed, four
  contender processes (two per daemon) on two locks; Redis killed and
  restarted, frozen and resumed.

After the load the faults stop (each leaves Redis and the daemons up), the
daemons are given ``SETTLE_TIMEOUT`` to serve from Redis again (having
written their journals back), then a fresh client and a plain redis-py
client read every key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from clientlib import Client
from clientlib.errors import WksError

from ..polling import wait_until
from ..processes import ROOT
from ..redis_server import RedisServer
from .checker import FAILURES, MISSING, Reader, check_keys, check_locks, read_log, seq_of
from .faults import GAP, Faults
from .procs import ChaosDaemon, child_env

#: The default total load time of a run, over all scenarios: with start-up
#: and settling, about two minutes of wall time (the CI run).
SHORT_DURATION = 90.0

#: How long the daemons may take, after the last fault, to serve from Redis
#: again: reconnect (backoff capped at 0.5 s) plus writing a journal back.
SETTLE_TIMEOUT = 30.0

#: How long a load process may take to notice its stop file and exit.
LOADER_EXIT_TIMEOUT = 15.0

#: How long the fault thread may take to finish the fault it is in.
FAULT_EXIT_TIMEOUT = 60.0

#: Retries of one read in the check: the daemon is up, but a read that fails
#: once (it is still reconnecting) should not count as an error at once.
READ_ATTEMPTS = 3

KEY_PREFIX = "wks:"
REDIS_KEYS = {"session": "session:", "cache": "cache:api:", "workflow": "workflow:"}
GET_METHODS = {"session": "session.get", "cache": "cache.get", "workflow": "workflow.get"}


@dataclass(frozen=True)
class Scenario:
    name: str
    share: float  # of the total duration
    faults: Sequence[str]
    redis: bool = True
    daemons: int = 1
    writers: int = 0
    contenders: int = 0
    fail_closed: bool = False
    gap: float = GAP  # between two faults


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "redis",
            0.4,
            (
                "redis_kill",
                "daemon_term",
                "redis_freeze",
                "daemon_kill",
                "daemon_kill_in_outage",
                "daemon_term_in_outage",
            ),
            writers=3,
        ),
        Scenario("embedded", 0.25, ("daemon_kill", "daemon_term"), redis=False, writers=3),
        Scenario(
            "locks",
            0.35,
            ("redis_kill", "redis_freeze"),
            daemons=2,
            contenders=4,
            fail_closed=True,
            gap=2 * GAP,  # fail-closed: no lock is granted in an outage; let some calm in
        ),
    )
}


def backend(daemon: ChaosDaemon) -> str | None:
    try:
        with Client(daemon.path, timeout=2) as c:
            return c.health().backend
    except WksError:
        return None


def wait_for_redis(daemons: Sequence[ChaosDaemon], timeout: float) -> bool:
    """Whether every daemon serves from Redis (journal written back) within ``timeout``."""
    try:
        wait_until(lambda: all(backend(d) == "redis" for d in daemons), timeout, "redis serving")
    except TimeoutError:
        return False
    return True


def wksd_reader(client: Client) -> Reader:
    def read(kind: str, key: str) -> int | str | None:
        for _ in range(READ_ATTEMPTS):
            try:
                return seq_of(kind, client.call(GET_METHODS[kind], key))
            except WksError:
                time.sleep(0.2)
        return None

    return read


def redis_reader(client: redis.Redis) -> Reader:
    def read(kind: str, key: str) -> int | str | None:
        raw = client.get(f"{KEY_PREFIX}{REDIS_KEYS[kind]}{key}")
        return MISSING if raw is None else seq_of(kind, json.loads(raw))

    return read


def spawn(
    role: str, ident: int, daemon: ChaosDaemon, directory: Path, deadline: float
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one load process (``clients.py``) on ``daemon``; it and its log."""
    log = directory / f"{role}-{ident}.jsonl"
    command = [sys.executable, "-m", "tests.chaos.clients", role, "--socket", daemon.path]
    command += ["--log", str(log), "--stop", str(directory / "stop"), "--deadline", str(deadline)]
    command += ["--id", str(ident), "--seed", str(ident)]
    return subprocess.Popen(command, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL), log


def run_scenario(
    scenario: Scenario, duration: float, workdir: Path, fsync: str, durable: bool = True
) -> dict[str, Any]:
    """One scenario, from nothing to its figures; every process it started is gone after."""
    directory = workdir / scenario.name
    # A fresh start every run: an old stop file would end the load at once,
    # and old logs and state would be checked again instead of this run's.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    figures: dict[str, Any] = {"scenario": scenario.name, "duration": round(duration, 1)}
    redis_server: RedisServer | None = None
    daemons: list[ChaosDaemon] = []
    loaders: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    faults: Faults | None = None
    thread: threading.Thread | None = None
    began = time.monotonic()
    try:
        if scenario.redis:
            redis_server = RedisServer(directory / "redis", aof=True).start()
        url = redis_server.url if redis_server is not None else None
        for i in range(scenario.daemons):
            daemons.append(
                ChaosDaemon(
                    f"wksd-{i}",
                    directory / f"wksd-{i}",
                    url,
                    fail_closed=scenario.fail_closed,
                    fsync=fsync,
                    durable=durable,
                )
            )
            daemons[-1].start()
        if redis_server is not None and not wait_for_redis(daemons, SETTLE_TIMEOUT):
            raise RuntimeError("the daemons never served from Redis at start")
        deadline = time.time() + duration + FAULT_EXIT_TIMEOUT + LOADER_EXIT_TIMEOUT
        for i in range(scenario.writers):
            process, log = spawn("writer", i, daemons[i % len(daemons)], directory, deadline)
            loaders.append(process)
            logs.append(log)
        for i in range(scenario.contenders):
            process, log = spawn("contender", i, daemons[i % len(daemons)], directory, deadline)
            loaders.append(process)
            logs.append(log)
        faults = Faults(redis_server, daemons, gap=scenario.gap)
        thread = threading.Thread(target=faults.run, args=(scenario.faults,), daemon=True)
        thread.start()
        time.sleep(duration)
        faults.stop.set()
        thread.join(FAULT_EXIT_TIMEOUT)
        (directory / "stop").touch()
        for process in loaders:
            try:
                process.wait(LOADER_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                figures.setdefault("harness_errors", []).append(
                    f"load process {process.pid} did not stop"
                )
        faults.restore()
        figures["settled"] = (
            None if redis_server is None else wait_for_redis(daemons, SETTLE_TIMEOUT)
        )
        figures["faults"] = dict(faults.counts)
        figures["fault_errors"] = faults.errors
        figures["fault_log"] = faults.events
        records = read_log(logs)
        if scenario.writers:
            with contextlib.ExitStack() as stack:
                client = stack.enter_context(Client(daemons[0].path, timeout=10))
                views = {"wksd": wksd_reader(client)}
                if redis_server is not None:
                    views["redis"] = redis_reader(stack.enter_context(redis_server.client()))
                figures["keys"] = check_keys(records, views, faults.events)
        if scenario.contenders:
            figures["locks"] = check_locks(records)
            figures["locks"]["fail_closed"] = scenario.fail_closed
    except Exception as exc:
        figures.setdefault("harness_errors", []).append(f"{type(exc).__name__}: {exc}")
    finally:
        if faults is not None:
            faults.stop.set()
        (directory / "stop").touch()
        for process in loaders:
            if process.poll() is None:
                process.kill()
            process.wait()
        for daemon in daemons:
            daemon.close()
        if redis_server is not None:
            redis_server.stop()
        if thread is not None:
            thread.join(FAULT_EXIT_TIMEOUT)
    if figures.get("harness_errors") or figures.get("fault_errors"):
        figures["daemon_logs"] = {d.name: d.log_tail() for d in daemons}
    figures["wall_time"] = round(time.monotonic() - began, 1)
    return figures


def run_suite(
    workdir: Path,
    duration: float = SHORT_DURATION,
    names: Sequence[str] = tuple(SCENARIOS),
    fsync: str = "everysec",
    durable: bool = True,
    fail_open: bool = False,
) -> dict[str, Any]:
    """Run the named scenarios, sharing ``duration`` by their shares; all figures.

    ``durable`` False and ``fail_open`` are negative controls: memory-only
    daemons must show losses, fail-open locks overlaps in an outage.
    """
    chosen = [SCENARIOS[n] for n in names]
    if fail_open:
        chosen = [dataclasses.replace(s, fail_closed=False) for s in chosen]
    total_share = sum(s.share for s in chosen)
    results = {
        s.name: run_scenario(s, duration * s.share / total_share, workdir, fsync, durable)
        for s in chosen
    }
    return {
        "duration": duration,
        "fsync": fsync,
        "durable": durable,
        "fail_open": fail_open,
        "scenarios": results,
    }


def violations(figures: dict[str, Any]) -> list[str]:
    """Every broken promise in one scenario's figures, as sentences; empty if it held."""
    found: list[str] = []
    name = figures["scenario"]
    for error in figures.get("harness_errors", []):
        found.append(f"{name}: the run broke: {error}")
    for error in figures.get("fault_errors", []):
        found.append(f"{name}: a fault failed: {error.splitlines()[-1]}")
    if figures.get("settled") is False:
        found.append(f"{name}: the daemons did not serve from Redis within {SETTLE_TIMEOUT} s")
    keys = figures.get("keys")
    if keys is not None:
        if keys["acknowledged_writes"] == 0:
            found.append(f"{name}: no write was acknowledged at all")
        for view, judged in keys["views"].items():
            for failure in FAILURES:
                if judged[failure]:
                    found.append(f"{name}: {judged[failure]} {failure} in {view}")
            if judged["read_errors"]:
                found.append(f"{name}: {judged['read_errors']} keys unreadable in {view}")
    locks = figures.get("locks")
    if locks is not None:
        if locks["holdings"] == 0:
            found.append(f"{name}: no lock was ever held")
        # Fail-open locks are local to a host in an outage: overlaps are expected there.
        checked = ("overlaps", "missing_tokens") if locks["fail_closed"] else ()
        for figure in (*checked, "token_order_violations"):
            if locks[figure]:
                found.append(f"{name}: {locks[figure]} {figure.replace('_', ' ')}")
    return found


def _both(keys: dict[str, Any] | None, figure: str) -> str:
    if keys is None:
        return "-"
    return " / ".join(str(v[figure]) for v in keys["views"].values())


def table(suite: dict[str, Any]) -> str:
    """The figures, one column per scenario, then the errors by type and the blame."""
    runs = list(suite["scenarios"].values())
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Any) -> None:
        rows.append((label, [cell(r) for r in runs]))

    def k(figure: str) -> Any:
        return lambda r: "-" if "keys" not in r else str(r["keys"][figure])

    def lk(figure: str) -> Any:
        return lambda r: "-" if "locks" not in r else str(r["locks"][figure])

    row("load seconds", lambda r: str(r["duration"]))
    row("faults injected", lambda r: str(sum(r.get("faults", {}).values())))
    row("acknowledged writes", k("acknowledged_writes"))
    row("acknowledged deletes", k("acknowledged_deletes"))
    row("keys checked", k("keys_checked"))
    views = lambda r: "-" if "keys" not in r else " / ".join(r["keys"]["views"])  # noqa: E731
    row("  views (wksd / redis)", views)
    for figure, label in (
        ("lost", "lost"),
        ("stale", "stale (older value)"),
        ("undone_deletes", "undone deletes"),
        ("unexplained", "unexplained value"),
        ("in_doubt", "in doubt, allowed"),
        ("read_errors", "read errors"),
    ):
        row(label, lambda r, f=figure: _both(r.get("keys"), f))
    row(
        "client errors",
        lambda r: "-" if "keys" not in r else str(sum(r["keys"]["client_errors"].values())),
    )
    row("lock holdings", lk("holdings"))
    row("overlaps", lk("overlaps"))
    row("token order violations", lk("token_order_violations"))
    row("missing tokens", lk("missing_tokens"))
    row(
        "lock acquire errors",
        lambda r: "-" if "locks" not in r else str(sum(r["locks"]["acquire_errors"].values())),
    )
    row("settled on Redis", lambda r: {True: "yes", False: "NO"}.get(r.get("settled"), "-"))
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(16, len(r["scenario"]) + 2) for r in runs]
    state = "" if suite.get("durable", True) else ", WKSD_STATE_DIR empty (memory only)"
    if suite.get("fail_open"):
        state += ", locks fail-open (overlaps not judged)"
    lines = [f"chaos figures: {suite['duration']:g} s of load, WKSD_FSYNC={suite['fsync']}{state}"]
    lines.append(
        "".ljust(width) + "".join(r["scenario"].ljust(c) for r, c in zip(runs, cols, strict=True))
    )
    for label, cells in rows:
        lines.append(
            label.ljust(width) + "".join(v.ljust(c) for v, c in zip(cells, cols, strict=True))
        )
    for r in runs:
        name = r["scenario"]
        if "keys" in r and r["keys"]["client_errors"]:
            lines.append(f"{name}: client errors by type: {_counts(r['keys']['client_errors'])}")
        if "locks" in r and r["locks"]["acquire_errors"]:
            lines.append(
                f"{name}: lock acquire errors by type: {_counts(r['locks']['acquire_errors'])}"
            )
        for view, judged in r.get("keys", {}).get("views", {}).items():
            for failure, by in judged["by_fault"].items():
                lines.append(
                    f"{name}: {failure} in {view}, by first fault after the ack: {_counts(by)}"
                )
        if r.get("faults"):
            lines.append(f"{name}: faults: {_counts(r['faults'])}")
    broken = [v for r in runs for v in violations(r)]
    lines.append("verdict: " + ("the promise held" if not broken else "BROKEN"))
    lines += [f"  - {v}" for v in broken]
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
