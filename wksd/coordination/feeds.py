"""Live workflow events: pushed to subscribers, kept as history, shared via Redis.

Every change of a workflow becomes an event ``{"executionId", "type",
"state", "at"}``. ``Workflows`` asks for it before it writes the change
(``prepare``, its ``feed``), so the store records it in the history (a Redis
Stream per execution and one for all, bounded; the same in memory without
Redis) and publishes it for the other daemons sharing the Redis in the same
step as the change itself: one script, one round trip (``WorkflowSwap.event``).
Once the change is applied, ``deliver`` pushes it to this daemon's
subscribed connections (``workflow.event`` notifications); the other
daemons' hubs push it to theirs (``on_message``). Events carry this daemon's
``origin`` so it does not push its own twice.

Failing to record or publish an event never fails the change that caused it:
the change is what the worker asked for; the event is news about it.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Final

import structlog

from ..keys import KeySpace
from ..session import Session
from ..store.base import Store, WorkflowEvent

__all__ = ["MAX_HISTORY", "Feeds"]

log = structlog.get_logger("wksd.coordination.feeds")

#: Most events one ``workflow.events`` call returns.
MAX_HISTORY: Final = 1000

#: An event larger than this leaves the state's ``data`` out (and says so with
#: ``"dataOmitted": true``): a workflow's data may be 1 MiB, and its history
#: keeps a thousand events, which must not become a gigabyte in Redis.
MAX_EVENT_BYTES: Final = 64 * 1024


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class Feeds:
    def __init__(self, store: Store, keys: KeySpace, *, origin: str, retain_ms: int) -> None:
        self._store = store
        self._channel = keys.workflow_channel
        self._origin = origin
        # How our own messages begin: Redis sends them back to our subscription.
        self._own_prefix = b'{"origin":%s,' % _json(origin)
        self._retain_ms = retain_ms
        # execution id (None: every execution) -> subscribed sessions by id
        self._subscribers: dict[str | None, dict[int, Session]] = {}
        self._sessions: dict[int, set[str | None]] = {}

    @property
    def subscriptions(self) -> int:
        return sum(len(sessions) for sessions in self._subscribers.values())

    def prepare(self, kind: str, state: dict[str, Any]) -> tuple[WorkflowEvent, dict[str, Any]]:
        """The event of a change ``Workflows`` is about to write (``kind``: started,
        progress, completed, failed, cancelled or stale; ``state``: the new state):
        as the store records and publishes it, and as ``deliver`` pushes it."""
        event = {
            "executionId": state["executionId"],
            "type": kind,
            "state": state,
            "at": state.get("updatedAt", 0),
        }
        raw = _json(event)
        if len(raw) > MAX_EVENT_BYTES:
            event = {**event, "state": {**state, "data": {}}, "dataOmitted": True}
            raw = _json(event)
        # The envelope {"origin", "event"} around the JSON already made.
        message = b'%s"event":%s}' % (self._own_prefix, raw)
        return WorkflowEvent(raw, event["at"], self._retain_ms, self._channel, message), event

    def deliver(self, event: dict[str, Any]) -> None:
        """The change was applied: push its event to this daemon's subscribers."""
        sessions = {
            **self._subscribers.get(None, {}),
            **self._subscribers.get(event["executionId"], {}),
        }
        for session in sessions.values():
            session.push("workflow.event", [event])

    def on_message(self, message: bytes) -> None:
        """An event published by a daemon sharing the Redis (pub/sub); our own
        come back too, and are known by their first bytes without parsing."""
        if message.startswith(self._own_prefix):
            return
        try:
            envelope = json.loads(message)
            if envelope["origin"] != self._origin:
                self.deliver(envelope["event"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable workflow event message")

    # -- the methods ------------------------------------------------------------
    async def subscribe(self, session: Session, execution_id: str | None) -> str | None:
        """Push ``session`` the events of ``execution_id`` (None: of every
        execution) from now on; the id subscribed to."""
        if session.id not in self._sessions:
            self._sessions[session.id] = set()
            session.on_close(partial(self._drop, session.id))
        self._sessions[session.id].add(execution_id)
        self._subscribers.setdefault(execution_id, {})[session.id] = session
        return execution_id

    async def unsubscribe(self, session: Session, execution_id: str | None) -> bool:
        """End a subscription of ``session``; False when it had none to ``execution_id``."""
        subscribed = execution_id in self._sessions.get(session.id, set())
        if subscribed:
            self._sessions[session.id].discard(execution_id)
            self._remove(execution_id, session.id)
        return subscribed

    async def history(
        self, execution_id: str | None, since_ms: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Recorded events of ``execution_id`` (None: all) after ``since_ms``,
        oldest first, at most ``limit``."""
        since = -1 if since_ms is None else since_ms
        raw = await self._store.read_events(execution_id, since, limit)
        events = [json.loads(entry) for entry in raw]
        return [event for event in events if event["at"] > since][:limit]

    async def _drop(self, session_id: int) -> None:
        for execution_id in self._sessions.pop(session_id, set()):
            self._remove(execution_id, session_id)

    def _remove(self, execution_id: str | None, session_id: int) -> None:
        sessions = self._subscribers.get(execution_id)
        if sessions is not None:
            sessions.pop(session_id, None)
            if not sessions:
                del self._subscribers[execution_id]
