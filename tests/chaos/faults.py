"""The fault thread: kills, freezes and restarts Redis and the daemons, on a cycle.

A scenario names its faults; the thread runs them in turn, with a pause
between, until told to stop. Each fault leaves things as it found them (Redis
up and running, every daemon serving), so the next one, and the settle phase,
start from a known state. Every fault is logged with its time, so a figure
can be read against what happened when.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..redis_server import RedisServer
from .procs import ChaosDaemon

#: How long Redis stays down in a kill, or frozen in a freeze: several times
#: the daemon's Redis timeout, so every one is an outage the daemon notices,
#: and long enough for a few hundred writes to land in its journal.
OUTAGE = 2.0

#: The pause between two faults: the daemon reconnects (backoff capped at
#: 0.5 s) and writes its journal back, so faults hit both calm and recovery.
GAP = 1.5


@dataclass
class Faults:
    """What a fault acts on. ``redis`` None: the embedded default."""

    redis: RedisServer | None
    daemons: Sequence[ChaosDaemon]
    gap: float = GAP
    stop: threading.Event = field(default_factory=threading.Event)
    events: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def _pause(self, seconds: float) -> None:
        time.sleep(seconds)  # not cut short by stop: a fault always finishes

    def _note(self, name: str, detail: str = "") -> None:
        self.events.append({"t": time.time(), "fault": name, "detail": detail})

    @property
    def _redis(self) -> RedisServer:
        assert self.redis is not None, "a Redis fault in a scenario without Redis"
        return self.redis

    # -- the faults ------------------------------------------------------
    def redis_kill(self) -> None:
        """SIGKILL redis-server, keep it down, restart it on the same port (AOF reloads)."""
        self._redis.kill()
        self._pause(OUTAGE)
        self._redis.start()

    def redis_freeze(self) -> None:
        """SIGSTOP redis-server (connections open, nothing answers), then SIGCONT."""
        self._redis.pause()
        try:
            self._pause(OUTAGE)
        finally:
            self._redis.resume()

    def daemon_term(self) -> None:
        """SIGTERM each daemon and start it again."""
        for daemon in self.daemons:
            daemon.restart(signal.SIGTERM)

    def daemon_kill(self) -> None:
        """SIGKILL each daemon and start it again."""
        for daemon in self.daemons:
            daemon.restart(signal.SIGKILL)

    def daemon_kill_in_outage(self) -> None:
        """Redis down; writes go to the journal; SIGKILL the daemon, restart it; Redis back."""
        self._in_outage(signal.SIGKILL)

    def daemon_term_in_outage(self) -> None:
        """As ``daemon_kill_in_outage``, with SIGTERM."""
        self._in_outage(signal.SIGTERM)

    def _in_outage(self, sig: int) -> None:
        self._redis.kill()
        try:
            self._pause(OUTAGE / 2)
            for daemon in self.daemons:
                daemon.restart(sig)  # starts, and serves, with Redis still down
            self._pause(OUTAGE / 2)
        finally:
            self._redis.start()

    # -- the cycle -------------------------------------------------------
    def run(self, names: Sequence[str]) -> None:
        """Run the named faults in turn until ``stop`` is set (the thread's body)."""
        actions: dict[str, Callable[[], None]] = {name: getattr(self, name) for name in names}
        index = 0
        while not self.stop.wait(self.gap):
            name = names[index % len(names)]
            index += 1
            self._note(name, "begin")
            try:
                actions[name]()
            except Exception:
                self.errors.append(f"{name}: {traceback.format_exc(limit=3)}")
                self._note(name, "error")
            else:
                self.counts[name] += 1
                self._note(name, "end")

    def restore(self) -> None:
        """After the run: Redis up and answering, every daemon serving."""
        if self.redis is not None:
            process = self.redis.process
            if process is not None and process.poll() is None:
                self.redis.resume()
            else:
                self.redis.start()
        for daemon in self.daemons:
            if not daemon.running():
                daemon.start()
