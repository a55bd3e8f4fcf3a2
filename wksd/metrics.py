"""Prometheus metrics, in a registry of the daemon's own (DESIGN section 7).

The seed documented three metrics and never built them; they are here under
their seed names. Everything else is ``wksd_``-prefixed. Label values are
bounded: an unknown method is counted as ``other``, never by the name a client
sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class _MemoryFigures(Protocol):
    evicted: int

    def __len__(self) -> int: ...


class _MemoryCollector(Collector):
    def __init__(self, store: _MemoryFigures) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "wksd_memory_keys", "Keys held by the memory store.", value=len(self._store)
        )
        yield CounterMetricFamily(
            "wksd_memory_evictions",
            "Keys evicted to make room in a full memory store: API-cache entries, "
            "then copies of what Redis holds.",
            value=self._store.evicted,
        )


class Metrics:
    def __init__(self) -> None:
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
            "1 while the Redis link is up, else 0.",
            registry=registry,
        )
        # -- wksd's own ----------------------------------------------------------
        self.requests = Counter(
            "wksd_requests_total",
            "Requests answered, by method and result code.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "wksd_request_duration_seconds",
            "Time to answer a request, by method.",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
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
        self.workflows_cleaned = Counter(
            "wksd_workflows_cleaned_total",
            "Active-set entries cleaned up.",
            registry=registry,
        )
        self.redis_connection_status.set(0)

    def set_backend(self, name: str) -> None:
        for backend in ("memory", "redis"):
            self.backend.labels(backend).set(1 if backend == name else 0)

    def observe_memory(self, store: _MemoryFigures) -> None:
        """Read the memory store's figures when scraped, not on every write."""
        self.registry.register(_MemoryCollector(store))

    def render(self) -> str:
        return generate_latest(self.registry).decode()
