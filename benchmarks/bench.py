"""The work a worker does, through wksd and through redis-py directly: one run.

Every figure is a ratio against what a worker would otherwise write itself:
redis-py (with hiredis) over TCP loopback to a redis-server, as a remote Redis
is reached. That peer Redis is one of its own, which no daemon tracks: the
world without wksd. On the daemons' Redis every write to a tracked prefix
sends each daemon an invalidation, whose handling competes with the writer
for its CPU (it made a redis-py ``SET`` there cost 247 µs instead of about
110 µs), so redis-py measured there would flatter wksd. (Each round redis-py
also writes every hot session on the daemons' Redis, untimed, and the daemons
must follow.) One run measures, interleaved over rounds (each round runs
every case once, in a shuffled order, so drift on a small VM hits them alike):

- **session read**: ``get_session`` of wksd on memory, and in Redis mode with
  its near cache, against redis-py ``GET`` + ``json.loads``; where the Redis
  is 7.4 or newer also redis-py's own client-side cache
  (``protocol=3, cache_config=CacheConfig()``);
- **session write**: ``set_session`` in Redis mode against ``json.dumps`` +
  ``SET PX``;
- **workflow.update** in Redis mode against the seed's read-modify-write by
  hand (``GET``, ``json.loads``, set progress, currentStep, updatedAt,
  ``json.dumps``, ``SET EX``), each on workflows of its own, as a worker
  drives its run (``WORKFLOW_PREFIXES``);
- **8 processes** reading, then writing, at once, Redis mode: aggregate
  throughput against 8 redis-py processes;
- **another daemon sees a write**: a second daemon on the same Redis has read
  a key (so its near cache holds it); daemon A acknowledges a ``session.set``
  of it; B is polled until it returns the new value. The figure is the time
  from A's acknowledgement to the return of B's first read of the new value;
  B's reads that return the previous value in between are counted as stale;
- **a write on the durable default** (``WKSD_STATE_DIR`` set, memory mode)
  against the same daemon memory only.

Hot keys cycle over ``HOT_KEYS`` keys, and every value read is checked
against the last one written to that key, by whoever wrote it: a stale read
where none is allowed (a daemon's own writes, a plain read of Redis, a near
cache after Redis's invalidation of a plain redis-py write has been seen)
stops the run with an error, as does a daemon that does not come up.

Placement: ``pinned`` models a remote Redis: this process, its workers and
the daemons on one CPU, redis-server on the other, so every Redis round trip
crosses cores. Daemon B, which stands for another host's daemon, runs beside
redis-server: every write under a tracked prefix sends it an invalidation
(BCAST tracking), and on the writer's CPU its handling of them made the
daemon's writes take 1.7 times as long (340 µs, not 194 µs) as one host's
do. ``unpinned`` leaves it all to the scheduler. ``--placement both`` (the
default) runs both in every round.

Everything runs on private processes (tests/redis_server.py,
tests/processes.py): two redis-servers (the daemons' and the peer) on free
ports in a temporary directory, never the machine's Redis on 6379, and four
daemons; all are
stopped when the run ends, Ctrl-C included. Run from the repository root::

    python benchmarks/bench.py                          # about two minutes on 2 cores
    python benchmarks/bench.py --quick                  # a smoke run of seconds
    python benchmarks/bench.py --json out.json --plot docs/bench.png
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Final, Literal

import redis
from redis.utils import HIREDIS_AVAILABLE

# The tests' helpers start the private processes: run from anywhere, the
# repository root is where ``tests`` imports from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clientlib import Client
from tests.processes import DaemonProcess
from tests.redis_server import RedisServer

# -- what is measured ------------------------------------------------------

#: Hot keys each case cycles over (the issue's second benchmark used 256):
#: more than one, so a read is not always of the key just written.
HOT_KEYS = 256

#: Where the seed keeps them (DESIGN section 4), with the default prefix.
SESSION_PREFIX = "wks:session:"
WORKFLOW_PREFIX = "wks:workflow:"

#: A session's TTL, as the seed sets it, in seconds and in milliseconds.
SESSION_TTL = 86_400
SESSION_TTL_MS = SESSION_TTL * 1000

#: The seed's TTL for a running workflow state (``SET EX``), in seconds.
SEED_WORKFLOW_TTL = 3600

#: Steps of each benchmark workflow; an update moves one step on, wrapping.
TOTAL_STEPS = 100

#: Client processes at once: more than the cores of a small host, as a
#: host's worker processes usually are.
PROCESSES = 8

#: The near cache the Redis-mode daemons get (WKSD_NEAR_CACHE_BYTES): far
#: more than the few hundred small values the run touches.
NEAR_CACHE_BYTES = 64 * 1024 * 1024

#: Operations per case per round (sequential: this process; parallel: each
#: of the PROCESSES), samples of "another daemon sees a write" per round, and
#: rounds. The full run (both placements) stays under about two minutes on a
#: 2-core machine; ``--quick`` is a smoke run.
ROUNDS = 5
SEQUENTIAL_OPS = 3000
PARALLEL_OPS = 1500
VISIBILITY_SAMPLES = 300
QUICK_ROUNDS = 2
QUICK_SEQUENTIAL_OPS = 200
QUICK_PARALLEL_OPS = 100
QUICK_VISIBILITY_SAMPLES = 30

#: Unmeasured (but checked) operations before each case's measurement in a
#: round: the placement may just have changed, caches are cold.
WARMUP_OPS = 50

#: How long a stale value may be read after a plain redis-py write before the
#: near cache counts as broken (Redis's invalidation never arrived), and how
#: long daemon B may take to see daemon A's write.
COHERENCE_TIMEOUT = 2.0

#: The seed of the case order, so two runs shuffle alike.
ORDER_SEED = 11

#: How long a parallel job may take in all (8 workers on 2 busy cores) before
#: the run is called stuck, how long the workers may take to start, and how
#: often the wait for them looks for one that died.
JOB_TIMEOUT = 120.0
BARRIER_TIMEOUT = 60.0
WORKER_CHECK_INTERVAL = 0.1

#: How long a worker may take to exit once told to.
STOP_TIMEOUT = 10.0

#: The redis-server version from which redis-py's client-side cache works.
CLIENT_SIDE_CACHE_SINCE = (7, 4)

NANOSECONDS_PER_SECOND = 1_000_000_000

#: The issue's goals: each figure's name, the comparison and the bound
#: (ratios against direct redis-py; the visibility p99 in microseconds).
GOALS: dict[str, tuple[Literal["<=", ">="], float]] = {
    "session read, memory": ("<=", 0.3),
    "session read, Redis mode (near cache)": ("<=", 0.4),
    "session write, Redis mode": ("<=", 1.3),
    "workflow.update, Redis mode, against GET+SET": ("<=", 1.0),
    f"{PROCESSES} processes reading, Redis mode": (">=", 1.2),
    f"{PROCESSES} processes writing, Redis mode": (">=", 0.8),
    "another daemon sees a write, p99": ("<=", 2000.0),
    "write on the durable default against memory only": ("<=", 1.25),
}


class StaleRead(AssertionError):
    """A value read was not the last one written where nothing else is allowed."""


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def session_value(user_id: str, version: int | str) -> dict[str, Any]:
    """A small session (about 100 bytes of JSON) that names its own version."""
    return {
        "userId": user_id,
        "role": "admin",
        "name": "Ada Lovelace",
        "prefs": {"theme": "dark"},
        "version": version,
    }


def js_round(number: float) -> int:
    """JavaScript's ``Math.round``, as the seed computes progress."""
    return math.floor(number + 0.5)


