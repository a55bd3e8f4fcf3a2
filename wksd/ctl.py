"""``wksd ctl``: the operator's command line (placeholder, being written)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    raise SystemExit("wksd ctl: not written yet")
