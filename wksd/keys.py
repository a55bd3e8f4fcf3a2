"""The Redis key layout, shared with the seed's TypeScript app (DESIGN section 4).

The seed's keys keep their meaning exactly; wksd's own keys live under the same
prefix in namespaces the seed does not use, chosen so that no identifier can
make one key collide with another: ``lock:token:`` and ``lock:fencing`` can
never equal a ``lock:execution:`` key, whatever the execution id.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeySpace"]


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str = "wks:"

    # -- the seed's keys ---------------------------------------------------
    def session(self, user_id: str) -> str:
        return f"{self.prefix}session:{user_id}"

    def workflow(self, execution_id: str) -> str:
        return f"{self.prefix}workflow:{execution_id}"

    @property
    def workflow_prefix(self) -> str:
        return f"{self.prefix}workflow:"

    @property
    def active(self) -> str:
        """SET of the execution ids that are running."""
        return f"{self.prefix}executions:active"

    @property
    def lock_prefix(self) -> str:
        """Every lock key, token and the fencing counter start with it."""
        return f"{self.prefix}lock:"

    def lock(self, execution_id: str) -> str:
        """The holder's worker id, as a plain string."""
        return f"{self.prefix}lock:execution:{execution_id}"

    def cache(self, key: str) -> str:
        return f"{self.prefix}cache:api:{key}"

    @property
    def cache_prefix(self) -> str:
        return f"{self.prefix}cache:api:"

    # -- wksd's own keys ---------------------------------------------------
    @property
    def finished(self) -> str:
        """ZSET of recently finished execution ids, scored by completedAt (ms)."""
        return f"{self.prefix}executions:finished"

    def lock_token(self, execution_id: str) -> str:
        """The fencing token of the current holding; same TTL as the lock."""
        return f"{self.prefix}lock:token:{execution_id}"

    @property
    def fencing(self) -> str:
        """One counter for every lock: each fresh acquisition takes the next value."""
        return f"{self.prefix}lock:fencing"

    def cache_meta(self, key: str) -> str:
        """When a cached value stops being fresh (epoch ms), for stale-while-revalidate."""
        return f"{self.prefix}cache:meta:{key}"

    def cache_lease(self, key: str) -> str:
        """Who computes a missing value, cluster-wide (a short lock)."""
        return f"{self.prefix}cache:lease:{key}"

    def events(self, execution_id: str | None) -> str:
        """STREAM of workflow events: one execution's, or (None) every execution's."""
        if execution_id is None:
            return f"{self.prefix}events:workflows"
        return f"{self.prefix}events:workflow:{execution_id}"

    # -- pub/sub channels between the daemons sharing a Redis --------------
    @property
    def lock_channel(self) -> str:
        """Messages: an execution id whose lock was just released."""
        return f"{self.prefix}channel:lock-released"

    @property
    def workflow_channel(self) -> str:
        """Messages: {"origin": daemon, "event": workflow event} as JSON."""
        return f"{self.prefix}channel:workflow-events"

    @property
    def cache_channel(self) -> str:
        """Messages: a cache key that was just filled or abandoned."""
        return f"{self.prefix}channel:cache-filled"