def hot_ids(prefix: str) -> list[str]:
    return [f"{prefix}{number}" for number in range(HOT_KEYS)]


#: Each updater drives workflows of its own, as a worker drives its runs: the
#: daemon's updates and the redis-py ones never write the same state.
WORKFLOW_PREFIXES: Final = {"daemon A": "wf-", "redis-py": "wf-direct-"}


# -- the clients a worker would use ----------------------------------------


class DirectSessions:
    """Sessions and workflow states read and written with redis-py, as a worker would."""

    def __init__(self, address: str, **options: Any) -> None:
        host, port = address.rsplit(":", 1)
        self.redis = redis.Redis(host=host, port=int(port), **options)

    def read(self, user_id: str) -> Any:
        raw = self.redis.get(SESSION_PREFIX + user_id)
        return None if raw is None else json.loads(raw)  # type: ignore[arg-type]

    def write(self, user_id: str, value: dict[str, Any]) -> None:
        self.redis.set(SESSION_PREFIX + user_id, compact_json(value), px=SESSION_TTL_MS)

    def update(self, execution_id: str, completed: int) -> int:
        """The seed's ``updateWorkflowProgress`` by hand; the completedSteps it read."""
        key = WORKFLOW_PREFIX + execution_id
        state = json.loads(self.redis.get(key))  # type: ignore[arg-type]
        seen = int(state["completedSteps"])
        state["completedSteps"] = completed
        state["progress"] = js_round(completed / state["totalSteps"] * 100)
        state["currentStep"] = f"step {completed}"
        state["updatedAt"] = int(time.time() * 1000)
        self.redis.set(key, compact_json(state), ex=SEED_WORKFLOW_TTL)
        return seen

    def close(self) -> None:
        self.redis.close()


class WksdSessions:
    """The same through a daemon, with clientlib's sync client."""

    def __init__(self, path: str) -> None:
        self.client = Client(path)
        # Bound once: the loop then calls what a worker's code would.
        self.read = self.client.get_session
        self._set = self.client.set_session
        self._update = self.client.update_workflow_progress

    def write(self, user_id: str, value: dict[str, Any]) -> None:
        self._set(user_id, value, SESSION_TTL)

    def update(self, execution_id: str, completed: int) -> int:
        """``workflow.update``; the completedSteps of the state it answered."""
        state = self._update(execution_id, completed, f"step {completed}")
        if state.status != "running":
            raise StaleRead(f"workflow.update of {execution_id} answered {state.status}")
        return state.completed_steps

    def close(self) -> None:
        self.client.close()


Sessions = DirectSessions | WksdSessions

TargetKind = Literal["redis", "wksd"]


@dataclass(frozen=True)
class Target:
    """Where a worker process connects: picklable, so each opens its own client."""

    kind: TargetKind
    address: str  # "host:port" for Redis, a socket path for wksd

    def open(self) -> Sessions:
        return DirectSessions(self.address) if self.kind == "redis" else WksdSessions(self.address)


class Keyspace:
    """The last value written to each key of one store, by whoever wrote it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[str, Any] = {}
        self.version = 0

    def next_session(self, user_id: str) -> dict[str, Any]:
        self.version += 1
        return session_value(user_id, self.version)

    def check(self, reader: str, key: str, got: Any) -> None:
        if got != self.values[key]:
            raise StaleRead(
                f"{reader} read {key!r} of {self.name} as {got!r}; "
                f"the last value written is {self.values[key]!r}"
            )


# -- timing ----------------------------------------------------------------

clock = time.perf_counter_ns


def window_clock() -> int:
    """CLOCK_MONOTONIC, which every process of the host shares (perf_counter's
    origin is undefined, so worker processes' times would not compare)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def timed_reads(
    read: Callable[[str], Any],
    reader: str,
    keyspace: Keyspace,
    keys: Sequence[str],
    count: int,
    start: int,
) -> list[int]:
    """``count`` reads cycling over ``keys``, each checked; their latencies (ns)."""
    latencies = [0] * count
    values = keyspace.values
    for index in range(count):
        key = keys[(start + index) % len(keys)]
        started = clock()
        got = read(key)
        latencies[index] = clock() - started
        if got != values[key]:
            keyspace.check(reader, key, got)
    return latencies


def timed_writes(
    write: Callable[[str, dict[str, Any]], None],
    keyspace: Keyspace,
    keys: Sequence[str],
    count: int,
    start: int,
) -> list[int]:
    """``count`` session writes of new versions, cycling over ``keys``; latencies (ns)."""
    latencies = [0] * count
    for index in range(count):
        key = keys[(start + index) % len(keys)]
        value = keyspace.next_session(key)
        started = clock()
        write(key, value)
        latencies[index] = clock() - started
        keyspace.values[key] = value
    return latencies


def timed_updates(
    update: Callable[[str, int], int],
    updater: str,
    keyspace: Keyspace,
    keys: Sequence[str],
    count: int,
    start: int,
) -> list[int]:
    """``count`` workflow updates, each one step on; latencies (ns).

    The direct update's ``GET`` must see the last completedSteps anyone
    wrote; the daemon's answer must be the state it wrote.
    """
    latencies = [0] * count
    for index in range(count):
        key = keys[(start + index) % len(keys)]
        previous = keyspace.values[key]
        completed = (previous + 1) % (TOTAL_STEPS + 1)
        started = clock()
        got = update(key, completed)
        latencies[index] = clock() - started
        expected = previous if updater == "redis-py" else completed
        if got != expected:
            raise StaleRead(
                f"{updater} update of {key!r} saw completedSteps {got}, expected {expected}"
            )
        keyspace.values[key] = completed
    return latencies


