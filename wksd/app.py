"""The daemon: its parts, wired, and the one nursery tree they run in.

``Daemon`` builds the store, the domain services, the method table and the
server from a ``Config``. ``run`` binds the socket (or takes one handed over),
then runs the server, the memory sweeper and the workflow cleanup as children
of one nursery (STYLE habit 5). ``shutdown`` stops accepting and reading,
waits up to ``shutdown_timeout`` for every connection to answer what it has
read, then cancels the rest.
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
from .config import Config
from .coordination.feeds import MAX_HISTORY, Feeds
from .coordination.holds import Holds
from .coordination.singleflight import SingleFlight
from .dispatch import (
    MAX_TTL_SECONDS,
    Dispatcher,
    Method,
    Param,
    anything,
    bounded,
    finish_status,
    flag,
    identifier,
    integer,
    mapping,
    seconds,
    text,
    ttl,
)
from .domain import Documents, Locks, Workflows
from .http import bind_http, serve_http
from .keys import KeySpace
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

SESSION_TTL = 86400.0  # seconds (DESIGN section 4)
CACHE_TTL = 3600.0
LOCK_TTL = 300.0
#: A computing caller's lease, and how long others wait for it by default:
#: long enough for a slow API call, short enough that a hung one is replaced.
LEASE_TTL = 30.0
#: The longest a lock.acquire or cache.lease may wait: an hour.
MAX_WAIT = 3600.0


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
            redis = RedisTarget.from_config(config)
        self.durable = (
            None if not config.state_dir else DurableLog(Path(config.state_dir), config.fsync)
        )
        self.memory = MemoryStore(
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
                keys,
                self.metrics,
                timeout=config.redis_timeout,
                backoff_max=config.redis_retry_max,
                locks_fail_closed=config.locks_fail_closed,
            )
        )
        self.store: Store = self.memory if self.failover is None else self.failover
        self.sessions = Documents(self.store, keys.session, "session data")
        self.cache = Documents(self.store, keys.cache, "cache value")
        self.workflows = Workflows(
            self.store, keys, self.clock, stale_after=config.workflow_stale_after
        )
        self.locks = Locks(self.store, keys, self.clock)
        # Coordination beyond the seed (docs/protocol-extensions.md).
        self.origin = secrets.token_hex(6)  # tells this daemon's pub/sub messages apart
        self.lock_service = Holds(
            self.locks, self.store, keys, mark_volatile=self.memory.mark_volatile
        )
        self.events = Feeds(
            self.store, keys, origin=self.origin, retain_ms=self.workflows.running_ttl_ms
        )
        self.workflows.on_change = self.events.emit
        self.cache_flight = SingleFlight(self.store, keys, self.clock)
        self.metrics.observe_coordination(self)
        self.subscriber = (
            None
            if redis is None
            else Subscriber(
                redis,
                {
                    keys.lock_channel: self.lock_service.on_release_message,
                    keys.workflow_channel: self.events.on_message,
                    keys.cache_channel: self.cache_flight.on_message,
                },
                timeout=config.redis_timeout,
                backoff_max=config.redis_retry_max,
            )
        )
        self.dispatcher = Dispatcher(
            self._methods(),
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

    def _methods(self) -> list[Method]:
        sessions, cache, workflows, locks = self.sessions, self.cache, self.workflows, self.locks
        execution = Param("execution_id", identifier)
        worker = Param("worker_id", identifier)
        return [
            Method("ping", (), self.ping),
            Method("health", (), self.health),
            Method("metrics", (), self.metrics_text),
            Method(
                "session.set",
                (
                    Param("user_id", identifier),
                    Param("data", mapping),
                    Param("ttl", ttl, SESSION_TTL),
                ),
                sessions.set,
            ),
            Method("session.get", (Param("user_id", identifier),), sessions.get),
            Method("session.delete", (Param("user_id", identifier),), sessions.delete),
            Method(
                "session.touch",
                (Param("user_id", identifier), Param("ttl", ttl, SESSION_TTL)),
                sessions.touch,
            ),
            Method(
                "cache.set",
                (Param("key", identifier), Param("value", anything), Param("ttl", ttl, CACHE_TTL)),
                cache.set,
            ),
            Method("cache.get", (Param("key", identifier),), cache.get),
            Method("cache.delete", (Param("key", identifier),), cache.delete),
            Method(
                "workflow.start",
                (
                    execution,
                    Param("workflow_id", identifier),
                    Param("total_steps", integer(1)),
                    Param("data", mapping, {}),
                ),
                workflows.start,
            ),
            Method(
                "workflow.update",
                (
                    execution,
                    Param("completed_steps", integer(0)),
                    Param("current_step", text),
                    Param("data", mapping, None),
                ),
                workflows.update,
            ),
            Method(
                "workflow.complete",
                (
                    execution,
                    Param("status", finish_status),
                    Param("error", text, None),
                    Param("final_data", mapping, None),
                ),
                workflows.complete,
            ),
            Method("workflow.get", (execution,), workflows.get),
            Method("workflow.active", (), workflows.active),
            Method("workflow.active_detailed", (), workflows.active_detailed),
            Method("workflow.stats", (), workflows.stats),
            Method("workflow.cleanup", (), self._cleanup, admin=True),
            Method(
                "lock.acquire",
                (
                    execution,
                    worker,
                    Param("ttl", ttl, LOCK_TTL),
                    Param("keepalive", flag, False),
                    Param("wait", seconds(MAX_WAIT), 0.0),
                ),
                self.lock_service.acquire,
                session=True,
            ),
            Method("lock.release", (execution, worker), self.lock_service.release, session=True),
            Method("lock.extend", (execution, worker, Param("ttl", ttl, LOCK_TTL)), locks.extend),
            Method("lock.status", (execution,), locks.status),
            Method(
                "workflow.subscribe",
                (Param("execution_id", identifier, None),),
                self.events.subscribe,
                session=True,
            ),
            Method(
                "workflow.unsubscribe",
                (Param("execution_id", identifier, None),),
                self.events.unsubscribe,
                session=True,
            ),
            Method(
                "workflow.events",
                (
                    Param("execution_id", identifier, None),
                    Param("since_ms", integer(0), None),
                    Param("limit", bounded(1, MAX_HISTORY), 100),
                ),
                self.events.history,
            ),
            Method(
                "cache.lease",
                (
                    Param("key", identifier),
                    Param("lease_ttl", ttl, LEASE_TTL),
                    Param("wait", seconds(MAX_WAIT), LEASE_TTL),
                ),
                self.cache_flight.lease,
                session=True,
            ),
            Method(
                "cache.fill",
                (
                    Param("key", identifier),
                    Param("token", identifier),
                    Param("value", anything),
                    Param("ttl", ttl, CACHE_TTL),
                    Param("stale_ttl", seconds(MAX_TTL_SECONDS), 0.0),
                ),
                self.cache_flight.fill,
                session=True,
            ),
            Method(
                "cache.abandon",
                (Param("key", identifier), Param("token", identifier), Param("error", text, None)),
                self.cache_flight.abandon,
                session=True,
            ),
        ]

    async def _cleanup(self) -> dict[str, int]:
        result = await self.workflows.cleanup()
        self.metrics.workflows_cleaned.inc(result["cleaned"])
        if result["cleaned"] or result["errors"]:
            log.info("workflow cleanup", **result)
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
                await nursery.start(self.lock_service.run)
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
                await self._supervised("cleanup", self._cleanup)
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
