"""The load: writer and lock-contender processes, each logging what it was told.

A writer owns its keys (no two writers share one), so "the last acknowledged
value of a key" is the last line for it in one log. Every operation carries a
unique, increasing ``seq`` and is logged after the call returned or raised,
one JSON line flushed per operation:

    {"kind": "session"|"cache"|"workflow", "key": ..., "op": "set"|"delete"|
     "start"|"update"|"complete", "seq": n, "ok": bool, "err": type or null,
     "doubt": bool, "t0": sent, "t1": returned}

``ok`` is an acknowledgement. A call that raised is not one; ``doubt`` says
whether it may still have been applied (the connection broke or timed out
while it was out), as opposed to refused or never sent. A contender logs one
line per holding (``kind`` "hold") and one per failed acquire.

Run as ``python -m tests.chaos.clients writer|contender ...``; each stops when
its stop file appears (or its deadline passes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from typing import IO, Any

from clientlib import Client
from clientlib import errors as e

#: Client-side timeout: far above the daemon's Redis timeout, so a frozen
#: Redis shows as latency; a timeout here is a daemon that stopped answering.
CLIENT_TIMEOUT = 5.0

#: Keys per writer and kind: few enough that each is written many times (a
#: loss shows as an older value), enough that faults hit many of them.
KEYS_PER_KIND = 25

#: Long TTLs: nothing may expire during a run, or a loss would look like expiry.
SESSION_TTL = 86400
CACHE_TTL = 86400

#: Steps of each workflow (start, this many updates, complete).
WORKFLOW_STEPS = 4

#: Pause after each operation: keeps three writers well under a core on a
#: shared two-core machine and still gives a few hundred operations a second.
OP_PAUSE = 0.004

#: Pause after a failed call: the daemon is restarting, do not spin.
ERROR_PAUSE = 0.05

#: Errors raised before the request was sent, or answers refusing it: the
#: operation was certainly not applied. Anything else raised may have been.
NOT_APPLIED: tuple[type[Exception], ...] = (
    e.DaemonUnavailable,
    e.BadRequest,
    e.UnknownMethod,
    e.NotFound,
    e.Conflict,
    e.LockHeld,
    e.LockNotOwned,
    e.TooLarge,
    e.Forbidden,
    e.Full,
    e.Unavailable,
)

#: A contender's locks, and how long it holds one: short against the TTL, so a
#: holding always ends by release, and the TTL (2 s) still expires holdings
#: orphaned by a broken release within the run.
LOCK_COUNT = 2
LOCK_TTL = 2.0
HOLD_MIN, HOLD_MAX = 0.02, 0.2
LOCK_PAUSE = 0.01


class Log:
    """An append-only JSON-lines file, flushed after every line."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _stopping(stop_file: str, deadline: float) -> bool:
    return os.path.exists(stop_file) or time.time() > deadline