# -- statistics ------------------------------------------------------------


def percentile(ordered: Sequence[int], percent: float) -> int:
    """The nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(len(ordered) * percent / 100))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Stats:
    """Latency percentiles (µs) of one case over every round, and its throughput."""

    ops: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    ops_per_second: float
    round_p50_us: list[float]


@dataclass
class Samples:
    """What one case measured in one placement, pooled over the rounds."""

    latencies: list[int] = field(default_factory=list)
    window_ns: int = 0  # the time the operations took together
    round_p50_ns: list[int] = field(default_factory=list)

    def add(self, latencies: Sequence[int], window_ns: int) -> None:
        self.latencies.extend(latencies)
        self.window_ns += window_ns
        self.round_p50_ns.append(percentile(sorted(latencies), 50))

    def stats(self) -> Stats:
        ordered = sorted(self.latencies)
        return Stats(
            ops=len(ordered),
            p50_us=percentile(ordered, 50) / 1000,
            p90_us=percentile(ordered, 90) / 1000,
            p99_us=percentile(ordered, 99) / 1000,
            mean_us=sum(ordered) / len(ordered) / 1000,
            ops_per_second=len(ordered) * NANOSECONDS_PER_SECOND / self.window_ns,
            round_p50_us=[p50 / 1000 for p50 in self.round_p50_ns],
        )


@dataclass
class Visibility:
    """Daemon A's acknowledged write to daemon B's first read of it."""

    latencies: list[int] = field(default_factory=list)  # ns, one per sample
    stale_reads: int = 0  # B's reads of the previous value after A's ack
    stale_samples: int = 0  # samples with at least one
    longest_stale_ns: int = 0  # ack to the end of the last stale read

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "samples": len(ordered),
            "p50_us": percentile(ordered, 50) / 1000,
            "p99_us": percentile(ordered, 99) / 1000,
            "max_us": ordered[-1] / 1000,
            "stale_reads": self.stale_reads,
            "stale_samples": self.stale_samples,
            "longest_stale_us": self.longest_stale_ns / 1000,
        }


# -- placement -------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the client side (this process, its workers, the daemons) and
    redis-server may run on. Daemon B stands for another host's daemon: it
    runs beside redis-server, off the host measured."""

    name: str
    clients: tuple[int, ...]
    redis: tuple[int, ...]

    def describe(self) -> str:
        if self.name == "unpinned":
            return f"unpinned (every process may run on CPUs {list(self.clients)})"
        return (
            f"pinned (this process, its {PROCESSES} workers and the daemons on CPU "
            f"{self.clients[0]}, redis-server and daemon B, another host's, on CPU "
            f"{self.redis[0]}: a remote Redis)"
        )


def placements(choice: str) -> tuple[list[Placement], str | None]:
    """The placements to run, and a note when pinning is impossible here."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    unpinned = Placement("unpinned", cpus, cpus)
    if len(cpus) < 2:
        if choice == "pinned":
            sys.exit(f"--placement pinned needs 2 CPUs; this process may use {list(cpus)}")
        return [unpinned], f"pinned placement skipped: only CPU {list(cpus)} available"
    pinned = Placement("pinned", (cpus[0],), (cpus[1],))
    chosen = {"pinned": [pinned], "unpinned": [unpinned], "both": [pinned, unpinned]}
    return chosen[choice], None


def pin_process(pid: int, cpus: Sequence[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


# -- parallel workers --------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One worker's part of a parallel case."""

    kind: Literal["read", "write"]
    target: Target
    count: int
    cpus: tuple[int, ...]
    tag: str  # names this job in the values it writes
    expected: dict[str, Any] | None = None  # read: the hot sessions' values


@dataclass(frozen=True)
class WorkerResult:
    started_ns: int
    finished_ns: int
    latencies: array[int]
    written: dict[str, Any]  # write: each key's last value


