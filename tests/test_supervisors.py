"""Background work that fails is logged, counted and run again (wksd.app)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wksd.app import Daemon
from wksd.clock import ManualClock
from wksd.config import Config


async def test_a_failing_sweep_does_not_end_the_sweeper(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug in one sweep is logged with its traceback and counted; the next sweep runs."""
    clock, interval = ManualClock(), 60
    daemon = Daemon(Config(sweep_interval=interval), clock=clock)
    await daemon.memory.set("k", b"v", 1000)
    clock.advance(2)
    real_sweep = daemon.memory.sweep
    calls = 0

    async def sweep_once_broken() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug in the sweeper")
        return await real_sweep()

    monkeypatch.setattr(daemon.memory, "sweep", sweep_once_broken)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._sweep_forever)
        await trio.sleep(interval + 1)
        assert len(daemon.memory) == 1  # the first sweep failed
        await trio.sleep(interval)
        assert len(daemon.memory) == 0  # the second one ran
        nursery.cancel_scope.cancel()
    assert 'wksd_supervisor_errors_total{task="sweeper"} 1.0' in daemon.metrics.render()
    assert "a bug in the sweeper" in capsys.readouterr().out


async def test_a_failing_cleanup_does_not_end_the_cleanup_task(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic workflow cleanup survives an unexpected error too."""
    daemon = Daemon(Config(cleanup_interval=10), clock=ManualClock())
    calls = 0

    async def cleanup() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug in the cleanup")
        return {"cleaned": 0, "errors": 0}

    monkeypatch.setattr(daemon, "cleanup", cleanup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._cleanup_forever)
        await trio.sleep(35)
        nursery.cancel_scope.cancel()
    assert calls == 3
    assert 'wksd_supervisor_errors_total{task="cleanup"} 1.0' in daemon.metrics.render()
