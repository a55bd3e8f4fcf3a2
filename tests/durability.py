"""Helpers for the durability tests: replay a state directory, compare states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wksd.clock import Clock
from wksd.store.durable import DurableLog
from wksd.store.memory import MemoryStore


def replayed(directory: Path, clock: Clock, **settings: Any) -> MemoryStore:
    """A fresh memory store loaded from ``directory`` (its log closed again)."""
    log = DurableLog(directory)
    memory = MemoryStore(clock=clock, log=log, **settings)
    memory.load(log.open())
    log.close()
    return memory


def live_state(memory: MemoryStore) -> dict[str, Any]:
    """What a reader can see: unexpired keys with values and deadlines, event
    histories, and the ops of other owners."""
    now = memory._now()
    keys = {}
    for key, value in memory._data.items():
        deadline = memory._deadlines.get(key)
        if deadline is not None and deadline <= now:
            continue
        keys[key] = (
            value
            if isinstance(value, bytes)
            else sorted(value.items())
            if isinstance(value, dict)
            else sorted(value),
            deadline,
        )
    return {
        "keys": keys,
        "events": {
            execution_id: list(log)
            for execution_id, log in memory._event_logs.items()
            if memory._event_expiry.get(execution_id, 0) > now
        },
        "all_events": list(memory._all_events),
    }


def assert_same_state(original: MemoryStore, copy: MemoryStore) -> None:
    before, after = live_state(original), live_state(copy)
    assert after["keys"] == before["keys"]
    assert after["events"] == before["events"]
    assert after["all_events"] == before["all_events"]
