"""The checker: every key's last acknowledged value against what wksd and Redis hold.

For each key (one writer owns it, so its log gives the order), the last
acknowledged operation says what must be read now:

- a write with ``seq`` S: the value read carries S (``ok``); nothing is
  ``lost``; an older seq is ``stale`` (the acknowledged write is lost too, and
  an older one came back);
- a delete: nothing is read (``ok``); a value is an ``undone`` delete.

Calls after the last acknowledgement that raised while they may have been
applied (``doubt`` in the log) are allowed to be what is read
(``in_doubt``): a timed-out write that landed is no loss. A seq that is none
of these is ``unexplained``.

Locks: a holding is the interval a contender relied on its lock, from the
answer to its acquire to the moment it stopped (capped at the ``expiresAt``
it was granted). Two holdings of one lock whose intervals intersect are an
``overlap``; fencing tokens must grow strictly in grant order. Both
intervals are the conservative ones: a reported overlap is a real one.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: What a reader returns for a key that is not there.
MISSING: Final = "missing"

#: Slack for ``expiresAt``, which is whole milliseconds: an interval end may be
#: up to this much late through rounding alone.
EXPIRY_SLACK = 0.001

#: Examples kept per kind of failure, for the report.
EXAMPLES = 5

#: The checked figures, per view; a non-zero one breaks a promise.
FAILURES = ("lost", "stale", "undone_deletes", "unexplained")

Reader = Callable[[str, str], "int | str | None"]
"""(kind, key) -> the seq held, MISSING, or None when it could not be read."""


def read_log(paths: Iterable[Path]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                # A torn last line of a killed process is never an acknowledgement.
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


def seq_of(kind: str, value: Any) -> int | str:
    """The seq in a stored value (a workflow keeps it in its data), or MISSING."""
    if value is None:
        return MISSING
    if kind == "workflow":
        value = value.get("data") if isinstance(value, dict) else None
    if isinstance(value, dict) and isinstance(value.get("seq"), int):
        return int(value["seq"])
    return -1  # there, but not a value of ours: counted as unexplained


@dataclass
class Expectation:
    kind: str
    key: str
    last: dict[str, Any]  # the last acknowledged record
    doubtful_writes: set[int] = field(default_factory=set)
    doubtful_delete: bool = False


def expectations(records: list[dict[str, Any]]) -> tuple[list[Expectation], int]:
    """What each key must hold; and how many keys were never acknowledged (not checked)."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("kind") in ("session", "cache", "workflow"):
            by_key[(record["kind"], record["key"])].append(record)
    found: list[Expectation] = []
    unacknowledged = 0
    for (kind, key), ops in by_key.items():
        acked = [i for i, op in enumerate(ops) if op["ok"]]
        if not acked:
            unacknowledged += 1
            continue
        expect = Expectation(kind, key, ops[acked[-1]])
        for op in ops[acked[-1] + 1 :]:
            if op["doubt"]:
                if op["op"] == "delete":
                    expect.doubtful_delete = True
                else:
                    expect.doubtful_writes.add(op["seq"])
        found.append(expect)
    return found, unacknowledged


def judge(expect: Expectation, held: int | str) -> str:
    """One key in one view: ok, in_doubt, lost, stale, undone_deletes or unexplained."""
    last = expect.last
    if isinstance(held, int) and held in expect.doubtful_writes:
        return "in_doubt"
    if last["op"] == "delete":
        return "ok" if held == MISSING else "undone_deletes"
    if held == MISSING:
        return "in_doubt" if expect.doubtful_delete else "lost"
    if held == last["seq"]:
        return "ok"
    if isinstance(held, int) and 0 <= held < last["seq"]:
        return "stale"
    return "unexplained"


def blame(t: float, faults: list[dict[str, Any]]) -> str:
    """The fault an acknowledgement at ``t`` had to survive first.

    The first fault event at or after ``t``: the end of the fault in progress
    at ``t``, else the beginning of the next one. A heuristic for reading the
    figures (a write must survive every later fault too), not a proof.
    """
    for event in faults:
        if event["t"] >= t:
            return str(event["fault"])
    return "none (after the last fault)"