def run_job(job: Job, number: int, barrier: Barrier, clients: dict[Target, Sessions]) -> Any:
    os.sched_setaffinity(0, job.cpus)
    sessions = clients.get(job.target)
    if sessions is None:
        sessions = clients[job.target] = job.target.open()
    if job.kind == "read":
        assert job.expected is not None
        keys = hot_ids("hot-")
        keyspace = Keyspace("the hot sessions")
        keyspace.values = job.expected
        offset = number * (HOT_KEYS // PROCESSES)
        timed_reads(sessions.read, f"worker {number}", keyspace, keys, WARMUP_OPS, offset)
        barrier.wait(BARRIER_TIMEOUT)
        started = window_clock()
        latencies = timed_reads(sessions.read, f"worker {number}", keyspace, keys, job.count, 0)
        finished = window_clock()
        return WorkerResult(started, finished, array("q", latencies), {})
    keys = hot_ids(f"w{number}-")
    keyspace = Keyspace(f"worker {number}'s sessions")
    keyspace.version = 0
    write = sessions.write
    timed_writes(write, keyspace, keys, WARMUP_OPS, 0)
    barrier.wait(BARRIER_TIMEOUT)
    started = window_clock()
    latencies = timed_writes(write, keyspace, keys, job.count, 0)
    finished = window_clock()
    for key in keys:  # the job's tag, so a value left by an earlier job cannot pass
        keyspace.values[key] = session_value(key, job.tag)
        write(key, keyspace.values[key])
    return WorkerResult(started, finished, array("q", latencies), keyspace.values)


def pool_worker(connection: Connection, number: int, barrier: Barrier) -> None:
    """A parallel worker: runs the jobs it is sent until it is sent None."""
    clients: dict[Target, Sessions] = {}
    try:
        while (job := connection.recv()) is not None:
            try:
                result = run_job(job, number, barrier, clients)
            except BaseException:
                barrier.abort()  # the others stop waiting for a worker that will not come
                connection.send(("error", traceback.format_exc()))
                return
            connection.send(("ok", result))
    finally:
        for sessions in clients.values():
            sessions.close()


class Pool:
    """PROCESSES worker processes, started once, released together by a barrier."""

    def __init__(self, context: ForkServerContext) -> None:
        self.barrier = context.Barrier(PROCESSES)
        self.connections: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for number in range(PROCESSES):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=pool_worker,
                args=(theirs, number, self.barrier),
                name=f"bench-worker-{number}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def run(self, jobs: Sequence[Job]) -> list[WorkerResult]:
        for connection, job in zip(self.connections, jobs, strict=True):
            connection.send(job)
        results: list[WorkerResult] = []
        deadline = time.monotonic() + JOB_TIMEOUT
        for connection, process in zip(self.connections, self.processes, strict=True):
            while not connection.poll(WORKER_CHECK_INTERVAL):
                if not process.is_alive():
                    raise RuntimeError(f"{process.name} exited with {process.exitcode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"parallel workers did not finish in {JOB_TIMEOUT} s")
            status, result = connection.recv()
            if status == "error":
                raise RuntimeError(f"{process.name} failed:\n{result}")
            results.append(result)
        return results

    def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self.processes:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT)


# -- the private redis-server and daemons ----------------------------------


@dataclass
class Setup:
    """What the run started, and a client of each kind in this process."""

    redis_server: RedisServer
    redis_version: tuple[int, ...]
    daemons: dict[str, DaemonProcess]
    direct: DirectSessions
    peer_server: RedisServer  # the world without wksd: a Redis no daemon tracks
    peer: DirectSessions
    cached: DirectSessions | None  # redis-py's client-side cache, where Redis has it
    cached_skipped: str | None  # why not
    wksd: dict[str, WksdSessions]
    pool: Pool
    sessions: Keyspace = field(default_factory=lambda: Keyspace("Redis's sessions"))
    peer_sessions: Keyspace = field(default_factory=lambda: Keyspace("the peer Redis's sessions"))
    memory: Keyspace = field(default_factory=lambda: Keyspace("the memory daemon's sessions"))
    durable: Keyspace = field(default_factory=lambda: Keyspace("the durable daemon's sessions"))
    workflows: Keyspace = field(default_factory=lambda: Keyspace("Redis's workflows"))
    visible: Keyspace = field(default_factory=lambda: Keyspace("the visibility sessions"))


def start_daemon(
    name: str, directory: Path, env: dict[str, str], stack: contextlib.ExitStack
) -> DaemonProcess:
    """A ``python -m wksd`` child, logging beside its socket, in a session of its
    own (a Ctrl-C reaches this process only, which stops the daemons in order)."""
    socket_path = str(directory / f"{name}.sock")
    daemon = DaemonProcess(
        socket_path,
        {"WKSD_STATE_DIR": "", **env},
        log_path=directory / f"{name}.log",
        new_session=True,
    )
    stack.callback(daemon.close)
    return daemon.start()


def redis_version(server: RedisServer) -> tuple[int, ...]:
    with server.client() as probe:
        info = probe.info("server")
    return tuple(int(part) for part in str(info["redis_version"]).split(".")[:3])


def client_side_cache(
    address: str, version: tuple[int, ...]
) -> tuple[DirectSessions | None, str | None]:
    """redis-py's own client-side cache, or why it is not measured."""
    if version < CLIENT_SIDE_CACHE_SINCE:
        since = ".".join(map(str, CLIENT_SIDE_CACHE_SINCE))
        return None, (
            f"redis-py client-side cache skipped: redis-server is "
            f"{'.'.join(map(str, version))}, and redis-py caches only with {since} or newer"
        )
    from redis.cache import CacheConfig

    return DirectSessions(address, protocol=3, cache_config=CacheConfig()), None


def set_up(stack: contextlib.ExitStack, context: ForkServerContext) -> Setup:
    """Start redis-server, four daemons and the workers; store every hot key."""
    # Short, under /tmp: a Unix socket's path must stay under 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="wksd-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    server = RedisServer(directory / "redis").start()
    stack.callback(server.stop)
    peer_server = RedisServer(directory / "peer").start()
    stack.callback(peer_server.stop)
    on_redis = {
        "REDIS_ENABLED": "1",
        "REDIS_URL": server.url,
        "WKSD_NEAR_CACHE_BYTES": str(NEAR_CACHE_BYTES),
    }
    daemons = {
        "memory": start_daemon("memory", directory, {"REDIS_ENABLED": "0"}, stack),
        "durable": start_daemon(
            "durable",
            directory,
            {"REDIS_ENABLED": "0", "WKSD_STATE_DIR": str(directory / "state")},
            stack,
        ),
        "a": start_daemon("a", directory, on_redis, stack),
        "b": start_daemon("b", directory, on_redis, stack),
    }
    daemons["memory"].wait_for_backend("memory")
    daemons["durable"].wait_for_backend("memory")
    daemons["a"].wait_for_backend("redis")
    daemons["b"].wait_for_backend("redis")

    version = redis_version(server)
    address = f"127.0.0.1:{server.port}"
    direct = DirectSessions(address)
    stack.callback(direct.close)
    peer = DirectSessions(f"127.0.0.1:{peer_server.port}")
    stack.callback(peer.close)
    cached, skipped = client_side_cache(address, version)
    if cached is not None:
        stack.callback(cached.close)
    wksd = {name: WksdSessions(daemon.path) for name, daemon in daemons.items()}
    for sessions in wksd.values():
        stack.callback(sessions.close)
    pool = Pool(context)
    stack.callback(pool.close)
    setup = Setup(server, version, daemons, direct, peer_server, peer, cached, skipped, wksd, pool)
    seed(setup)
    return setup


def seed(setup: Setup) -> None:
    """Every hot key written once, and read once by every reader (checked)."""
    for key in hot_ids("hot-"):
        for keyspace, sessions in (
            (setup.sessions, setup.wksd["a"]),
            (setup.memory, setup.wksd["memory"]),
            (setup.durable, setup.wksd["durable"]),
            (setup.peer_sessions, setup.peer),
        ):
            value = keyspace.next_session(key)
            sessions.write(key, value)
            keyspace.values[key] = value
    for key in hot_ids("vis-"):
        value = setup.visible.next_session(key)
        setup.wksd["a"].write(key, value)
        setup.visible.values[key] = value
        setup.visible.check("daemon B", key, setup.wksd["b"].read(key))
    for key in hot_ids(WORKFLOW_PREFIXES["daemon A"]):
        setup.wksd["a"].client.start_workflow_tracking(key, "bench", TOTAL_STEPS)
        setup.workflows.values[key] = 0
    now = int(time.time() * 1000)
    for key in hot_ids(WORKFLOW_PREFIXES["redis-py"]):  # as the seed's app starts one
        state = {
            "executionId": key,
            "workflowId": "bench",
            "status": "running",
            "progress": 0,
            "currentStep": "initializing",
            "totalSteps": TOTAL_STEPS,
            "completedSteps": 0,
            "data": {},
            "startedAt": now,
            "updatedAt": now,
        }
        setup.peer.redis.set(WORKFLOW_PREFIX + key, compact_json(state), ex=SEED_WORKFLOW_TTL)
        setup.workflows.values[key] = 0
    final_check(setup)


def session_readers(setup: Setup) -> list[tuple[str, Callable[[str], Any]]]:
    """Everything that reads Redis's sessions, and may cache them."""
    readers = [("daemon A", setup.wksd["a"].read), ("daemon B", setup.wksd["b"].read)]
    if setup.cached is not None:
        readers.append(("redis-py client-side cache", setup.cached.read))
    return readers


def settle(setup: Setup, writer: str, stale_counts: dict[str, int]) -> None:
    """After a write case, wait until every caching reader returns each hot
    session's last value: Redis's invalidations arrive after the writer's
    acknowledgement. A daemon's own writes are checked at once; the others get
    ``COHERENCE_TIMEOUT`` (counted in ``stale_counts``), then fail the run."""
    keys = hot_ids("hot-")
    for reader, read in session_readers(setup):
        for key in keys:
            deadline = time.monotonic() + COHERENCE_TIMEOUT
            while (got := read(key)) != setup.sessions.values[key]:
                if reader == writer or time.monotonic() > deadline:
                    setup.sessions.check(reader, key, got)
                stale_counts[reader] = stale_counts.get(reader, 0) + 1


def final_check(setup: Setup) -> None:
    """Every store holds each hot key's last value, read by every reader."""
    for key in hot_ids("hot-"):
        setup.sessions.check("redis-py", key, setup.direct.read(key))
        setup.peer_sessions.check("redis-py", key, setup.peer.read(key))
        for reader, read in session_readers(setup):
            setup.sessions.check(reader, key, read(key))
        setup.memory.check("the memory daemon", key, setup.wksd["memory"].read(key))
        setup.durable.check("the durable daemon", key, setup.wksd["durable"].read(key))
    for key in hot_ids(WORKFLOW_PREFIXES["redis-py"]):
        raw = setup.peer.redis.get(WORKFLOW_PREFIX + key)
        got = json.loads(raw)["completedSteps"]  # type: ignore[arg-type]
        if got != setup.workflows.values[key]:
            raise StaleRead(f"workflow {key} has completedSteps {got} in the peer Redis")
    for key in hot_ids(WORKFLOW_PREFIXES["daemon A"]):
        raw = setup.direct.redis.get(WORKFLOW_PREFIX + key)
        got = json.loads(raw)["completedSteps"]  # type: ignore[arg-type]
        if got != setup.workflows.values[key]:
            raise StaleRead(f"workflow {key} has completedSteps {got} in Redis")
        state = setup.wksd["a"].client.fetch_workflow_state(key)
        if state is None or state.completed_steps != setup.workflows.values[key]:
            raise StaleRead(f"daemon A reads workflow {key} as {state}")


def apply_placement(setup: Setup, placement: Placement) -> None:
    for server in (setup.redis_server, setup.peer_server):
        assert server.process is not None
        pin_process(server.process.pid, placement.redis)
    for name, daemon in setup.daemons.items():
        assert daemon.process is not None
        # B is another host's daemon: its handling of every invalidation
        # A's writes send it is that host's work, not the writer's.
        pin_process(daemon.process.pid, placement.redis if name == "b" else placement.clients)
    for pid in setup.pool.pids():
        pin_process(pid, placement.clients)
    os.sched_setaffinity(0, placement.clients)


# -- the cases ---------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    rounds: int
    sequential_ops: int
    parallel_ops: int
    visibility_samples: int


#: Case names, as the figures and the JSON refer to them.
READ_DIRECT = "read: redis-py GET + json.loads"
READ_CACHED = "read: redis-py client-side cache"
READ_MEMORY = "read: wksd memory"
READ_REDIS = "read: wksd Redis mode"
WRITE_DIRECT = "write: redis-py SET PX"
WRITE_REDIS = "write: wksd Redis mode"
WRITE_MEMORY = "write: wksd memory only"
WRITE_DURABLE = "write: wksd durable default"
UPDATE_DIRECT = "update: redis-py GET-modify-SET"
UPDATE_REDIS = "update: wksd workflow.update"
PARALLEL_READ_DIRECT = f"{PROCESSES} reading: redis-py"
PARALLEL_READ_REDIS = f"{PROCESSES} reading: wksd Redis mode"
PARALLEL_WRITE_DIRECT = f"{PROCESSES} writing: redis-py"
PARALLEL_WRITE_REDIS = f"{PROCESSES} writing: wksd Redis mode"
VISIBILITY = "another daemon sees a write"


class Runner:
    """Runs each case once per call, keeping each case's place in its key cycle."""

    def __init__(self, setup: Setup, counts: Counts) -> None:
        self.setup = setup
        self.counts = counts
        self.cursor: dict[str, int] = {}
        self.settle_stale: dict[str, int] = {}
        self.jobs = 0

    def cases(self) -> dict[str, Callable[[Placement], tuple[list[int], int]]]:
        setup = self.setup
        wksd = setup.wksd
        cases: dict[str, Callable[[Placement], tuple[list[int], int]]] = {
            READ_DIRECT: self.reads(READ_DIRECT, setup.peer.read, setup.peer_sessions),
            READ_MEMORY: self.reads(READ_MEMORY, wksd["memory"].read, setup.memory),
            READ_REDIS: self.reads(READ_REDIS, wksd["a"].read, setup.sessions),
            WRITE_DIRECT: self.writes(
                WRITE_DIRECT, setup.peer.write, setup.peer_sessions, None, then=self.plain_writes
            ),
            WRITE_REDIS: self.writes(WRITE_REDIS, wksd["a"].write, setup.sessions, "daemon A"),
            WRITE_MEMORY: self.writes(WRITE_MEMORY, wksd["memory"].write, setup.memory, None),
            WRITE_DURABLE: self.writes(WRITE_DURABLE, wksd["durable"].write, setup.durable, None),
            UPDATE_DIRECT: self.updates(UPDATE_DIRECT, setup.peer.update, "redis-py"),
            UPDATE_REDIS: self.updates(UPDATE_REDIS, wksd["a"].update, "daemon A"),
            PARALLEL_READ_DIRECT: self.parallel("read", "redis"),
            PARALLEL_READ_REDIS: self.parallel("read", "wksd"),
            PARALLEL_WRITE_DIRECT: self.parallel("write", "redis"),
            PARALLEL_WRITE_REDIS: self.parallel("write", "wksd"),
        }
        if setup.cached is not None:
            cases[READ_CACHED] = self.reads(READ_CACHED, setup.cached.read, setup.sessions)
        return cases

    def advance(self, name: str, count: int) -> int:
        start = self.cursor.get(name, 0)
        self.cursor[name] = start + count
        return start

    def reads(
        self, name: str, read: Callable[[str], Any], keyspace: Keyspace
    ) -> Callable[[Placement], tuple[list[int], int]]:
        keys = hot_ids("hot-")

        def case(placement: Placement) -> tuple[list[int], int]:
            count = self.counts.sequential_ops
            timed_reads(read, name, keyspace, keys, WARMUP_OPS, self.advance(name, WARMUP_OPS))
            latencies = timed_reads(read, name, keyspace, keys, count, self.advance(name, count))
            return latencies, sum(latencies)

        return case

    def writes(
        self,
        name: str,
        write: Callable[[str, dict[str, Any]], None],
        keyspace: Keyspace,
        writer: str | None,
        then: Callable[[], None] | None = None,
    ) -> Callable[[Placement], tuple[list[int], int]]:
        """``then`` runs after the timed writes, untimed."""
        keys = hot_ids("hot-")

        def case(placement: Placement) -> tuple[list[int], int]:
            count = self.counts.sequential_ops
            timed_writes(write, keyspace, keys, WARMUP_OPS, self.advance(name, WARMUP_OPS))
            latencies = timed_writes(write, keyspace, keys, count, self.advance(name, count))
            if writer is not None:  # Redis's sessions: the caches must follow
                settle(self.setup, writer, self.settle_stale)
            if then is not None:
                then()
            return latencies, sum(latencies)

        return case

    def plain_writes(self) -> None:
        """Untimed: redis-py writes every hot session on the daemons' Redis, as
        the seed's app would, and every caching reader must follow."""
        setup = self.setup
        timed_writes(setup.direct.write, setup.sessions, hot_ids("hot-"), HOT_KEYS, 0)
        settle(setup, "redis-py", self.settle_stale)

    def updates(
        self, name: str, update: Callable[[str, int], int], updater: str
    ) -> Callable[[Placement], tuple[list[int], int]]:
        keys = hot_ids(WORKFLOW_PREFIXES[updater])
        keyspace = self.setup.workflows

        def case(placement: Placement) -> tuple[list[int], int]:
            count = self.counts.sequential_ops
            start = self.advance(name, WARMUP_OPS)
            timed_updates(update, updater, keyspace, keys, WARMUP_OPS, start)
            start = self.advance(name, count)
            latencies = timed_updates(update, updater, keyspace, keys, count, start)
            return latencies, sum(latencies)

        return case

    def parallel(
        self, kind: Literal["read", "write"], via: TargetKind
    ) -> Callable[[Placement], tuple[list[int], int]]:
        setup = self.setup
        address = (
            f"127.0.0.1:{setup.peer_server.port}" if via == "redis" else setup.daemons["a"].path
        )
        target = Target(via, address)
        sessions = setup.peer_sessions if via == "redis" else setup.sessions
        truth = setup.peer if via == "redis" else setup.direct

        def case(placement: Placement) -> tuple[list[int], int]:
            self.jobs += 1
            tag = f"job-{self.jobs}"
            expected = dict(sessions.values) if kind == "read" else None
            job = Job(kind, target, self.counts.parallel_ops, placement.clients, tag, expected)
            reports = setup.pool.run([job] * PROCESSES)
            if kind == "write":
                self.check_written(reports, truth)
            pooled = [latency for report in reports for latency in report.latencies]
            window = max(r.finished_ns for r in reports) - min(r.started_ns for r in reports)
            return pooled, window

        return case

    def check_written(self, reports: Sequence[WorkerResult], truth: DirectSessions) -> None:
        """What each worker wrote last is in Redis (read plainly: Redis is the truth)."""
        for report in reports:
            keys = list(report.written)
            raws = truth.redis.mget([SESSION_PREFIX + key for key in keys])
            for key, raw in zip(keys, raws, strict=True):  # type: ignore[arg-type]
                got = None if raw is None else json.loads(raw)
                if got != report.written[key]:
                    raise StaleRead(f"Redis holds {got!r} for {key!r}, not {report.written[key]!r}")

    def visibility(self, into: Visibility) -> None:
        """Daemon A writes a key daemon B has just read; B is polled until it sees it."""
        a, b = self.setup.wksd["a"], self.setup.wksd["b"]
        keyspace = self.setup.visible
        keys = hot_ids("vis-")
        start = self.advance(VISIBILITY, self.counts.visibility_samples)
        for index in range(self.counts.visibility_samples):
            key = keys[(start + index) % len(keys)]
            previous = keyspace.values[key]
            keyspace.check("daemon B", key, b.read(key))  # B holds the key now
            value = keyspace.next_session(key)
            a.write(key, value)
            acknowledged = clock()
            keyspace.values[key] = value
            stale = 0
            while True:
                got = b.read(key)
                returned = clock()
                if got == value:
                    break
                if got != previous:
                    raise StaleRead(f"daemon B read {key!r} as {got!r}: neither old nor new")
                stale += 1
                into.longest_stale_ns = max(into.longest_stale_ns, returned - acknowledged)
                if returned - acknowledged > COHERENCE_TIMEOUT * NANOSECONDS_PER_SECOND:
                    raise StaleRead(
                        f"daemon B still read the old {key!r} after {COHERENCE_TIMEOUT} s"
                    )
            into.latencies.append(returned - acknowledged)
            into.stale_reads += stale
            into.stale_samples += stale > 0


@dataclass
class Measured:
    """Everything measured in one placement."""

    placement: Placement
    samples: dict[str, Samples] = field(default_factory=dict)
    visibility: Visibility = field(default_factory=Visibility)


def run(setup: Setup, counts: Counts, chosen: Sequence[Placement]) -> tuple[list[Measured], Runner]:
    runner = Runner(setup, counts)
    cases = runner.cases()
    measured = [Measured(placement, {name: Samples() for name in cases}) for placement in chosen]
    order = random.Random(ORDER_SEED)
    names = [*cases, VISIBILITY]
    for number in range(counts.rounds):
        print(f"  round {number + 1} of {counts.rounds} ...", file=sys.stderr, flush=True)
        for result in measured:
            apply_placement(setup, result.placement)
            order.shuffle(names)
            for name in names:
                if name == VISIBILITY:
                    runner.visibility(result.visibility)
                    continue
                latencies, window = cases[name](result.placement)
                result.samples[name].add(latencies, window)
    final_check(setup)
    return measured, runner


# -- figures -----------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One row of the report: a figure of the issue's Goals table (or a further peer)."""

    label: str
    wksd: str  # the case measured
    peer: str | None  # the case it is divided by
    by: Literal["p50", "throughput", "p99"]
    value: float  # the ratio, or µs for the visibility p99
    goal: str
    met: bool | None


def figures(result: Measured, cached: bool) -> list[Figure]:
    stats = {name: samples.stats() for name, samples in result.samples.items()}

    def latency(label: str, wksd: str, peer: str) -> Figure:
        return judged(label, wksd, peer, "p50", stats[wksd].p50_us / stats[peer].p50_us)

    def throughput(label: str, wksd: str, peer: str) -> Figure:
        value = stats[wksd].ops_per_second / stats[peer].ops_per_second
        return judged(label, wksd, peer, "throughput", value)

    rows = [
        latency("session read, memory", READ_MEMORY, READ_DIRECT),
        latency("session read, Redis mode (near cache)", READ_REDIS, READ_DIRECT),
    ]
    if cached:
        rows.append(latency("redis-py client-side cache read", READ_CACHED, READ_DIRECT))
        rows.append(latency("session read, Redis mode, against it", READ_REDIS, READ_CACHED))
    rows += [
        latency("session write, Redis mode", WRITE_REDIS, WRITE_DIRECT),
        latency("workflow.update, Redis mode, against GET+SET", UPDATE_REDIS, UPDATE_DIRECT),
        throughput(
            f"{PROCESSES} processes reading, Redis mode", PARALLEL_READ_REDIS, PARALLEL_READ_DIRECT
        ),
        throughput(
            f"{PROCESSES} processes writing, Redis mode",
            PARALLEL_WRITE_REDIS,
            PARALLEL_WRITE_DIRECT,
        ),
        judged(
            "another daemon sees a write, p99",
            VISIBILITY,
            None,
            "p99",
            result.visibility.summary()["p99_us"],
        ),
        latency("write on the durable default against memory only", WRITE_DURABLE, WRITE_MEMORY),
        latency("session write, memory only (no goal)", WRITE_MEMORY, WRITE_DIRECT),
    ]
    return rows


def judged(label: str, wksd: str, peer: str | None, by: Any, value: float) -> Figure:
    goal = GOALS.get(label)
    if goal is None:
        return Figure(label, wksd, peer, by, value, "", None)
    comparison, bound = goal
    met = value <= bound if comparison == "<=" else value >= bound
    shown = f"{comparison} {bound:g}" + (" µs" if by == "p99" else "")
    return Figure(label, wksd, peer, by, value, shown, met)


# -- the report ------------------------------------------------------------


def environment(setup: Setup) -> dict[str, Any]:
    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "redis-py": version("redis"),
        "hiredis": version("hiredis"),
        "redis-py uses hiredis": bool(HIREDIS_AVAILABLE),
        "redis-server": ".".join(map(str, setup.redis_version)),
        "trio": version("trio"),
        "msgpack": version("msgpack"),
        "wksd": version("wksd"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def near_cache_counters(path: str) -> dict[str, float]:
    """The daemon's near-cache series (any whose name says near_cache), summed by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with Client(path) as client:
        exposition = client.metrics()
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if "near_cache" in sample.name and not sample.name.endswith("_created"):
                counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
    return counters


def case_cell(stats: Stats, by: str) -> str:
    if by == "throughput":
        return f"{stats.ops_per_second:>9,.0f}/s"
    return f"{stats.p50_us:>7.1f} {stats.p99_us:>7.1f}"


def print_report(report: dict[str, Any], measured: Sequence[Measured]) -> None:
    env = report["environment"]
    settings = report["settings"]
    print("environment: " + ", ".join(f"{key} {value}" for key, value in env.items()))
    print(
        f"settings: {settings['rounds']} rounds; per case per round {settings['sequential_ops']} "
        f"sequential ops, {PROCESSES} processes x {settings['parallel_ops']} ops, "
        f"{settings['visibility_samples']} visibility samples; {HOT_KEYS} hot keys; "
        f"near cache {NEAR_CACHE_BYTES} bytes"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    for result, section in zip(measured, report["placements"], strict=True):
        stats = {name: samples.stats() for name, samples in result.samples.items()}
        print()
        print(f"placement: {result.placement.describe()}")
        print(
            f"{'figure':50} {'wksd p50/p99 µs':>16}  {'peer p50/p99 µs':>16}  "
            f"{'ratio':>6}  {'goal':>10}  met"
        )
        for row in section["figures"]:
            mark = {True: "yes", False: "NO", None: "-"}[row["met"]]
            if row["by"] == "p99":
                vis = section["visibility"]
                wksd_cell = f"{vis['p50_us']:>7.1f} {vis['p99_us']:>7.1f}"
                print(
                    f"{row['label']:50} {wksd_cell:>16}  {'(no peer)':>16}  "
                    f"{row['value']:>6.0f}  {row['goal']:>10}  {mark}"
                )
                continue
            wksd_cell = case_cell(stats[row["wksd"]], row["by"])
            peer_cell = case_cell(stats[row["peer"]], row["by"])
            print(
                f"{row['label']:50} {wksd_cell:>16}  {peer_cell:>16}  "
                f"{row['value']:>6.2f}  {row['goal']:>10}  {mark}"
            )
        vis = section["visibility"]
        print(
            f"another daemon sees a write: {vis['samples']} samples, p50 {vis['p50_us']:.0f} µs, "
            f"p99 {vis['p99_us']:.0f} µs, max {vis['max_us']:.0f} µs; stale reads "
            f"{vis['stale_reads']} in {vis['stale_samples']} samples (longest "
            f"{vis['longest_stale_us']:.0f} µs after the ack)"
        )
    print()
    print(
        "stale reads while settling after a plain write (each hot key polled until "
        f"fresh): {report['settle_stale_reads'] or 'none'}"
    )
    print(f"near cache, daemon A: {report['near_cache_a'] or 'no near_cache series exposed'}")
    print(
        f"checked: every value read against the last written; {report['reads_checked']:,} "
        "operations, no stale read where none is allowed"
    )


def build_report(
    setup: Setup,
    counts: Counts,
    measured: Sequence[Measured],
    runner: Runner,
    notes: list[str],
) -> dict[str, Any]:
    sections = []
    operations = 0
    for result in measured:
        stats = {name: samples.stats() for name, samples in result.samples.items()}
        operations += sum(s.ops for s in stats.values()) + len(result.visibility.latencies)
        sections.append(
            {
                "placement": result.placement.name,
                "description": result.placement.describe(),
                "cases": {name: asdict(s) for name, s in stats.items()},
                "visibility": result.visibility.summary(),
                "figures": [asdict(f) for f in figures(result, setup.cached is not None)],
            }
        )
    return {
        "environment": environment(setup),
        "settings": {
            **asdict(counts),
            "processes": PROCESSES,
            "hot_keys": HOT_KEYS,
            "warmup_ops": WARMUP_OPS,
            "near_cache_bytes": NEAR_CACHE_BYTES,
        },
        "notes": notes,
        "placements": sections,
        "settle_stale_reads": runner.settle_stale,
        "near_cache_a": near_cache_counters(setup.daemons["a"].path),
        "reads_checked": operations,
    }


# -- the plot --------------------------------------------------------------

#: Which cases share a panel of the plot.
PANELS: list[tuple[str, list[str]]] = [
    ("session read", [READ_DIRECT, READ_CACHED, READ_MEMORY, READ_REDIS]),
    ("session write", [WRITE_DIRECT, WRITE_REDIS, WRITE_MEMORY, WRITE_DURABLE]),
    ("workflow update", [UPDATE_DIRECT, UPDATE_REDIS]),
    (
        f"{PROCESSES} processes at once (pooled latency)",
        [PARALLEL_READ_DIRECT, PARALLEL_READ_REDIS, PARALLEL_WRITE_DIRECT, PARALLEL_WRITE_REDIS],
    ),
    ("another daemon sees a write", [VISIBILITY]),
]


def require_matplotlib() -> Any:
    """matplotlib's pyplot on the Agg backend; exits saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(
            "--plot needs matplotlib, which is not installed: "
            "pip install -e '.[bench]' (or pip install 'matplotlib>=3.7')"
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot(path: Path, measured: Sequence[Measured], pyplot: Any) -> None:
    """The latency distributions (CDFs), one column per placement."""
    columns = len(measured)
    figure, axes = pyplot.subplots(
        len(PANELS), columns, figsize=(7 * columns, 3.2 * len(PANELS)), squeeze=False
    )
    for column, result in enumerate(measured):
        for row, (title, names) in enumerate(PANELS):
            axis = axes[row][column]
            for name in names:
                if name == VISIBILITY:
                    latencies = result.visibility.latencies
                else:
                    samples = result.samples.get(name)
                    latencies = samples.latencies if samples is not None else []
                if not latencies:
                    continue
                ordered = sorted(latencies)
                xs = [latency / 1000 for latency in ordered]
                ys = [(index + 1) / len(ordered) for index in range(len(ordered))]
                p50 = percentile(ordered, 50) / 1000
                axis.plot(xs, ys, label=f"{name} (p50 {p50:.0f} µs)", linewidth=1.2)
            axis.set_xscale("log")
            axis.set_ylim(0, 1)
            axis.grid(True, which="both", alpha=0.3)
            axis.set_title(f"{title} — {result.placement.name}", fontsize=10)
            axis.set_xlabel("latency, µs (log)", fontsize=8)
            axis.set_ylabel("fraction ≤", fontsize=8)
            axis.legend(fontsize=7, loc="lower right")
    figure.suptitle("wksd against direct redis-py: latency distributions", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


# -- the command ------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_ROUNDS} rounds of {QUICK_SEQUENTIAL_OPS} sequential ops, "
        f"{QUICK_PARALLEL_OPS} per process, {QUICK_VISIBILITY_SAMPLES} visibility samples",
    )
    parser.add_argument("--rounds", type=int, metavar="N", help=f"rounds (default {ROUNDS})")
    parser.add_argument(
        "--ops", type=int, metavar="N", help=f"sequential ops per case per round ({SEQUENTIAL_OPS})"
    )
    parser.add_argument(
        "--parallel-ops",
        type=int,
        metavar="N",
        help=f"ops per process per parallel case per round ({PARALLEL_OPS})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help=f"'another daemon sees a write' samples per round ({VISIBILITY_SAMPLES})",
    )
    parser.add_argument(
        "--placement",
        choices=("pinned", "unpinned", "both"),
        default="both",
        help="pinned: client side on one CPU, redis-server on another; default both",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help="write a PNG of the latency distributions"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "ops", "parallel_ops", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def operation_counts(args: argparse.Namespace) -> Counts:
    quick = args.quick

    def chosen(given: int | None, full: int, small: int) -> int:
        return given if given is not None else (small if quick else full)

    return Counts(
        rounds=chosen(args.rounds, ROUNDS, QUICK_ROUNDS),
        sequential_ops=chosen(args.ops, SEQUENTIAL_OPS, QUICK_SEQUENTIAL_OPS),
        parallel_ops=chosen(args.parallel_ops, PARALLEL_OPS, QUICK_PARALLEL_OPS),
        visibility_samples=chosen(args.samples, VISIBILITY_SAMPLES, QUICK_VISIBILITY_SAMPLES),
    )


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit, so the clean-up below runs as on Ctrl-C."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pyplot = require_matplotlib() if args.plot is not None else None
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    if not HIREDIS_AVAILABLE:
        sys.exit("redis-py does not use hiredis here: pip install 'redis[hiredis]'")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    counts = operation_counts(args)
    chosen, note = placements(args.placement)
    notes = [note] if note else []
    started = time.monotonic()
    context = multiprocessing.get_context("forkserver")
    with contextlib.ExitStack() as stack:
        print("starting redis-server, four wksd daemons, the workers ...", file=sys.stderr)
        setup = set_up(stack, context)
        if setup.cached_skipped is not None:
            notes.append(setup.cached_skipped)
        measured, runner = run(setup, counts, chosen)
        report = build_report(setup, counts, measured, runner, notes)
        print("stopping ...", file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    print_report(report, measured)
    print(f"took {report['seconds']} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if pyplot is not None:
        plot(args.plot, measured, pyplot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
