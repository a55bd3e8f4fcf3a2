"""``python -m tests.chaos``: run the chaos suite, print its figures, write them as JSON.

Exit status 0 when the promise held (0 acknowledged writes lost, 0 deletes
undone, 0 overlapping holdings in fail-closed mode, tokens growing), 1 when
it did not, 2 when redis-server is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .scenarios import SCENARIOS, SHORT_DURATION, run_suite, table, violations


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=SHORT_DURATION,
        help=f"seconds of load over all scenarios, shared by weight (default {SHORT_DURATION:g})",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default all)",
    )
    parser.add_argument("--fsync", default="everysec", choices=["always", "everysec", "no"])
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="negative control: WKSD_STATE_DIR empty, so restarts must show losses",
    )
    parser.add_argument(
        "--fail-open",
        action="store_true",
        help="negative control: locks fail-open, so outages must show overlaps",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default a temp dir)")
    parser.add_argument(
        "--json", type=Path, help="write the figures here (default WORKDIR/figures.json)"
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("chaos: redis-server is not installed (.ci/run installs it)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wksd-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    suite = run_suite(
        workdir,
        args.duration,
        args.scenario or tuple(SCENARIOS),
        args.fsync,
        durable=not args.memory_only,
        fail_open=args.fail_open,
    )
    out = args.json or workdir / "figures.json"
    out.write_text(json.dumps(suite, indent=2, default=str))
    print(table(suite))
    print(f"figures: {out}; logs and data: {workdir}")
    return 1 if any(violations(r) for r in suite["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
