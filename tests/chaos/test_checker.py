"""The chaos checker's judgements, on hand-made logs: it finds what it must, and no more.

Fast and without processes, so a change to the checker is tested even where
the chaos run is deselected.
"""

from __future__ import annotations

from typing import Any

from .checker import MISSING, check_keys, check_locks, expectations, judge


def op(
    key: str, kind: str, seq: int, ok: bool = True, doubt: bool = False, **extra: Any
) -> dict[str, Any]:
    record = {"kind": "session", "key": key, "op": kind, "seq": seq, "ok": ok}
    record.update(err=None if ok else "ConnectionLost", doubt=doubt, t0=seq, t1=seq + 0.5, **extra)
    return record


def only(records: list[dict[str, Any]]) -> Any:
    found, _ = expectations(records)
    (expect,) = found
    return expect


def test_the_last_acknowledged_write_is_the_one_to_read() -> None:
    """Its seq is ok; nothing is lost; an older seq is stale."""
    expect = only([op("k", "set", 1), op("k", "set", 2)])
    assert judge(expect, 2) == "ok"
    assert judge(expect, MISSING) == "lost"
    assert judge(expect, 1) == "stale"
    assert judge(expect, 7) == "unexplained"


def test_an_acknowledged_delete_must_stay_deleted() -> None:
    """A value read after an acknowledged delete is an undone delete."""
    expect = only([op("k", "set", 1), op("k", "delete", 2)])
    assert judge(expect, MISSING) == "ok"
    assert judge(expect, 1) == "undone_deletes"


def test_calls_in_doubt_after_the_last_ack_may_be_what_is_read() -> None:
    """A write or delete that broke off after the last ack may have landed; a refused one not."""
    expect = only([op("k", "set", 1), op("k", "set", 2, ok=False, doubt=True)])
    assert judge(expect, 2) == "in_doubt"
    refused = only([op("k", "set", 1), op("k", "set", 2, ok=False, doubt=False)])
    assert judge(refused, 2) == "unexplained"
    deleted = only([op("k", "set", 1), op("k", "delete", 2, ok=False, doubt=True)])
    assert judge(deleted, MISSING) == "in_doubt"


def test_a_call_in_doubt_before_the_last_ack_is_no_excuse() -> None:
    """A timed-out write that lands after a later acknowledged one is a loss."""
    expect = only([op("k", "set", 1, ok=False, doubt=True), op("k", "set", 2)])
    assert judge(expect, 1) == "stale"


def test_keys_never_acknowledged_are_not_checked() -> None:
    found, unacknowledged = expectations([op("k", "set", 1, ok=False)])
    assert (found, unacknowledged) == ([], 1)


def test_figures_count_per_view_and_blame_the_next_fault() -> None:
    """A loss is put down to the first fault after its ack."""
    records = [op("a", "set", 1), op("b", "set", 2), op("b", "delete", 3, ok=False)]
    faults = [{"t": 10, "fault": "daemon_kill", "detail": "begin"}]
    views = {"wksd": lambda kind, key: MISSING, "redis": lambda kind, key: 1 if key == "a" else 2}
    figures = check_keys(records, views, faults)
    assert figures["acknowledged_writes"] == 2
    assert figures["client_errors"] == {"ConnectionLost": 1}
    assert figures["views"]["wksd"]["lost"] == 2
    assert figures["views"]["wksd"]["by_fault"] == {"lost": {"daemon_kill": 2}}
    assert figures["views"]["redis"]["ok"] == 2


def hold(
    lock: str, worker: str, token: int | None, t1: float, t2: float, expires: float
) -> dict[str, Any]:
    return {
        "kind": "hold",
        "lock": lock,
        "worker": worker,
        "token": token,
        "t1": t1,
        "t2": t2,
        "expires_at": int(expires * 1000),
        "release": "released",
    }


def test_overlapping_holdings_of_one_lock_are_found() -> None:
    """Intersecting intervals of one lock overlap; of two locks, or back to back, they do not."""
    figures = check_locks(
        [
            hold("x", "a", 1, 100.0, 100.5, 102),
            hold("x", "b", 2, 100.4, 100.6, 102),  # overlaps a
            hold("x", "c", 3, 100.7, 100.8, 102),  # after both
            hold("y", "d", 1, 100.45, 100.5, 102),  # another lock
        ]
    )
    assert figures["holdings"] == 4
    assert figures["overlaps"] == 1
    assert figures["token_order_violations"] == 0


def test_a_holding_ends_at_its_expiry() -> None:
    """A holder that kept working past expiresAt held the lock only until then."""
    figures = check_locks(
        [hold("x", "a", 1, 100.0, 105.0, 101), hold("x", "b", 2, 101.5, 102, 103)]
    )
    assert figures["overlaps"] == 0


def test_fencing_tokens_must_grow_in_grant_order() -> None:
    figures = check_locks(
        [
            hold("x", "a", 5, 100.0, 100.1, 102),
            hold("x", "b", 5, 100.2, 100.3, 102),  # not larger
            hold("x", "c", 4, 100.4, 100.5, 102),  # smaller
            hold("x", "d", None, 100.6, 100.7, 102),
        ]
    )
    assert figures["token_order_violations"] == 2
    assert figures["missing_tokens"] == 1
