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