def check_keys(
    records: list[dict[str, Any]],
    views: Mapping[str, Reader],
    faults: list[dict[str, Any]],
) -> dict[str, Any]:
    """The key figures: acknowledgements, errors, and per view the judgement of every key."""
    writes = [r for r in records if r.get("kind") in ("session", "cache", "workflow")]
    expected, unacknowledged = expectations(writes)
    figures: dict[str, Any] = {
        "operations": len(writes),
        "acknowledged_writes": sum(1 for r in writes if r["ok"] and r["op"] != "delete"),
        "acknowledged_deletes": sum(1 for r in writes if r["ok"] and r["op"] == "delete"),
        "client_errors": dict(Counter(r["err"] for r in writes if not r["ok"]).most_common()),
        "in_doubt_calls": sum(1 for r in writes if r["doubt"]),
        "keys_checked": len(expected),
        "keys_never_acknowledged": unacknowledged,
        "views": {},
    }
    for name, read in views.items():
        verdicts: Counter[str] = Counter()
        blamed: dict[str, Counter[str]] = defaultdict(Counter)
        examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for expect in expected:
            held = read(expect.kind, expect.key)
            if held is None:
                verdicts["read_errors"] += 1
                continue
            verdict = judge(expect, held)
            verdicts[verdict] += 1
            if verdict in FAILURES:
                blamed[verdict][blame(expect.last["t1"], faults)] += 1
                if len(examples[verdict]) < EXAMPLES:
                    examples[verdict].append(
                        {
                            "kind": expect.kind,
                            "key": expect.key,
                            "last_ack": f"{expect.last['op']} seq {expect.last['seq']}",
                            "acked_at": expect.last["t1"],
                            "held": held,
                        }
                    )
        view: dict[str, Any] = {v: verdicts.get(v, 0) for v in ("ok", "in_doubt", *FAILURES)}
        view["read_errors"] = verdicts.get("read_errors", 0)
        view["by_fault"] = {k: dict(v) for k, v in blamed.items()}
        view["examples"] = dict(examples)
        figures["views"][name] = view
    return figures


def check_locks(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The lock figures: holdings, overlaps, token order, acquire outcomes."""
    holds = [r for r in records if r.get("kind") == "hold"]
    tries = [r for r in records if r.get("kind") == "acquire"]
    figures: dict[str, Any] = {
        "acquire_calls": len(holds) + len(tries),
        "holdings": len(holds),
        "refused_held": sum(1 for r in tries if r["err"] == "held"),
        "acquire_errors": dict(
            Counter(r["err"] for r in tries if r["err"] != "held").most_common()
        ),
        "release_outcomes": dict(Counter(r.get("release") for r in holds).most_common()),
        "missing_tokens": sum(1 for r in holds if r.get("token") is None),
        "expired_before_answer": 0,
        "overlaps": 0,
        "token_order_violations": 0,
        "examples": [],
    }
    by_lock: dict[str, list[tuple[float, float, dict[str, Any]]]] = defaultdict(list)
    for r in holds:
        end = r["t2"]
        if r.get("expires_at") is not None:
            end = min(end, r["expires_at"] / 1000 + EXPIRY_SLACK)
        if end <= r["t1"]:
            figures["expired_before_answer"] += 1
            continue
        by_lock[r["lock"]].append((r["t1"], end, r))
    for intervals in by_lock.values():
        intervals.sort(key=lambda item: item[0])
        active: list[tuple[float, float, dict[str, Any]]] = []
        top_token: int | None = None
        for start, end, r in intervals:
            active = [a for a in active if a[1] > start]
            for other in active:
                figures["overlaps"] += 1
                if len(figures["examples"]) < EXAMPLES:
                    figures["examples"].append(
                        {
                            "lock": r["lock"],
                            "first": [
                                other[2]["worker"],
                                other[2].get("token"),
                                other[0],
                                other[1],
                            ],
                            "second": [r["worker"], r.get("token"), start, end],
                        }
                    )
            active.append((start, end, r))
            token = r.get("token")
            if token is not None:
                if top_token is not None and token <= top_token:
                    figures["token_order_violations"] += 1
                top_token = token if top_token is None else max(top_token, token)
    return figures