class Writer:
    """One writer: sessions, cache entries and workflows under its own ids."""

    def __init__(self, client: Client, log: Log, ident: int, rng: random.Random) -> None:
        self.client = client
        self.log = log
        self.ident = ident
        self.rng = rng
        self.seq = 0
        self.workflow: str | None = None
        self.workflow_n = 0
        self.step = 0

    def _do(self, kind: str, key: str, op: str, call: Callable[[int], object]) -> bool:
        self.seq += 1
        seq = self.seq
        record: dict[str, Any] = {"kind": kind, "key": key, "op": op, "seq": seq}
        record["t0"] = time.time()
        try:
            call(seq)
        except e.WksError as exc:
            record.update(ok=False, err=type(exc).__name__, doubt=not isinstance(exc, NOT_APPLIED))
        else:
            record.update(ok=True, err=None, doubt=False)
        record["t1"] = time.time()
        self.log.write(record)
        if not record["ok"]:
            time.sleep(ERROR_PAUSE)
        return bool(record["ok"])

    def value(self, seq: int) -> dict[str, Any]:
        return {"w": self.ident, "seq": seq}

    def one(self) -> None:
        pick = self.rng.random()
        c = self.client
        if pick < 0.4:
            key = f"chaos-w{self.ident}-s{self.rng.randrange(KEYS_PER_KIND)}"
            if self.rng.random() < 0.75:
                self._do(
                    "session", key, "set", lambda s: c.set_session(key, self.value(s), SESSION_TTL)
                )
            else:
                self._do("session", key, "delete", lambda s: c.delete_session(key))
        elif pick < 0.75:
            key = f"chaos-w{self.ident}-c{self.rng.randrange(KEYS_PER_KIND)}"
            if self.rng.random() < 0.75:
                self._do(
                    "cache",
                    key,
                    "set",
                    lambda s: c.call("cache.set", key, self.value(s), CACHE_TTL),
                )
            else:
                self._do("cache", key, "delete", lambda s: c.call("cache.delete", key))
        else:
            self.workflow_step()

    def workflow_step(self) -> None:
        c = self.client
        if self.workflow is None:
            self.workflow_n += 1
            key = f"chaos-w{self.ident}-wf{self.workflow_n}"
            started = self._do(
                "workflow",
                key,
                "start",
                lambda s: c.call("workflow.start", key, "chaos", WORKFLOW_STEPS, self.value(s)),
            )
            if started:  # an unacknowledged start is abandoned: its updates would only fail
                self.workflow, self.step = key, 0
            return
        key = self.workflow
        if self.step < WORKFLOW_STEPS:
            self.step += 1
            step = self.step
            self._do(
                "workflow",
                key,
                "update",
                lambda s: c.call("workflow.update", key, step, f"step {step}", self.value(s)),
            )
        else:
            self._do(
                "workflow",
                key,
                "complete",
                lambda s: c.call("workflow.complete", key, "completed", None, self.value(s)),
            )
            self.workflow = None


def run_writer(args: argparse.Namespace) -> None:
    log = Log(args.log)
    try:
        with Client(args.socket, timeout=CLIENT_TIMEOUT) as client:
            writer = Writer(client, log, args.id, random.Random(args.seed))
            while not _stopping(args.stop, args.deadline):
                writer.one()
                time.sleep(OP_PAUSE)
    finally:
        log.close()


def run_contender(args: argparse.Namespace) -> None:
    """Acquire, hold briefly, release, log; over and over, on one daemon."""
    rng = random.Random(args.seed)
    log = Log(args.log)
    n = 0
    try:
        with Client(args.socket, timeout=CLIENT_TIMEOUT) as client:
            while not _stopping(args.stop, args.deadline):
                n += 1
                lock = f"chaos-lock-{rng.randrange(LOCK_COUNT)}"
                worker = f"c{args.id}-{n}"  # one id per attempt: every grant is a fresh holding
                record: dict[str, Any] = {"kind": "acquire", "lock": lock, "worker": worker}
                record["t0"] = time.time()
                try:
                    result = client.acquire_lock(lock, worker, LOCK_TTL)
                except e.WksError as exc:
                    record.update(ok=False, err=type(exc).__name__, t1=time.time())
                    log.write(record)
                    time.sleep(ERROR_PAUSE)
                    continue
                record["t1"] = time.time()
                if not result.acquired:
                    record.update(ok=False, err="held", holder=result.worker_id)
                    log.write(record)
                    time.sleep(LOCK_PAUSE)
                    continue
                time.sleep(rng.uniform(HOLD_MIN, HOLD_MAX))  # the critical section
                record.update(
                    kind="hold",
                    ok=True,
                    err=None,
                    token=result.fencing_token,
                    expires_at=result.expires_at,
                    t2=time.time(),  # the holder stops relying on the lock here
                )
                try:
                    released = client.unlock_workflow_execution(lock, worker)
                except e.WksError as exc:
                    record["release"] = type(exc).__name__
                else:
                    record["release"] = "released" if released else "not released"
                record["t3"] = time.time()
                log.write(record)
                time.sleep(LOCK_PAUSE)
    finally:
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["writer", "contender"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop", required=True, help="stop once this file exists")
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (run_writer if args.role == "writer" else run_contender)(args)


if __name__ == "__main__":
    main()
