"""Prometheus metrics, in a registry of the daemon's own (DESIGN section 7).

The seed documented three metrics and never built them; they are here under
their seed names. Everything else is ``wksd_``-prefixed. Label values are
bounded: an unknown method is counted as ``other``, never by the name a client
sent.

Requests are counted by ``RequestStats`` in plain dicts rather than with
prometheus-client's Counter and Histogram: those take a lock on every update,
which costs more than answering a memory hit, and the daemon answers all its
requests on one thread. A collector turns the dicts into the same families at
scrape time.

Beside the daemon's own figures the registry holds prometheus-client's
``process_*`` family (CPU, memory, fds, start time, read from /proc at scrape
time) and ``wksd_build_info``, so a dashboard can tell restarts and versions
apart. ``redis_connection_status`` is 0 on the embedded default, where no
Redis is configured; ``wksd_redis_enabled`` says which case a 0 is, so an
alert for "Redis down" can leave the embedded default alone.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterator
from importlib.metadata import version
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__

__all__ = ["Metrics"]

# The _created series double the exposition and no dashboard reads them; the
# switch is process-wide, and this process is the daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Request latencies span a memory hit (tens of µs) to a Redis timeout (1 s+).
_DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: wksd_build_info's labels: what an operator asks first when two hosts differ.
_BUILD = {
    "version": __version__,
    "python": platform.python_version(),
    "redis_py": version("redis"),
}


class _MemoryFigures(Protocol):
    evicted: int
    max_keys: int

    def __len__(self) -> int: ...


class _MemoryCollector(Collector):
    def __init__(self, store: _MemoryFigures) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "wksd_memory_keys", "Keys held by the memory store.", value=len(self._store)
        )
        yield GaugeMetricFamily(
            "wksd_memory_max_keys",
            "The memory store's bound on keys (WKSD_MEMORY_MAX_KEYS).",
            value=self._store.max_keys,
        )
        yield CounterMetricFamily(
            "wksd_memory_evictions",
            "Keys evicted to make room in a full memory store: API-cache entries, "
            "then copies of what Redis holds.",
            value=self._store.evicted,
        )


class _NearFigures(Protocol):
    """What the near cache (``wksd.store.near_cache.NearCache``) counts."""

    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    pushed_keys: int
    invalidations: dict[str, int]

    def __len__(self) -> int: ...


class _NearCollector(Collector):
    def __init__(self, cache: _NearFigures) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        yield CounterMetricFamily(
            "wksd_near_cache_hits", "Reads answered by the near cache.", value=cache.hits
        )
        yield CounterMetricFamily(
            "wksd_near_cache_misses", "Reads the near cache sent to Redis.", value=cache.misses
        )
        dropped = CounterMetricFamily(
            "wksd_near_cache_invalidations",
            "Near-cache entries dropped: named by a push (key), FLUSHALL/FLUSHDB "
            "(flush), the link lost or renewed (connection), past their TTL (expired).",
            labels=["reason"],
        )
        for reason, count in cache.invalidations.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "wksd_near_cache_evictions",
            "Near-cache entries evicted, least recently used first, to stay in its bound.",
            value=cache.evictions,
        )
        yield CounterMetricFamily(
            "wksd_near_cache_pushed_keys",
            "Keys named in Redis's invalidation pushes, held here or not (tracking's cost).",
            value=cache.pushed_keys,
        )
        yield GaugeMetricFamily(
            "wksd_near_cache_bytes",
            "Bytes the near cache holds (as it counts them).",
            value=cache.bytes,
        )
        yield GaugeMetricFamily(
            "wksd_near_cache_max_bytes",
            "The near cache's bound (WKSD_NEAR_CACHE_BYTES).",
            value=cache.max_bytes,
        )
        yield GaugeMetricFamily(
            "wksd_near_cache_entries", "Keys the near cache holds.", value=len(cache)
        )


class _HoldFigures(Protocol):
    """What the lock holds (``wksd.coordination.holds.Holds``) count."""

    @property
    def waiting(self) -> int: ...

    @property
    def kept(self) -> int: ...


class _FeedFigures(Protocol):
    """What the workflow feeds (``wksd.coordination.feeds.Feeds``) count."""

    @property
    def subscriptions(self) -> int: ...


class _FlightFigures(Protocol):
    """What the single flights (``wksd.coordination.singleflight``) count."""

    @property
    def flights(self) -> int: ...

    @property
    def waiters(self) -> int: ...


class _CoordinationCollector(Collector):
    def __init__(self, holds: _HoldFigures, feeds: _FeedFigures, flights: _FlightFigures) -> None:
        self._holds = holds
        self._feeds = feeds
        self._flights = flights

    def collect(self) -> Iterator[Metric]:
        for name, help_text, value in (
            (
                "wksd_lock_waiters",
                "lock.acquire requests waiting for a lock.",
                self._holds.waiting,
            ),
            (
                "wksd_keepalive_locks",
                "Locks kept alive for their connections.",
                self._holds.kept,
            ),
            (
                "wksd_workflow_subscriptions",
                "workflow.subscribe subscriptions open.",
                self._feeds.subscriptions,
            ),
            (
                "wksd_cache_flights",
                "Missing cache values being computed.",
                self._flights.flights,
            ),
            (
                "wksd_cache_waiters",
                "Callers waiting for a value another caller computes.",
                self._flights.waiters,
            ),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


class RequestStats(Collector):
    """wksd_requests_total{method,code} and wksd_request_duration_seconds{method}."""

    def __init__(self, buckets: tuple[float, ...] = _DURATION_BUCKETS) -> None:
        self._buckets = buckets
        self._counts: dict[tuple[str, str], int] = {}
        # method -> [count per bucket..., count above the last bucket]; and sums
        self._histograms: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        histogram = self._histograms.get(method)
        if histogram is None:
            histogram = self._histograms[method] = [0] * (len(self._buckets) + 1)
            self._sums[method] = 0.0
        histogram[bisect_left(self._buckets, seconds)] += 1
        self._sums[method] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "wksd_requests",
            "Requests answered, by method and result code.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(self._counts.items()):
            requests.add_metric([method, code], count)
        yield requests
        durations = HistogramMetricFamily(
            "wksd_request_duration_seconds",
            "Time to answer a request, by method.",
            labels=["method"],
        )
        for method, histogram in sorted(self._histograms.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, self._buckets), "+Inf"), histogram, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([method], cumulative, self._sums[method])
        yield durations


class Metrics:
    """The daemon's registry, and the metrics its parts update."""

    def __init__(self, *, redis_enabled: bool = False) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # -- the seed's names ------------------------------------------------
        self.redis_commands = Counter(
            "redis_commands_total",
            "Redis commands sent, by command.",
            ["command"],
            registry=registry,
        )
        self.redis_commands_failed = Counter(
            "redis_commands_failed_total",
            "Redis commands that failed or timed out.",
            ["command"],
            registry=registry,
        )
        self.redis_connection_status = Gauge(
            "redis_connection_status",
            "1 while the Redis link is up, else 0; always 0 on the embedded default "
            "(no Redis configured, the memory store serving), where wksd_redis_enabled is 0.",
            registry=registry,
        )
        # -- wksd's own ----------------------------------------------------------
        self.requests = RequestStats()
        registry.register(self.requests)
        self.connections = Gauge(
            "wksd_connections",
            "Client connections open now.",
            registry=registry,
        )
        self.connections_total = Counter(
            "wksd_connections_accepted_total",
            "Client connections accepted.",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "wksd_protocol_errors_total",
            "Connections closed for undecodable input.",
            registry=registry,
        )
        self.notifications_dropped = Counter(
            "wksd_client_notifications_dropped_total",
            "Notifications from clients that were not applied (never answered, DESIGN 2.1), "
            "by reason: the error code, or WAIT for a call that would have waited.",
            ["reason"],
            registry=registry,
        )
        self.waits_abandoned = Counter(
            "wksd_waits_abandoned_total",
            "Waiting requests cancelled because their peer closed the connection.",
            registry=registry,
        )
        self.connections_refused = Counter(
            "wksd_connections_refused_total",
            "Connections closed after one answer, by reason: total and per_uid (a "
            "connection cap), forbidden (not on the allow-lists), busy (too many "
            "being refused already: closed unanswered).",
            ["reason"],
            registry=registry,
        )
        self.accept_errors = Counter(
            "wksd_accept_errors_total",
            "accept() calls that failed for want of fds or memory (EMFILE, ENFILE, "
            "ENOBUFS, ENOMEM); each is retried.",
            registry=registry,
        )
        self.pushes_dropped = Counter(
            "wksd_pushes_dropped_total",
            "Notifications to a client (workflow events) dropped because its backlog was "
            "full, in count or bytes.",
            registry=registry,
        )
        self.backend = Gauge(
            "wksd_backend",
            "1 for the backend serving requests now.",
            ["backend"],
            registry=registry,
        )
        self.sweeper_evictions = Counter(
            "wksd_sweeper_evictions_total",
            "Expired keys freed by the memory sweeper.",
            registry=registry,
        )
        self.redis_reconnects = Counter(
            "wksd_redis_reconnects_total",
            "Successful reconnections to Redis.",
            registry=registry,
        )
        self.reconciled_keys = Counter(
            "wksd_reconciled_keys_total",
            "Keys written back to Redis after an outage, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.supervisor_errors = Counter(
            "wksd_supervisor_errors_total",
            "Unexpected errors in background work that was logged and retried, by task "
            "(reconnect, write_back, ping, mirror).",
            ["task"],
            registry=registry,
        )
        self.workflows_cleaned = Counter(
            "wksd_workflows_cleaned_total",
            "Active-set entries cleaned up.",
            registry=registry,
        )
        self.redis_connection_status.set(0)
        # -- the process, and what is running -----------------------------------
        ProcessCollector(registry=registry)
        Info(
            "wksd_build",
            "Versions of wksd, Python and redis-py in this process (value 1).",
            registry=registry,
        ).info(_BUILD)
        Gauge(
            "wksd_redis_enabled",
            "1 when Redis is configured (redis_connection_status then means something), "
            "0 on the embedded default (the memory store only).",
            registry=registry,
        ).set(1 if redis_enabled else 0)

    def set_backend(self, name: str) -> None:
        for backend in ("memory", "redis"):
            self.backend.labels(backend).set(1 if backend == name else 0)

    def observe_memory(self, store: _MemoryFigures) -> None:
        """Read the memory store's figures when scraped, not on every write."""
        self.registry.register(_MemoryCollector(store))

    def observe_coordination(
        self, holds: _HoldFigures, feeds: _FeedFigures, flights: _FlightFigures
    ) -> None:
        """Waiters, keepalive locks, subscriptions and cache flights, read when scraped."""
        self.registry.register(_CoordinationCollector(holds, feeds, flights))

    def observe_near_cache(self, cache: _NearFigures) -> None:
        """The near cache's hits, misses, invalidations and bytes, read when scraped."""
        self.registry.register(_NearCollector(cache))

    def render(self) -> str:
        return generate_latest(self.registry).decode()
