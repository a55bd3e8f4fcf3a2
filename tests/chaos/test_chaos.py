"""The chaos suite, short: every scenario under faults, then the zeros asserted.

About two minutes in all (``SHORT_DURATION`` of load, shared by the
scenarios, plus start-up and settling); ``WKSD_CHAOS_DURATION`` sets another
total. Deselect with ``-m "not chaos"``. The figures are printed (``-s``, or
in the failure) and written as JSON to ``$TMPDIR/wksd-chaos/figures-NAME.json``
(and ``figures.json`` in the test's tmp_path, beside the logs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .scenarios import SCENARIOS, SHORT_DURATION, run_suite, table, violations

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.redis_server,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server is not installed (.ci/run installs it); the chaos suite needs it",
    ),
]

DURATION = float(os.environ.get("WKSD_CHAOS_DURATION", SHORT_DURATION))
FIGURES = Path(tempfile.gettempdir()) / "wksd-chaos"
TOTAL_SHARE = sum(s.share for s in SCENARIOS.values())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_acknowledged_write_lost_no_delete_undone_no_overlap(name: str, tmp_path: Path) -> None:
    """Under the scenario's faults: 0 lost, 0 stale, 0 undone, 0 overlaps, tokens grow."""
    suite = run_suite(tmp_path, DURATION * SCENARIOS[name].share / TOTAL_SHARE, [name])
    suite["duration"] = round(suite["duration"], 1)
    text = json.dumps(suite, indent=2, default=str)
    (tmp_path / "figures.json").write_text(text)
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / f"figures-{name}.json").write_text(text)
    report = table(suite)
    print(report)
    broken = violations(suite["scenarios"][name])
    assert not broken, (
        f"{name}: {'; '.join(broken)}\n{report}\nfigures: {FIGURES}/figures-{name}.json"
    )
