"""What durability costs: a write on the durable default against memory only,
and how long a restart takes to replay a large state.

Two measurements, one run:

- **write cost**: ``session.set`` of a small session through ``clientlib.Client``,
  sequentially, on four daemons on the embedded default: memory only
  (``WKSD_STATE_DIR=""``), and durable with ``WKSD_FSYNC`` ``no``, ``everysec``
  (the default) and ``always``; next to a direct redis-py ``SET`` to a private
  redis-server (no persistence) for scale. Rounds are interleaved so a noisy
  neighbour hits every target alike; the figure is the median of the rounds'
  p50s.
- **replay**: a state directory holding ``--keys`` sessions (one million by
  default) is written as a journal (one frame per key, as requests write it),
  then replayed by a fresh memory store, timed; then compacted into a snapshot
  and replayed again. The process's peak memory is reported too.

Run from the repository root::

    python benchmarks/durable.py                 # about a minute on 2 cores
    python benchmarks/durable.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clientlib import Client
from tests.processes import DaemonProcess
from tests.redis_server import RedisServer
from wksd.clock import SystemClock
from wksd.store.durable import DurableLog
from wksd.store.memory import MemoryStore

SESSION = {"userId": "u1", "role": "admin", "name": "Ada Lovelace", "prefs": {"theme": "dark"}}


def time_writes(call, ops: int) -> float:  # type: ignore[no-untyped-def]
    """p50 in µs of ``ops`` calls."""
    samples = []
    for index in range(ops):
        started = time.perf_counter_ns()
        call(index)
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1000


def set_session(client: Client, index: int) -> None:
    client.set_session(f"u{index}", SESSION)


def write_cost(directory: Path, ops: int, rounds: int) -> dict[str, float]:
    targets: dict[str, dict[str, str]] = {
        "memory only": {"WKSD_STATE_DIR": ""},
        "durable, fsync no": {"WKSD_FSYNC": "no"},
        "durable, fsync everysec": {"WKSD_FSYNC": "everysec"},
        "durable, fsync always": {"WKSD_FSYNC": "always"},
    }
    with contextlib.ExitStack() as stack:
        clients = {}
        for index, (name, env) in enumerate(targets.items()):
            path = str(directory / f"d{index}.sock")
            state = str(directory / f"state{index}")
            daemon = DaemonProcess(path, {"WKSD_STATE_DIR": state, **env})
            stack.callback(daemon.close)
            daemon.start()
            clients[name] = stack.enter_context(Client(path))
        redis_dir = directory / "redis"
        server = RedisServer(redis_dir, "--unixsocket", str(redis_dir / "r.sock")).start()
        stack.callback(server.stop)
        direct = redis.Redis(unix_socket_path=str(redis_dir / "r.sock"))
        stack.callback(direct.close)

        body = json.dumps(SESSION, separators=(",", ":"))
        calls = {
            "direct redis-py SET (Unix socket)": lambda i: direct.set(f"wks:session:u{i}", body),
            **{name: functools.partial(set_session, client) for name, client in clients.items()},
        }
        results: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            time_writes(call, ops // 5)  # warm-up
        for _ in range(rounds):
            for name, call in calls.items():
                results[name].append(time_writes(call, ops))
        return {name: statistics.median(p50s) for name, p50s in results.items()}


def replay(directory: Path, keys: int) -> dict[str, float]:
    state = directory / "replay"
    state.mkdir()
    log = DurableLog(state)
    memory = MemoryStore(clock=SystemClock(), max_keys=keys + 10, log=log)
    memory.load(log.open())
    value = b'{"userId":"u1","role":"admin","name":"Ada Lovelace","prefs":{"theme":"dark"}}'
    started = time.perf_counter()

    async def write_all() -> None:
        for index in range(keys):
            await memory.set(f"wks:session:user-{index}", value, 86_400_000)
            log.flush()  # one frame per request, as the daemon writes them

    trio.run(write_all)
    written = time.perf_counter() - started
    log.close()
    journal_bytes = sum(path.stat().st_size for path in state.iterdir() if path.is_file())

    def load() -> tuple[float, MemoryStore, DurableLog]:
        fresh_log = DurableLog(state)
        fresh = MemoryStore(clock=SystemClock(), max_keys=keys + 10, log=fresh_log)
        started = time.perf_counter()
        held = fresh.load(fresh_log.open())
        elapsed = time.perf_counter() - started
        assert held == keys, held
        return elapsed, fresh, fresh_log

    journal_replay, fresh, fresh_log = load()
    fresh_log.set_freeze(fresh.freeze)
    started = time.perf_counter()
    trio.run(fresh_log.compact)
    compact_seconds = time.perf_counter() - started
    fresh_log.close()
    del fresh
    snapshot_bytes = (state / "snapshot").stat().st_size
    snapshot_replay, _, last_log = load()
    last_log.close()
    return {
        "keys": keys,
        "write one frame per key, s": written,
        "journal bytes": journal_bytes,
        "replay of the journal, s": journal_replay,
        "compaction, s": compact_seconds,
        "snapshot bytes": snapshot_bytes,
        "replay of the snapshot, s": snapshot_replay,
        "peak RSS, MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def format_choice(directory: Path, writes: int) -> dict[str, float]:
    """The two formats the issue named, on the same writes, in this process:
    the journal's frame per write against SQLite (WAL) with one upsert and
    commit per write, each at its everysec-like setting (no fsync per write:
    synchronous=NORMAL for SQLite); then a full read back of each."""
    import sqlite3

    value = b'{"userId":"u1","role":"admin","name":"Ada Lovelace","prefs":{"theme":"dark"}}'
    state = directory / "choice-journal"
    state.mkdir()
    log = DurableLog(state)
    memory = MemoryStore(clock=SystemClock(), max_keys=writes + 10, log=log)
    memory.load(log.open())

    async def journal_writes() -> None:
        for index in range(writes):
            await memory.set(f"wks:session:user-{index % 10_000}", value, 86_400_000)
            log.flush()

    started = time.perf_counter()
    trio.run(journal_writes)
    journal_us = (time.perf_counter() - started) / writes * 1e6
    log.close()

    db = sqlite3.connect(directory / "choice.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB, deadline INTEGER)")
    started = time.perf_counter()
    for index in range(writes):
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = excluded.value, deadline = excluded.deadline",
            (f"wks:session:user-{index % 10_000}", value, 86_400_000),
        )
        db.execute("COMMIT")
    sqlite_us = (time.perf_counter() - started) / writes * 1e6
    started = time.perf_counter()
    rows = db.execute("SELECT key, value, deadline FROM kv").fetchall()
    sqlite_read = time.perf_counter() - started
    db.close()
    started = time.perf_counter()
    replayed_store = MemoryStore(clock=SystemClock(), max_keys=writes + 10)
    replayed_store.load(DurableLog(state).open())
    journal_read = time.perf_counter() - started
    assert len(rows) == len(replayed_store) == min(writes, 10_000)
    return {
        "journal, µs per write": journal_us,
        "SQLite WAL, µs per write": sqlite_us,
        f"journal replay of {writes:,} writes, s": journal_read,
        "SQLite read of the rows, s": sqlite_read,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="writes per target per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the replay test")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.ops, args.rounds, args.keys = 300, 2, 20_000
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="wksd-durable-", dir="/tmp") as name:
        directory = Path(name)
        costs = write_cost(directory, args.ops, args.rounds)
        memory_only = costs["memory only"]
        print(f"session.set, sequential p50 (median of {args.rounds} rounds of {args.ops})")
        for target, p50 in costs.items():
            print(f"  {target:36} {p50:8.1f} µs   {p50 / memory_only:5.2f} x memory only")
        print("format, one write per request, 10,000 keys rewritten")
        for name, value in format_choice(directory, args.ops * 10).items():
            print(f"  {name:36} {value:8.2f}")
        figures = replay(directory, args.keys)
        print("replay")
        for name, value in figures.items():
            print(
                f"  {name:36} {value:,.2f}"
                if isinstance(value, float)
                else f"  {name:36} {value:,}"
            )


if __name__ == "__main__":
    main()
