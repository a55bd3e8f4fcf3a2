"""Shared fixtures: a controllable clock, and the store under test.

``store`` is parametrised over the backends, so every domain test runs
against each of them (STYLE habit 8).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.store.base import Store
from wksd.store.memory import MemoryStore

from .processes import DaemonProcess

BACKENDS = ["memory"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace("wks:")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, clock: ManualClock) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(clock=clock)


class Domain:
    """The four domain services over one store, as the daemon wires them."""

    def __init__(self, store: Store, keys: KeySpace, clock: ManualClock) -> None:
        from wksd.domain import Documents, Locks, Workflows

        self.store = store
        self.keys = keys
        self.clock = clock
        self.sessions = Documents(store, keys.session, "session data")
        self.cache = Documents(store, keys.cache, "cache value")
        self.workflows = Workflows(store, keys, clock, stale_after=3600)
        self.locks = Locks(store, keys, clock)


@pytest.fixture
def domain(store: Store, keys: KeySpace, clock: ManualClock) -> Domain:
    return Domain(store, keys, clock)


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path short enough for sockaddr_un (tmp_path can exceed 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="wksd-", dir="/tmp") as directory:
        yield os.path.join(directory, "wksd.sock")


@pytest.fixture
def daemon_process(sock_path: str) -> Iterator[DaemonProcess]:
    """The real daemon binary on its memory default, serving on ``sock_path``."""
    daemon = DaemonProcess(sock_path).start()
    yield daemon
    daemon.close()
