"""benchmarks/bench.py: one tiny run end to end, and the checks that make it fail loudly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from .processes import ROOT, require_binary

BENCH = ROOT / "benchmarks" / "bench.py"

#: A whole run with the smallest counts: 2 placements, 13 cases, 8 workers.
TINY_RUN_TIMEOUT = 300


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.mark.redis_server
def test_a_tiny_run_reports_every_goal_in_each_placement(tmp_path: Path) -> None:
    """A --quick run with tiny counts exits 0 and writes every figure of the
    issue's Goals table, judged, for each placement, with the checks counted."""
    require_binary("redis-server")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            *(sys.executable, str(BENCH), "--quick", "--rounds", "1", "--ops", "60"),
            *("--parallel-ops", "20", "--samples", "5", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=TINY_RUN_TIMEOUT,
        cwd=tmp_path,  # runs from anywhere
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    expected = ["pinned", "unpinned"] if len(os.sched_getaffinity(0)) >= 2 else ["unpinned"]
    assert [section["placement"] for section in report["placements"]] == expected
    for section in report["placements"]:
        rows = {row["label"]: row for row in section["figures"]}
        for label in bench.GOALS:
            assert isinstance(rows[label]["met"], bool), label
            assert rows[label]["value"] > 0, label
        assert section["visibility"]["samples"] == 5
        assert section["cases"][bench.READ_REDIS]["ops"] == 60
        assert section["cases"][bench.PARALLEL_READ_REDIS]["ops"] == 20 * bench.PROCESSES
    assert report["environment"]["redis-py uses hiredis"] is True
    version = tuple(int(part) for part in report["environment"]["redis-server"].split("."))
    if version < bench.CLIENT_SIDE_CACHE_SINCE:
        assert any("client-side cache skipped" in note for note in report["notes"])
    assert report["reads_checked"] > 0
    assert "session read, memory" in done.stdout


def keyspace(**values: Any) -> Any:
    space = bench.Keyspace("test")
    space.values = dict(values)
    return space


def test_a_stale_read_stops_the_run() -> None:
    """A read that does not return the last value written raises StaleRead."""
    space = keyspace(k={"version": 2})
    with pytest.raises(bench.StaleRead, match="last value written"):
        bench.timed_reads(lambda key: {"version": 1}, "reader", space, ["k"], 3, 0)
    assert len(bench.timed_reads(lambda key: {"version": 2}, "reader", space, ["k"], 3, 0)) == 3


def test_an_update_that_lost_a_write_stops_the_run() -> None:
    """The hand-written GET-modify-SET must read the completedSteps last written."""
    space = keyspace(w=4)
    with pytest.raises(bench.StaleRead, match="completedSteps 3"):
        bench.timed_updates(lambda key, completed: 3, "redis-py", space, ["w"], 1, 0)
    bench.timed_updates(lambda key, completed: 4, "redis-py", space, ["w"], 1, 0)
    assert space.values["w"] == 5


def fake_setup(space: Any, a: Any, b: Any) -> Any:
    readers = {"a": SimpleNamespace(read=a), "b": SimpleNamespace(read=b)}
    return SimpleNamespace(wksd=readers, cached=None, sessions=space)


def test_settling_counts_stale_reads_until_the_invalidation_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another client's write may be read stale until Redis's invalidation lands
    (counted); a daemon's own write never; one that never lands fails the run."""
    monkeypatch.setattr(bench, "hot_ids", lambda prefix: ["k"])
    monkeypatch.setattr(bench, "COHERENCE_TIMEOUT", 0.05)
    space = keyspace(k="new")
    answers = iter(["old", "old", "new"])
    counts: dict[str, int] = {}
    bench.settle(fake_setup(space, lambda key: "new", lambda key: next(answers)), "x", counts)
    assert counts == {"daemon B": 2}
    with pytest.raises(bench.StaleRead):
        bench.settle(fake_setup(space, lambda key: "old", lambda key: "new"), "daemon A", {})
    with pytest.raises(bench.StaleRead):
        bench.settle(fake_setup(space, lambda key: "new", lambda key: "old"), "daemon A", {})


def test_each_goal_is_judged_by_its_bound() -> None:
    """At most and at least bounds, as the issue's Goals table states them."""
    at_most = "session read, memory"
    assert bench.judged(at_most, "w", "p", "p50", 0.3).met is True
    assert bench.judged(at_most, "w", "p", "p50", 0.31).met is False
    at_least = f"{bench.PROCESSES} processes reading, Redis mode"
    assert bench.judged(at_least, "w", "p", "throughput", 1.2).met is True
    assert bench.judged(at_least, "w", "p", "throughput", 1.19).met is False
    assert bench.judged("no such goal", "w", "p", "p50", 9.0).met is None


def test_pinned_placement_keeps_redis_off_the_clients_cpu() -> None:
    """Pinned: the client side on one CPU, redis-server on another."""
    if len(os.sched_getaffinity(0)) < 2:
        chosen, note = bench.placements("both")
        assert [p.name for p in chosen] == ["unpinned"] and note
        return
    chosen, note = bench.placements("both")
    assert note is None
    pinned, unpinned = chosen
    assert len(pinned.clients) == len(pinned.redis) == 1
    assert set(pinned.clients).isdisjoint(pinned.redis)
    assert set(unpinned.clients) == set(unpinned.redis) == os.sched_getaffinity(0)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """--plot exits with the extra to install when matplotlib is missing."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"\.\[bench\]"):
        bench.require_matplotlib()


def test_counts_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "0"])
    assert "--ops must be at least 1" in capsys.readouterr().err
