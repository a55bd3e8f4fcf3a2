"""How much a cache read through wksd costs, next to reading Redis directly.

One run measures the same work four ways: fetching one small cached JSON value
(``VALUE_BYTES`` of compact JSON) with

- ``direct GET``:       redis-py's sync client, ``GET wks:cache:api:bench`` (raw bytes);
- ``direct GET+json``:  the same, then ``json.loads``;
- ``wksd memory``:      ``clientlib.Client.get_cached_api_response`` on a daemon
                        serving from its memory store;
- ``wksd redis``:       the same call on a daemon in Redis mode (the value lives in
                        Redis under the same key the direct client reads).

Each is measured sequentially (this process, one client, N operations after a
warm-up, per-operation latency) and in parallel (``PROCESSES`` processes, each
with its own client, released together by a barrier, each doing the same
number of operations; aggregate ops/s and the pooled latency percentiles).
The ratios against the direct raw GET are then checked against the goals.

Everything runs on private processes: a ``redis-server`` on a free port in a
temporary directory (never the machine's Redis on 6379) and two ``wksd``
daemons on their own sockets, all stopped when the run ends, Ctrl-C included.

Run from the repository root::

    python benchmarks/bench.py                  # full run, well under a minute on 2 cores
    python benchmarks/bench.py --quick          # a smoke run of a few seconds
    python benchmarks/bench.py --ops 50000 --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal

import redis
from redis.utils import HIREDIS_AVAILABLE

# The tests' helpers start the private processes: run from anywhere, the
# repository root is where ``tests`` imports from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clientlib import Client
from tests.processes import DaemonProcess
from tests.redis_server import RedisServer

# -- what is measured ------------------------------------------------------

#: The cache key given to wksd, and the Redis key it stores the value under
#: (DESIGN section 4: ``wks:cache:api:{hash}``).
CACHE_KEY = "bench"
REDIS_KEY = f"wks:cache:api:{CACHE_KEY}"

#: Size of the cached value as compact JSON: a typical small API response.
VALUE_BYTES = 100

#: Lifetime of the cached value; far longer than any run.
VALUE_TTL = 3600

#: Client processes in the parallel measurement: more than the cores of a
#: small host, as a host's worker processes usually are.
PROCESSES = 8

#: Operations per measurement. The full run stays under about a minute on a
#: 2-core machine; ``--quick`` is a smoke test of a few seconds.
SEQUENTIAL_OPS = 20_000
PARALLEL_OPS = 5_000
QUICK_SEQUENTIAL_OPS = 2_000
QUICK_PARALLEL_OPS = 500

#: Each measurement is split into this many rounds, and the rounds of the
#: targets are interleaved (round 1 of every target, then round 2, ...). On a
#: small VM latency drifts by tens of percent over seconds; interleaving lets
#: a slow patch hit every target alike instead of skewing one ratio.
ROUNDS = 5

#: Unmeasured operations before each measurement: the connection is open,
#: code paths and allocator pools are warm. One tenth of the work, at least
#: ``MIN_WARMUP_OPS``.
WARMUP_DIVISOR = 10
MIN_WARMUP_OPS = 100

#: The goals, as ratios against the direct raw GET (sequential p50 latency,
#: parallel aggregate throughput).
GOAL_REDIS_P50_RATIO = 1.3
GOAL_MEMORY_P50_RATIO = 0.6
GOAL_THROUGHPUT_RATIO = 1.0

# -- the processes it runs -------------------------------------------------

#: How long a stopped parallel worker may take to exit before it is killed.
STOP_TIMEOUT = 10.0

#: How long the parallel workers may take to start and reach the barrier
#: (8 interpreters forked from the forkserver on 2 busy cores), and how long
#: one parallel measurement may take in all before it is called stuck.
BARRIER_TIMEOUT = 60.0
PARALLEL_TIMEOUT = 300.0

#: How often the wait for the workers' reports looks for a worker that died.
WORKER_CHECK_INTERVAL = 0.1

NANOSECONDS_PER_SECOND = 1_000_000_000


# -- the value -------------------------------------------------------------


def cached_value(size: int = VALUE_BYTES) -> dict[str, Any]:
    """A JSON object whose compact encoding is ``size`` bytes long."""
    value: dict[str, Any] = {"items": [1, 2, 3], "user": "u1", "ok": True, "pad": ""}
    value["pad"] = "x" * (size - len(compact_json(value)))
    return value


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# -- targets: what one client does, in any process -------------------------

Kind = Literal["redis-get", "redis-get-json", "wksd"]


@dataclass(frozen=True)
class Target:
    """One way of reading the value; picklable, so workers open their own client."""

    name: str
    kind: Kind
    address: str  # "host:port" for Redis, a socket path for wksd


@contextlib.contextmanager
def open_operation(target: Target) -> Iterator[Callable[[], Any]]:
    """A fresh client for ``target``, as a function that reads the value once."""
    if target.kind == "wksd":
        with Client(target.address) as wksd_client:
            yield functools.partial(wksd_client.get_cached_api_response, CACHE_KEY)
        return
    host, port = target.address.rsplit(":", 1)
    redis_client = redis.Redis(host=host, port=int(port))
    try:
        get = functools.partial(redis_client.get, REDIS_KEY)
        if target.kind == "redis-get":
            yield get
        else:
            yield lambda: json.loads(get())  # type: ignore[arg-type]  # the key is set
    finally:
        redis_client.close()


def time_operations(operation: Callable[[], Any], count: int) -> list[int]:
    """Run ``operation`` ``count`` times; the latency of each, in nanoseconds."""
    latencies = [0] * count
    clock = time.perf_counter_ns
    for index in range(count):
        started = clock()
        operation()
        latencies[index] = clock() - started
    return latencies


def warmup_ops(count: int) -> int:
    return max(MIN_WARMUP_OPS, count // WARMUP_DIVISOR)


def window_clock() -> int:
    """Nanoseconds on CLOCK_MONOTONIC, which every process of the host shares.

    The parallel workers' start and end times are compared across processes,
    so they are read from this clock rather than perf_counter, whose origin
    Python leaves undefined.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# -- statistics ------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Latency percentiles (µs) and throughput of one measurement."""

    ops: int
    seconds: float
    p50_us: float
    p99_us: float
    ops_per_second: float


