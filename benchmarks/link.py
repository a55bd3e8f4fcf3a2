"""What one Redis command costs through wksd's link (wksd.store.redis_link).

Against a private redis-server (no persistence), one run, rounds interleaved
so a noisy neighbour hits every case alike; each figure is the median over
the rounds of one round's p50:

- **redis-py GET**: redis-py's sync client (with hiredis), sequential: the reference.
- **link GET**: ``RedisLink.execute("GET", k)``, sequential, in one trio task.
- **link GET x8**: eight trio tasks sharing the link, each sequential; the
  p50 of one GET as a task sees it, and the GETs per second of all eight.
- **CPU µs**: this process's CPU time per GET (less noisy than latency: the
  link's own cost, without the round trip).
- **pack**: ``resp.pack`` of a GET and of a typical EVALSHA, per call.

``--compare FILE`` runs a second link module (an older ``redis_link.py``)
in the same rounds, for a before/after in one run. By default this process
is pinned to CPU 0 and redis-server to CPU 1, so each round trip crosses
cores as it does to a remote Redis (``--no-pin`` leaves placement to the OS).

Run from the repository root::

    python benchmarks/link.py                  # about half a minute on 2 cores
    python benchmarks/link.py --quick          # a smoke run
    python benchmarks/link.py --compare /tmp/old_redis_link.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.redis_server import RedisServer
from wksd.store import redis_link, resp
from wksd.store.redis_target import RedisTarget, open_stream

CONCURRENT = 8


def load_link(path: str) -> Any:
    """A redis_link module from ``path``, importing wksd.store's own resp."""
    spec = importlib.util.spec_from_file_location("wksd.store._compared_link", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def p50_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


def redis_py_gets(port: int, ops: int) -> float:
    with redis.Redis(port=port) as client:
        client.set("k", b"v" * 100)
        samples = []
        for _ in range(ops):
            started = time.perf_counter_ns()
            client.get("k")
            samples.append(time.perf_counter_ns() - started)
    return p50_us(samples)


def link_gets(module: Any, port: int, ops: int) -> dict[str, float]:
    """Sequential and concurrent p50s (µs), GETs/s and CPU µs per GET through ``module``."""

    async def main() -> dict[str, float]:
        stream = await open_stream(RedisTarget(port=port), 5.0)
        link = module.RedisLink(stream, 5.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await link.execute("SET", "k", b"v" * 100)
            samples: list[int] = []
            cpu = time.process_time()
            for _ in range(ops):
                started = time.perf_counter_ns()
                await link.execute("GET", "k")
                samples.append(time.perf_counter_ns() - started)
            cpu = (time.process_time() - cpu) / ops * 1e6
            sequential = p50_us(samples)
            together: list[int] = []

            async def one() -> None:
                for _ in range(ops // CONCURRENT):
                    started = time.perf_counter_ns()
                    await link.execute("GET", "k")
                    together.append(time.perf_counter_ns() - started)

            started, cpu_together = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as inner:
                for _ in range(CONCURRENT):
                    inner.start_soon(one)
            rate = len(together) / (time.perf_counter() - started)
            cpu_together = (time.process_time() - cpu_together) / len(together) * 1e6
            link.fail(redis_link.LinkDown("done"))
        return {
            "GET p50 µs": sequential,
            "GET CPU µs": cpu,
            f"GET x{CONCURRENT} p50 µs": p50_us(together),
            f"GET x{CONCURRENT} GETs/s": rate,
            f"GET x{CONCURRENT} CPU µs": cpu_together,
        }

    return trio.run(main)


def pack_us(call: Callable[[], Any], ops: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(ops):
        call()
    return (time.perf_counter_ns() - started) / ops / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=4000, help="GETs per case per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 500")
    parser.add_argument("--compare", metavar="FILE", help="another redis_link.py to run too")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the OS")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.ops = 2, 500
    links = {"link": redis_link}
    if options.compare:
        links["compared"] = load_link(options.compare)
    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory)).start()
        try:
            pinned = not options.no_pin and len(os.sched_getaffinity(0)) > 1
            if pinned:
                os.sched_setaffinity(0, {0})
                assert server.process is not None
                os.sched_setaffinity(server.process.pid, {1})
            for _ in range(options.rounds):
                note("redis-py GET p50 µs", redis_py_gets(server.port, options.ops))
                for name, module in links.items():
                    for figure, value in link_gets(module, server.port, options.ops).items():
                        note(f"{name} {figure}", value)
                sha = "a" * 40
                evalsha = ("EVALSHA", sha, 2, "wks:lock:e1", "wks:lock-token:e1", "w1", 10_000)
                note("pack GET µs", pack_us(lambda: resp.pack("GET", "wks:session:s1"), 20_000))
                note("pack EVALSHA µs", pack_us(lambda e=evalsha: resp.pack(*e), 20_000))
        finally:
            server.stop()
    print(f"{options.rounds} rounds of {options.ops}; {'pinned' if pinned else 'unpinned'}")
    for name, values in figures.items():
        low, high = min(values), max(values)
        print(f"{name:28} {statistics.median(values):10.2f}   (rounds {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
