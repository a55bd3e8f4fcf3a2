"""The daemon: its parts, wired, and the one nursery tree they run in.

``Daemon`` builds the store, the domain and coordination services, the
method table (``wksd.methods``) and the server from a ``Config``; each part
gets what it needs at construction. ``run`` binds the socket (or takes one
handed over), then runs the server, the memory sweeper and the workflow
cleanup as children of one nursery (STYLE habit 5). ``shutdown`` stops
accepting and reading, waits up to ``shutdown_timeout`` for every connection
to answer what it has read, then cancels the rest. The daemon's own methods
(``ping``, ``health``, ``metrics``, and ``workflow.cleanup`` counted and
logged) are here too, as they read its parts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from clientlib.errors import RemoteError

from . import __version__
from .access import AccessPolicy
from .clock import Clock, SystemClock
from .config import Config, redis_target
from .coordination.feeds import Feeds
from .coordination.holds import Holds
from .coordination.singleflight import SingleFlight
from .dispatch import Dispatcher
from .domain import Cleanup, Documents, Locks, Workflows
from .domain.workflows import running_ttl_ms
from .http import bind_http, serve_http
from .keys import KeySpace
from .methods import method_table
from .metrics import Metrics
from .server import Server, bind_unix_socket
from .store.base import Store
from .store.durable import DurableLog, lock_state_dir
from .store.failover import FailoverStore
from .store.memory import MemoryStore
from .store.redis_pubsub import Subscriber
from .store.redis_target import RedisTarget
from .systemd import Notifier, inherited_socket

__all__ = ["Daemon"]

log = structlog.get_logger("wksd")

T = TypeVar("T")


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        listen_socket: socket.socket | None = None,
        redis: RedisTarget | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """Build the daemon; ``ConfigError`` if the Redis settings are unusable."""
        self.config = config
        self.clock = clock or SystemClock()
        self.keys = keys = KeySpace(config.key_prefix)
        self.metrics = Metrics(redis_enabled=redis is not None or config.redis_enabled)
        if redis is None and config.redis_enabled:
            redis = redis_target(config)
        self.durable = (
            None if not config.state_dir else DurableLog(Path(config.state_dir), config.fsync)
        )
        self.memory = MemoryStore(
            keys=keys,
            clock=self.clock,
            max_keys=config.memory_max_keys,
            evictable=lambda key: key.startswith(keys.cache_prefix),
            protected=lambda key: key.startswith(keys.lock_prefix),
            keep_writes=redis is not None,
            log=self.durable,
        )
        self._state_lock = -1
        if self.durable is not None:
            self._open_state(self.durable)
        self.metrics.observe_memory(self.memory)
        self.metrics.set_backend("memory")
        self.failover = (
            None
            if redis is None
            else FailoverStore(
                self.memory,
                redis,
                self.metrics,
                timeout=config.redis_timeout,
                backoff_max=config.redis_retry_max,
                locks_fail_closed=config.locks_fail_closed,
                near_cache_bytes=config.near_cache_bytes,
            )
        )
        self.store: Store = self.memory if self.failover is None else self.failover
        self._build_services()
        self.subscriber = None if redis is None else self._subscriber(redis)
        self.dispatcher = Dispatcher(
            method_table(
                self,
                sessions=self.sessions,
                cache=self.cache,
                workflows=self.workflows,
                locks=self.locks,
                holds=self.holds,
                feeds=self.feeds,
                flights=self.flights,
            ),
            self.metrics,
            commit=None if self.durable is None else self.durable.commit,
        )
        self._listen_socket = listen_socket
        self._http_socket: socket.socket | None = None
        self._owns_path = False
        self.notifier = notifier or Notifier()
        if self.failover is not None:
            self.failover.on_backend_change(
                lambda backend: self.notifier.status(self._status_line())
            )
        self._started = time.monotonic()
        self._stop = trio.Event()
        self.server: Server | None = None

    def _build_services(self) -> None:
        """The domain's services over the store, and the coordination beyond
        the seed (docs/protocol-extensions.md), with the metrics that read them."""
        store, keys, clock, config = self.store, self.keys, self.clock, self.config
        self.sessions = Documents(store, keys.session, "session data")
        self.cache = Documents(store, keys.cache, "cache value")
        self.origin = secrets.token_hex(6)  # tells this daemon's pub/sub messages apart
        self.feeds = Feeds(
            store,
            keys,
            origin=self.origin,
            retain_ms=running_ttl_ms(config.workflow_stale_after),
        )
        self.workflows = Workflows(
            store,
            keys,
            clock,
            stale_after=config.workflow_stale_after,
            sleep=trio.sleep,
            feed=self.feeds,
        )
        self.locks = Locks(store, keys, clock)
        self.holds = Holds(self.locks, store, keys, mark_volatile=self.memory.mark_volatile)
        self.flights = SingleFlight(store, keys, clock)
        self.metrics.observe_coordination(self.holds, self.feeds, self.flights)

    def _subscriber(self, redis: RedisTarget) -> Subscriber:
        """The pub/sub link that tells the coordination services what other
        daemons sharing the Redis did."""
        keys = self.keys
        return Subscriber(
            redis,
            {
                keys.lock_channel: self.holds.on_release_message,
                keys.workflow_channel: self.feeds.on_message,
                keys.cache_channel: self.flights.on_message,
            },
            timeout=self.config.redis_timeout,
            backoff_max=self.config.redis_retry_max,
        )

    def _open_state(self, durable: DurableLog) -> None:
        """Lock the state directory and replay it into memory.

        ``StateDirInUse`` if another daemon has it, ``CorruptState`` if a file
        is damaged, ``OSError`` if it cannot be made or read.
        """
        self._state_lock = lock_state_dir(durable.directory)
        try:
            started = time.perf_counter()
            held = self.memory.load(durable.open())
            durable.set_freeze(self.memory.freeze)
        except BaseException:
            durable.close()
            os.close(self._state_lock)
            raise
        log.info(
            "state replayed",
            state_dir=str(durable.directory),
            keys=held,
            ops=durable.replayed_ops,
            seconds=round(time.perf_counter() - started, 3),
            fsync=durable.fsync,
        )

    def shutdown(self) -> None:
        """Ask ``run`` to drain and return (safe to call more than once)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- methods that belong to the daemon itself ----------------------------
    async def ping(self) -> str:
        return "PONG"

    @property
    def backend(self) -> str:
        return "memory" if self.failover is None else self.failover.backend

    async def health(self) -> dict[str, Any]:
        """healthy: serving as configured; degraded: Redis enabled but memory
        serving; unhealthy: memory serving and full, so writes fail."""
        redis_status, latency = "disabled", None
        if self.failover is not None:
            redis_status, latency = await self.failover.ping()
        backend = self.backend
        if backend == "memory" and self.memory.full:
            status = "unhealthy"
        elif self.failover is not None and backend == "memory":
            status = "degraded"
        else:
            status = "healthy"
        redis_check: dict[str, Any] = {"status": redis_status, "latency": latency}
        if self.subscriber is not None:
            redis_check["pubsub"] = "up" if self.subscriber.subscribed.is_set() else "down"
        return {
            "status": status,
            "backend": backend,
            "checks": {
                "redis": redis_check,
                "memory": {
                    "status": "full" if self.memory.full else "up",
                    "keys": len(self.memory),
                },
            },
            "uptime": round(time.monotonic() - self._started, 3),
            "version": __version__,
        }

    async def metrics_text(self) -> str:
        return self.metrics.render()

    async def cleanup(self) -> Cleanup:
        """``workflow.cleanup``, counted and logged."""
        result = await self.workflows.cleanup()
        self.metrics.workflows_cleaned.inc(result.cleaned)
        if result.cleaned or result.errors:
            log.info("workflow cleanup", cleaned=result.cleaned, errors=result.errors)
        return result

    # -- running -------------------------------------------------------------------
    def listen(self) -> None:
        """Take the socket systemd passed, or bind our own, and bind the metrics
        port if asked; errors (a path or port in use) surface here, as OSError."""
        if self.config.metrics_addr is not None and self._http_socket is None:
            self._http_socket = bind_http(self.config.metrics_addr)
        if self._listen_socket is not None:
            return
        inherited = inherited_socket()
        if inherited is not None:
            self._listen_socket = inherited
            return
        config = self.config
        self._listen_socket = bind_unix_socket(config.socket, config.socket_mode)
        self._owns_path = True

    def _status_line(self) -> str:
        """What systemctl status shows after "Status:"."""
        if self.failover is None:
            return "serving from memory (Redis disabled)"
        if self.failover.backend == "redis":
            return "serving from Redis"
        return f"serving from memory; Redis {self.failover.redis_status}, reconnecting"

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.listen()
        sock = self._listen_socket
        assert sock is not None
        try:
            socket_gid = _socket_gid(sock)
            policy = AccessPolicy.from_config(config, socket_gid)
            self.server = server = Server(
                self.dispatcher,
                policy,
                self.metrics,
                max_message_bytes=config.max_message_bytes,
                max_connections=config.max_connections,
                max_connections_per_uid=config.max_connections_per_uid,
            )
            async with trio.open_nursery() as nursery:
                if self.durable is not None:
                    await nursery.start(self.durable.run)
                nursery.start_soon(self._sweep_forever)
                await nursery.start(self.holds.run)
                if self.subscriber is not None:
                    await nursery.start(self.subscriber.run)
                if self.failover is not None:
                    await nursery.start(self.failover.run)
                if config.cleanup_interval:
                    nursery.start_soon(self._cleanup_forever)
                if self._http_socket is not None:
                    # Before the socket answers: once a client is served,
                    # /health is up too.
                    await nursery.start(serve_http, self._http_socket, self)
                await nursery.start(server.serve, sock)
                if self.failover is not None:
                    # READY says where data goes: give Redis one connection
                    # attempt's time first (memory serves meanwhile).
                    with trio.move_on_after(2 * config.redis_timeout):
                        await self.failover.wait_first_attempt()
                nursery.start_soon(self.notifier.watchdog_forever)
                log.info(
                    "serving",
                    socket=_socket_name(sock) or config.socket,
                    version=__version__,
                    redis="disabled" if self.failover is None else "enabled",
                    activated=not self._owns_path,
                )
                self.notifier.ready(self._status_line())
                task_status.started(self)
                await self._stop.wait()
                self.notifier.stopping()
                log.info("stopping", connections=server.connection_count)
                server.stop_accepting()
                self._stop_listening(sock)
                with trio.move_on_after(config.shutdown_timeout) as grace:
                    await server.drain()
                if grace.cancelled_caught:
                    log.warning(
                        "shutdown timeout; closing connections still busy",
                        connections=server.connection_count,
                    )
                nursery.cancel_scope.cancel()
        finally:
            self._stop_listening(sock)
            if self._http_socket is not None:
                self._http_socket.close()
            self._say_what_is_left()
            if self.durable is not None:
                await self.durable.aclose()
            if self._state_lock >= 0:
                os.close(self._state_lock)
                self._state_lock = -1
        log.info("stopped")

    def _say_what_is_left(self) -> None:
        """At exit, outage writes not yet written back are either in the
        journal (written back after the restart) or, memory only, gone: say which."""
        pending = 0 if self.failover is None else self.failover.pending_writes
        if not pending:
            return
        if self.durable is not None:
            log.warning(
                "stopping during an outage; the writes not yet written back are in the "
                "journal and go back to Redis after the restart",
                pending_writes=pending,
                state_dir=str(self.durable.directory),
            )
        else:
            log.error(
                "stopping during an outage without a state directory; "
                "the writes not yet written back are lost",
                pending_writes=pending,
            )

    def _stop_listening(self, sock: socket.socket) -> None:
        """Close the listening socket, and remove its path if it is ours.

        Done when the drain begins: a client that reconnects then must be
        refused at once (or, under socket activation, wait in systemd's copy
        of the socket for the next daemon), not be queued in a backlog that
        nobody will accept from.
        """
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)  # wakes the accept loop if it waits
            sock.close()
        if self._owns_path:
            _unlink_quietly(self.config.socket)
            self._owns_path = False

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.config.sweep_interval)
            freed = await self._supervised("sweeper", self.memory.sweep)
            if freed:
                self.metrics.sweeper_evictions.inc(freed)

    async def _cleanup_forever(self) -> None:
        while True:
            await trio.sleep(self.config.cleanup_interval)
            try:
                await self._supervised("cleanup", self.cleanup)
            except RemoteError as exc:
                log.warning("workflow cleanup failed", error=exc.code)
            if self.durable is not None:
                # Nobody is answered for this work: flush it now anyway.
                await self._supervised("journal", self.durable.commit)

    async def _supervised(self, task: str, step: Callable[[], Awaitable[T]]) -> T | None:
        """Run one round of background work; a bug in it is logged with its
        traceback and counted, and the next round runs as usual (None here).

        Errors that are answers (``RemoteError``) pass through to the caller.
        """
        try:
            return await step()
        except RemoteError:
            raise
        except Exception:
            self.metrics.supervisor_errors.labels(task).inc()
            log.exception("background task failed; it runs again next round", task=task)
            return None


def _socket_name(sock: socket.socket) -> str | None:
    name = sock.getsockname()
    return name if isinstance(name, str) and name else None


def _socket_gid(sock: socket.socket) -> int | None:
    """The group of the socket's file (SocketGroup= when systemd made it)."""
    try:
        name = _socket_name(sock)
        return os.stat(name).st_gid if name else None
    except OSError:
        return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
