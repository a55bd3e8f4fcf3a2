"""The domain: sessions, the API cache, workflows and locks.

Written once against ``wksd.store.base.Store``; every rule of DESIGN
section 3 lives here, and both backends get it for free.
"""

from .documents import Documents
from .locks import Locks
from .workflows import Workflows

__all__ = ["Documents", "Locks", "Workflows"]