@dataclass
class Sample:
    """Latencies (ns) of the operations measured, and the time they took together."""

    latencies: list[int]
    window_ns: int

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.latencies + other.latencies, self.window_ns + other.window_ns)


def summarise(latencies: Sequence[int], window_ns: int) -> Stats:
    ordered = sorted(latencies)
    return Stats(
        ops=len(ordered),
        seconds=window_ns / NANOSECONDS_PER_SECOND,
        p50_us=percentile(ordered, 50) / 1000,
        p99_us=percentile(ordered, 99) / 1000,
        ops_per_second=len(ordered) * NANOSECONDS_PER_SECOND / window_ns,
    )


def percentile(ordered: Sequence[int], percent: float) -> int:
    """The nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * percent // 100))  # ceil without floats
    return ordered[int(rank) - 1]


# -- sequential ------------------------------------------------------------


def measure_sequential(target: Target, count: int) -> Sample:
    with open_operation(target) as operation:
        time_operations(operation, warmup_ops(count))
        started = time.perf_counter_ns()
        latencies = time_operations(operation, count)
        window = time.perf_counter_ns() - started
    return Sample(latencies, window)


# -- parallel --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerResult:
    started_ns: int
    finished_ns: int
    latencies: array[int]


def parallel_worker(
    target: Target, count: int, barrier: Barrier, results: Queue[WorkerResult]
) -> None:
    """One parallel client: warm up, wait for the others, measure, report."""
    try:
        with open_operation(target) as operation:
            time_operations(operation, warmup_ops(count))
            barrier.wait(BARRIER_TIMEOUT)
            started = window_clock()
            latencies = time_operations(operation, count)
            finished = window_clock()
    except BaseException:
        barrier.abort()  # the others stop waiting for a worker that will never come
        raise
    results.put(WorkerResult(started, finished, array("q", latencies)))


def measure_parallel(context: ForkServerContext, target: Target, count: int) -> Sample:
    barrier = context.Barrier(PROCESSES)
    results: Queue[WorkerResult] = context.Queue()
    workers = [
        context.Process(
            target=parallel_worker,
            args=(target, count, barrier, results),
            name=f"bench-{target.kind}-{number}",
            daemon=True,
        )
        for number in range(PROCESSES)
    ]
    try:
        for worker in workers:
            worker.start()
        reports = collect(results, workers)
        for worker in workers:
            worker.join(STOP_TIMEOUT)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(STOP_TIMEOUT)
    pooled = [latency for report in reports for latency in report.latencies]
    window = max(r.finished_ns for r in reports) - min(r.started_ns for r in reports)
    return Sample(pooled, window)


def collect(results: Queue[WorkerResult], workers: Sequence[BaseProcess]) -> list[WorkerResult]:
    """Every worker's report; fails as soon as a worker dies without one."""
    reports: list[WorkerResult] = []
    deadline = time.monotonic() + PARALLEL_TIMEOUT
    while len(reports) < len(workers):
        try:
            reports.append(results.get(timeout=WORKER_CHECK_INTERVAL))
            continue
        except queue.Empty:
            pass
        failed = [w for w in workers if w.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"parallel worker {failed[0].name} exited with {failed[0].exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"parallel workers did not finish within {PARALLEL_TIMEOUT} s")
    return reports


# -- the private redis-server and daemons ----------------------------------
# Started by the tests' own helpers (tests/redis_server.py, tests/processes.py).


def start_redis(directory: Path, stack: contextlib.ExitStack) -> RedisServer:
    """A redis-server on a free port that keeps nothing on disk; stopped after the daemons."""
    server = RedisServer(directory / "redis").start()
    stack.callback(server.stop)
    return server


def start_daemon(
    socket_path: str, env: dict[str, str], stack: contextlib.ExitStack
) -> DaemonProcess:
    """A ``python -m wksd`` child serving on ``socket_path``, logging beside it.

    Memory only unless ``env`` names a state directory: the read path is what
    is measured here (benchmarks/durable.py measures the journal's cost). In
    a session of its own: a Ctrl-C reaches this process only, which stops
    the daemons in order.
    """
    daemon = DaemonProcess(
        socket_path,
        {"WKSD_STATE_DIR": "", **env},
        log_path=Path(socket_path).with_suffix(".log"),
        new_session=True,
    )
    stack.callback(daemon.close)
    return daemon.start()


# -- the run ---------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    target: str
    sequential: Stats
    parallel: Stats


@dataclass(frozen=True)
class Ratio:
    label: str
    value: float
    goal: str
    met: bool


def set_up(stack: contextlib.ExitStack) -> list[Target]:
    """Start redis-server and both daemons, store the value; the four targets."""
    # Short, under /tmp: a Unix socket's path must stay under 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="wksd-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    redis_server = start_redis(directory, stack)

    memory_socket = str(directory / "memory.sock")
    redis_socket = str(directory / "redis.sock")
    start_daemon(memory_socket, {"REDIS_ENABLED": "0"}, stack).wait_for_backend("memory")
    start_daemon(
        redis_socket, {"REDIS_ENABLED": "1", "REDIS_URL": redis_server.url}, stack
    ).wait_for_backend("redis")

    value = cached_value()
    for socket_path in (memory_socket, redis_socket):
        with Client(socket_path) as client:
            client.cache_api_response(CACHE_KEY, value, ttl=VALUE_TTL)
    address = f"127.0.0.1:{redis_server.port}"
    targets = [
        Target("direct GET", "redis-get", address),
        Target("direct GET+json", "redis-get-json", address),
        Target("wksd memory", "wksd", memory_socket),
        Target("wksd redis", "wksd", redis_socket),
    ]
    check_targets(targets, value)
    return targets


def check_targets(targets: Sequence[Target], value: dict[str, Any]) -> None:
    """Every target reads the value wksd stored, so all four do the same work."""
    for target in targets:
        with open_operation(target) as operation:
            got = operation()
        if target.kind == "redis-get":
            got = json.loads(got)
        if got != value:
            raise RuntimeError(f"{target.name} read {got!r}, not the value stored")


def run(targets: Sequence[Target], sequential_ops: int, parallel_ops: int) -> list[Result]:
    """Measure every target in ROUNDS interleaved rounds; pool each target's rounds."""
    context = multiprocessing.get_context("forkserver")
    sequential = {target.name: Sample([], 0) for target in targets}
    parallel = {target.name: Sample([], 0) for target in targets}
    for number in range(ROUNDS):
        print(f"  round {number + 1} of {ROUNDS} ...", file=sys.stderr, flush=True)
        for target in targets:
            sequential[target.name] += measure_sequential(target, sequential_ops // ROUNDS)
        for target in targets:
            parallel[target.name] += measure_parallel(
                context, target, max(1, parallel_ops // ROUNDS)
            )
    return [
        Result(
            target.name,
            summarise(sequential[target.name].latencies, sequential[target.name].window_ns),
            summarise(parallel[target.name].latencies, parallel[target.name].window_ns),
        )
        for target in targets
    ]


def ratios(results: Sequence[Result]) -> list[Ratio]:
    by_name = {result.target: result for result in results}
    direct = by_name["direct GET"]
    memory = by_name["wksd memory"]
    via_redis = by_name["wksd redis"]

    def at_most(label: str, value: float, goal: float) -> Ratio:
        return Ratio(label, value, f"<= {goal}", value <= goal)

    def at_least(label: str, value: float, goal: float) -> Ratio:
        return Ratio(label, value, f">= {goal}", value >= goal)

    direct_p50 = direct.sequential.p50_us
    direct_throughput = direct.parallel.ops_per_second
    return [
        at_most(
            "sequential p50, wksd redis / direct GET",
            via_redis.sequential.p50_us / direct_p50,
            GOAL_REDIS_P50_RATIO,
        ),
        at_most(
            "sequential p50, wksd memory / direct GET",
            memory.sequential.p50_us / direct_p50,
            GOAL_MEMORY_P50_RATIO,
        ),
        at_least(
            f"{PROCESSES}-process ops/s, wksd redis / direct GET",
            via_redis.parallel.ops_per_second / direct_throughput,
            GOAL_THROUGHPUT_RATIO,
        ),
        at_least(
            f"{PROCESSES}-process ops/s, wksd memory / direct GET",
            memory.parallel.ops_per_second / direct_throughput,
            GOAL_THROUGHPUT_RATIO,
        ),
    ]


# -- the report ------------------------------------------------------------


def environment() -> dict[str, Any]:
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
        "trio": version("trio"),
        "msgpack": version("msgpack"),
        "wksd": version("wksd"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def print_report(
    env: dict[str, Any],
    settings: dict[str, int],
    results: Sequence[Result],
    checks: Sequence[Ratio],
) -> None:
    print("environment: " + ", ".join(f"{key} {value}" for key, value in env.items()))
    print(
        f"value: {VALUE_BYTES} bytes of JSON; sequential: {settings['sequential_ops']} ops "
        f"after {warmup_ops(settings['sequential_ops'])} warm-up; parallel: {PROCESSES} "
        f"processes x {settings['parallel_ops']} ops "
        f"after {warmup_ops(settings['parallel_ops'])} warm-up each"
    )
    print()
    print(f"{'':17} | {'sequential (1 process)':^28} | {f'parallel ({PROCESSES} processes)':^29}")
    print(
        f"{'target':17} | {'p50 µs':>8} {'p99 µs':>8} {'ops/s':>10} "
        f"| {'p50 µs':>8} {'p99 µs':>8} {'agg ops/s':>11}"
    )
    print("-" * 78)
    for result in results:
        seq, par = result.sequential, result.parallel
        print(
            f"{result.target:17} | {seq.p50_us:8.1f} {seq.p99_us:8.1f} {seq.ops_per_second:10.0f} "
            f"| {par.p50_us:8.1f} {par.p99_us:8.1f} {par.ops_per_second:11.0f}"
        )
    print()
    print(f"{'ratio':46} {'value':>7}  {'goal':>7}  met")
    for check in checks:
        mark = "yes" if check.met else "NO"
        print(f"{check.label:46} {check.value:7.2f}  {check.goal:>7}  {mark}")


def write_json(
    path: Path,
    env: dict[str, Any],
    settings: dict[str, int],
    results: Sequence[Result],
    checks: Sequence[Ratio],
) -> None:
    document = {
        "environment": env,
        "settings": {
            **settings,
            "processes": PROCESSES,
            "value_bytes": VALUE_BYTES,
            "sequential_warmup_ops": warmup_ops(settings["sequential_ops"]),
            "parallel_warmup_ops": warmup_ops(settings["parallel_ops"]),
        },
        "results": [asdict(result) for result in results],
        "ratios": [asdict(check) for check in checks],
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller N: {QUICK_SEQUENTIAL_OPS} sequential, {QUICK_PARALLEL_OPS} per process",
    )
    parser.add_argument(
        "--ops",
        type=int,
        metavar="N",
        help=f"sequential operations (default {SEQUENTIAL_OPS}); also sets the "
        f"per-process parallel ones to N/4 unless --parallel-ops is given",
    )
    parser.add_argument(
        "--parallel-ops",
        type=int,
        metavar="N",
        help=f"operations per parallel process (default {PARALLEL_OPS})",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("ops", "parallel_ops"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def operation_counts(args: argparse.Namespace) -> dict[str, int]:
    sequential = QUICK_SEQUENTIAL_OPS if args.quick else SEQUENTIAL_OPS
    parallel = QUICK_PARALLEL_OPS if args.quick else PARALLEL_OPS
    if args.ops is not None:
        sequential = args.ops
        parallel = max(1, args.ops * PARALLEL_OPS // SEQUENTIAL_OPS)
    if args.parallel_ops is not None:
        parallel = args.parallel_ops
    return {"sequential_ops": sequential, "parallel_ops": parallel}


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit, so the clean-up below runs as on Ctrl-C."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    settings = operation_counts(args)
    with contextlib.ExitStack() as stack:
        print("starting redis-server and two wksd daemons ...", file=sys.stderr, flush=True)
        targets = set_up(stack)
        results = run(targets, settings["sequential_ops"], settings["parallel_ops"])
        print("stopping ...", file=sys.stderr, flush=True)
    env = environment()
    checks = ratios(results)
    print_report(env, settings, results, checks)
    if args.json is not None:
        write_json(args.json, env, settings, results, checks)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
