"""The domain: sessions, the API cache, workflows and locks.

Written once against ``wksd.store.base.Store``; every rule of DESIGN
section 3 lives here, and both backends get it for free. Answers are typed
values (``Acquisition``, ``WorkflowStats``...); the method table
(``wksd.methods``) turns them into the wire's maps.
"""

from .documents import Documents
from .locks import Acquisition, Locks, LockState, LockStatus
from .workflows import Cleanup, Workflows, WorkflowStats, WorkflowStatus

__all__ = [
    "Acquisition",
    "Cleanup",
    "Documents",
    "LockState",
    "LockStatus",
    "Locks",
    "WorkflowStats",
    "WorkflowStatus",
    "Workflows",
]
