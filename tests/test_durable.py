"""The durable store: journal, replay, torn tails, corruption, compaction (wksd.store.durable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from clientlib import Client
from clientlib.errors import Unavailable
from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.store import durable as durable_module
from wksd.store.durable import (
    JOURNAL_MAGIC,
    CorruptState,
    DurableLog,
    StateDirInUse,
    encode_frame,
    lock_state_dir,
)
from wksd.store.memory import MemoryStore

from .durability import assert_same_state, live_state, replayed
from .polling import await_until, wait_until
from .processes import DaemonProcess, require_binary
from .redis_server import RedisServer

KEYS = KeySpace("wks:")


def backend(path: str) -> str:
    with Client(path) as client:
        return client.health().backend


def open_store(directory: Path, clock: ManualClock, **settings: object) -> MemoryStore:
    log = DurableLog(directory, **settings)  # type: ignore[arg-type]
    memory = MemoryStore(clock=clock, log=log)
    memory.load(log.open())
    return memory


def log_of(memory: MemoryStore) -> DurableLog:
    log = memory._log
    assert log is not None
    return log


async def fill(memory: MemoryStore) -> None:
    """One of each kind of change."""
    await memory.set("wks:session:u1", b'{"a":1}', 60_000)
    await memory.set("wks:session:gone", b"{}", 60_000)
    await memory.delete("wks:session:gone")
    await memory.set("wks:cache:api:h", b"[1,2]", None)
    await memory.expire("wks:cache:api:h", 5_000)
    await memory.lock_acquire("e1", "w1", 30_000)
    await memory.lock_acquire("e2", "w2", 30_000)
    await memory.lock_release("e2", "w2")
    memory.record_event("e1", b'{"type":"x"}', 1, 60_000)


async def test_every_change_survives_a_crash(tmp_path: Path, clock: ManualClock) -> None:
    """What was flushed is there after the process dies without closing anything."""
    memory = open_store(tmp_path, clock)
    await fill(memory)
    log_of(memory).flush()  # a request's commit; then the crash: nothing closed
    copy = replayed(tmp_path, clock)
    assert_same_state(memory, copy)
    assert await copy.get("wks:session:u1") == b'{"a":1}'
    assert await copy.get("wks:session:gone") is None
    assert (await copy.get_with_ttl("wks:cache:api:h"))[1] == 5_000
    assert await copy.get(KEYS.lock("e1")) == b"w1"
    assert await copy.get(KEYS.lock("e2")) is None
    assert await copy.read_events("e1", 0, 10) == [b'{"type":"x"}']


async def test_fencing_tokens_never_repeat_after_a_restart(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The counter is journaled as its value: tokens go on growing after a replay."""
    memory = open_store(tmp_path, clock)
    first = await memory.lock_acquire("e1", "w1", 1_000)
    log_of(memory).flush()
    log_of(memory).close()
    clock.advance(2)  # the lock expired while the daemon was down
    copy = open_store(tmp_path, clock)
    second = await copy.lock_acquire("e1", "w2", 1_000)
    assert first.token is not None and second.token is not None
    assert second.token > first.token


async def test_ttls_are_absolute(tmp_path: Path, clock: ManualClock) -> None:
    """A key that expired while the daemon was down is gone; others keep their time left."""
    memory = open_store(tmp_path, clock)
    await memory.set("short", b"1", 1_000)
    await memory.set("long", b"2", 10_000)
    log_of(memory).flush()
    clock.advance(4)
    copy = replayed(tmp_path, clock)
    assert await copy.get("short") is None
    assert "short" not in copy._data
    assert (await copy.get_with_ttl("long"))[1] == 6_000


async def test_unflushed_changes_are_not_replayed_half(tmp_path: Path, clock: ManualClock) -> None:
    """A frame is all or nothing: a workflow state and its index go together."""
    memory = open_store(tmp_path, clock)
    await memory.set("a", b"1", None)
    log_of(memory).flush()
    await memory.set("b", b"2", None)  # gathered, never flushed: never answered
    copy = replayed(tmp_path, clock)
    assert await copy.get("a") == b"1"
    assert await copy.get("b") is None


async def test_a_torn_last_record_is_dropped_and_logged(
    tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash in the middle of a write leaves a short frame: dropped, file truncated."""
    memory = open_store(tmp_path, clock)
    await memory.set("a", b"1", None)
    log_of(memory).flush()
    log_of(memory).close()
    journal = tmp_path / "journal.0"
    whole = journal.stat().st_size
    frame = encode_frame([["p", "b", b"2", None, False]])
    with journal.open("ab") as out:
        out.write(frame[: len(frame) - 3])
    copy = open_store(tmp_path, clock)
    assert await copy.get("a") == b"1"
    assert await copy.get("b") is None
    assert journal.stat().st_size == whole
    assert log_of(copy).dropped_tail_bytes == len(frame) - 3
    assert "torn record" in capsys.readouterr().out
    await copy.set("c", b"3", None)  # appends after the last whole frame
    log_of(copy).flush()
    again = replayed(tmp_path, clock)
    assert await again.get("c") == b"3"


async def test_zeros_at_the_end_are_a_torn_tail(tmp_path: Path, clock: ManualClock) -> None:
    """Blocks a power loss left unwritten read as zeros: dropped like a short frame."""
    memory = open_store(tmp_path, clock)
    await memory.set("a", b"1", None)
    log_of(memory).flush()
    log_of(memory).close()
    with (tmp_path / "journal.0").open("ab") as out:
        out.write(b"\0" * 4096)
    copy = replayed(tmp_path, clock)
    assert await copy.get("a") == b"1"


@pytest.mark.parametrize("where", ["middle", "snapshot"])
async def test_corruption_is_reported_with_file_and_offset(
    tmp_path: Path, clock: ManualClock, where: str
) -> None:
    """A damaged frame that is not the last one stops the replay, naming where."""
    memory = open_store(tmp_path, clock, rewrite_min_bytes=0)
    for index in range(3):
        await memory.set(f"k{index}", b"value", None)
        log_of(memory).flush()
    if where == "snapshot":
        log_of(memory).set_freeze(memory.freeze)
        await log_of(memory).compact()
        path = tmp_path / "snapshot"
    else:
        path = tmp_path / "journal.0"
    log_of(memory).close()
    data = bytearray(path.read_bytes())
    offset = len(JOURNAL_MAGIC) + 8 + 2  # inside the first frame's payload
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptState) as caught:
        replayed(tmp_path, clock)
    assert caught.value.path == path
    assert caught.value.offset == len(JOURNAL_MAGIC)
    assert str(path) in str(caught.value)


async def test_compaction_keeps_the_files_near_the_live_data(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Rewriting the same keys over and over does not grow the files without end."""
    memory = open_store(tmp_path, clock, rewrite_min_bytes=64 * 1024)
    log = log_of(memory)
    log.set_freeze(memory.freeze)
    value = b"x" * 100
    for round_ in range(200):
        for index in range(100):
            await memory.set(f"wks:session:{index}", value + str(round_).encode(), None)
        log.flush()
        if log.needs_compaction:
            await log.compact()
    assert log.compactions >= 5
    files = sorted(path.name for path in tmp_path.iterdir())
    assert "snapshot" in files
    assert [name for name in files if name.startswith("journal.")] == [f"journal.{log._generation}"]
    live = 100 * 120
    on_disk = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert on_disk < 20 * live + 64 * 1024
    assert_same_state(memory, replayed(tmp_path, clock))


async def test_writes_during_compaction_land_in_the_new_journal(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The snapshot is of the moment compaction began; later writes replay after it."""
    memory = open_store(tmp_path, clock)
    log = log_of(memory)
    log.set_freeze(memory.freeze)
    for index in range(5000):  # several snapshot frames, so compaction yields
        await memory.set(f"k{index}", b"old", None)
    log.flush()

    async def write_meanwhile() -> None:
        await trio.lowlevel.checkpoint()
        await memory.set("k1", b"new", None)
        await memory.delete("k2")
        await memory.set("late", b"1", None)
        log.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.compact)
        nursery.start_soon(write_meanwhile)
    copy = replayed(tmp_path, clock)
    assert await copy.get("k1") == b"new"
    assert await copy.get("k2") is None
    assert await copy.get("late") == b"1"
    assert_same_state(memory, copy)


async def test_a_failed_compaction_leaves_a_complete_state(
    tmp_path: Path, clock: ManualClock
) -> None:
    """A crash (here an error) halfway through a snapshot loses nothing: the old
    files and the new journal still replay whole."""
    memory = open_store(tmp_path, clock)
    log = log_of(memory)
    await memory.set("before", b"1", None)
    log.flush()

    def broken_freeze():  # type: ignore[no-untyped-def]
        yield ["p", "half", b"x", None, False]
        raise OSError(28, "No space left on device")

    log.set_freeze(broken_freeze)
    with pytest.raises(OSError):
        await log.compact()
    await memory.set("after", b"2", None)
    log.flush()
    assert not (tmp_path / "snapshot.tmp").exists()
    copy = replayed(tmp_path, clock)
    assert await copy.get("before") == b"1"
    assert await copy.get("after") == b"2"
    assert await copy.get("half") is None


async def test_fsync_always_waits_for_the_disk(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under always, commit returns only after an fsync covering the write, in a thread."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(trio.lowlevel.in_trio_run())
        real_fsync(fd)

    memory = open_store(tmp_path, clock, fsync="always")
    monkeypatch.setattr(durable_module.os, "fsync", fsync)
    log = log_of(memory)
    await memory.set("a", b"1", None)
    await log.commit()
    assert synced == [False]  # once, and never on the event loop
    assert log._synced == log._written
    await log.commit()  # nothing new: no second fsync
    assert synced == [False]


async def test_fsync_everysec_does_not_wait(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under everysec, commit only hands the frame to the kernel."""
    calls: list[int] = []
    memory = open_store(tmp_path, clock, fsync="everysec")
    monkeypatch.setattr(durable_module.os, "fsync", calls.append)
    await memory.set("a", b"1", None)
    await log_of(memory).commit()
    assert calls == []
    assert log_of(memory).pending == 0


async def test_a_failed_write_is_not_acknowledged(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk answers UNAVAILABLE and keeps the ops for the next try."""
    memory = open_store(tmp_path, clock)
    log = log_of(memory)
    await memory.set("a", b"1", None)
    real_write = os.write

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable_module.os, "write", full)
    with pytest.raises(Unavailable):
        await log.commit()
    assert log.pending == 1
    monkeypatch.setattr(durable_module.os, "write", real_write)
    await log.commit()
    assert await replayed(tmp_path, clock).get("a") == b"1"


async def test_keepalive_locks_end_with_the_daemon(tmp_path: Path, clock: ManualClock) -> None:
    """A lock marked volatile is gone after a restart; a plain lock stays."""
    memory = open_store(tmp_path, clock)
    await memory.lock_acquire("kept", "w1", 30_000)
    memory.mark_volatile(KEYS.lock("kept"))
    await memory.lock_acquire("plain", "w1", 30_000)
    log_of(memory).flush()
    copy = replayed(tmp_path, clock)
    assert await copy.get(KEYS.lock("kept")) is None
    assert await copy.get(KEYS.lock("plain")) == b"w1"


async def test_foreign_ops_come_back_in_order(tmp_path: Path, clock: ManualClock) -> None:
    """Ops recorded for the failover journal are replayed to it, not applied here."""
    memory = open_store(tmp_path, clock)
    memory.record(["jn", "key", "wks:session:a", None])
    memory.record(["js", "key", "wks:session:a"])
    log_of(memory).flush()
    copy = replayed(tmp_path, clock)
    assert copy.take_foreign_ops() == [
        ["jn", "key", "wks:session:a", None],
        ["js", "key", "wks:session:a"],
    ]
    assert copy.take_foreign_ops() == []


async def test_snapshot_keeps_foreign_state(tmp_path: Path, clock: ManualClock) -> None:
    """A snapshot writes what the registered sources say rebuilds them."""
    memory = open_store(tmp_path, clock)
    log = log_of(memory)
    log.set_freeze(memory.freeze)
    memory.register_snapshot_source(lambda: [["jn", "key", "k", None]])
    memory.record(["jn", "key", "old", None])
    await log.compact()
    copy = replayed(tmp_path, clock)
    assert copy.take_foreign_ops() == [["jn", "key", "k", None]]
    assert live_state(copy) == live_state(memory)


def test_one_daemon_per_state_directory(tmp_path: Path) -> None:
    """A second lock on the directory fails at once, naming the holder's pid."""
    fd = lock_state_dir(tmp_path)
    try:
        code = (
            "import sys, pathlib\n"
            "from wksd.store.durable import lock_state_dir, StateDirInUse\n"
            "try:\n"
            f"    lock_state_dir(pathlib.Path({str(tmp_path)!r}))\n"
            "except StateDirInUse as exc:\n"
            "    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert f"pid {os.getpid()}" in out.stdout
        assert str(tmp_path) in out.stdout
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path))  # free again once released


def test_state_dir_in_use_error_names_it(tmp_path: Path) -> None:
    """The exception's text is the one line the daemon prints."""
    fd = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirInUse, match=str(tmp_path)):
            # flock locks belong to the open file, so a second open conflicts
            # even within one process.
            lock_state_dir(tmp_path)
    finally:
        os.close(fd)


# -- the real daemon -------------------------------------------------------------
def refused_start(sock_path: str, state_dir: str) -> subprocess.CompletedProcess[str]:
    """Start the daemon on ``state_dir`` where it must refuse: its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "wksd", "--socket", sock_path, "--state-dir", state_dir],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_embedded_default_survives_sigkill(sock_path: str, tmp_path: Path) -> None:
    """Sessions, cache, workflows, locks and deletes all survive SIGKILL of the daemon."""
    state = str(tmp_path / "state")
    daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state}).start()
    try:
        with Client(sock_path) as client:
            client.set_session("u1", {"role": "admin"}, ttl=600)
            client.set_session("u2", {"role": "gone"}, ttl=600)
            assert client.delete_session("u2")
            client.cache_api_response("h1", {"items": [1, 2]}, ttl=600)
            client.start_workflow_tracking("run-1", "wf", 4, {"a": 1})
            client.update_workflow_progress("run-1", 2, "half", {"b": 2})
            client.start_workflow_tracking("run-2", "wf", 1)
            client.complete_workflow_tracking("run-2", "completed")
            assert client.lock_workflow_execution("run-1", "worker-1")
            token = client.call("lock.acquire", "run-1", "worker-1")["fencingToken"]
        daemon.kill()
        daemon.close()
        daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state}).start()
        with Client(sock_path) as client:
            assert client.get_session("u1") == {"role": "admin"}
            assert client.get_session("u2") is None
            assert client.get_cached_api_response("h1") == {"items": [1, 2]}
            state_1 = client.fetch_workflow_state("run-1")
            assert state_1 is not None
            assert (state_1.completed_steps, state_1.current_step) == (2, "half")
            assert state_1.data == {"a": 1, "b": 2}
            assert client.active_workflows() == ["run-1"]
            finished = client.fetch_workflow_state("run-2")
            assert finished is not None and finished.status == "completed"
            status = client.is_workflow_locked("run-1")
            assert status.locked and status.worker_id == "worker-1"
            assert not client.lock_workflow_execution("run-1", "worker-2")
            assert client.unlock_workflow_execution("run-1", "worker-1")
            again = client.call("lock.acquire", "run-1", "worker-2")
            assert again["fencingToken"] > token
            client.update_workflow_progress("run-1", 3, "after")  # not NOT_FOUND
    finally:
        daemon.close()


def test_keepalive_lock_is_gone_after_a_restart(sock_path: str, tmp_path: Path) -> None:
    """A keepalive lock belongs to its connection: a restarted daemon has freed it."""
    state = str(tmp_path / "state")
    daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state}).start()
    try:
        with Client(sock_path) as holder:
            assert holder.call("lock.acquire", "k1", "w1", 60, True)["acquired"]
            assert holder.call("lock.acquire", "p1", "w1", 60)["acquired"]
            daemon.kill()
        daemon.close()
        daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state}).start()
        with Client(sock_path) as client:
            assert not client.is_workflow_locked("k1").locked
            assert client.is_workflow_locked("p1").locked
    finally:
        daemon.close()


def test_second_daemon_on_a_state_dir_exits_at_once(sock_path: str, tmp_path: Path) -> None:
    """One line naming the directory, exit status 69, and the first daemon unharmed."""
    state = str(tmp_path / "state")
    daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state}).start()
    try:
        second = refused_start(sock_path + "2", state)
        assert second.returncode == 69
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and state in lines[0] and "in use" in lines[0]
        with Client(sock_path) as client:
            assert client.ping() == "PONG"
    finally:
        daemon.close()


def test_damaged_state_dir_stops_the_daemon(sock_path: str, tmp_path: Path) -> None:
    """A corrupt journal is reported in one line with exit status 65, not served around."""
    state = tmp_path / "state"
    state.mkdir()
    frame = bytearray(encode_frame([["p", "k", b"v", None, False]]))
    frame[-1] ^= 0xFF
    (state / "journal.0").write_bytes(JOURNAL_MAGIC + bytes(frame) + encode_frame([["d", "k"]]))
    out = refused_start(sock_path, str(state))
    assert out.returncode == 65
    assert "journal.0" in out.stderr and "damaged" in out.stderr


def test_sigterm_flushes_and_restart_replays(sock_path: str, tmp_path: Path) -> None:
    """A clean stop and start keeps everything too, and says so in the log."""
    state = str(tmp_path / "state")
    daemon = DaemonProcess(
        sock_path, {"WKSD_STATE_DIR": state, "WKSD_LOG_LEVEL": "info", "WKSD_FSYNC": "always"}
    ).start()
    try:
        with Client(sock_path) as client:
            for index in range(100):
                client.set_session(f"u{index}", {"n": index})
        assert daemon.stop(signal.SIGTERM) == 0
        daemon.close()
        daemon = DaemonProcess(sock_path, {"WKSD_STATE_DIR": state, "WKSD_LOG_LEVEL": "info"})
        daemon.start()
        with Client(sock_path) as client:
            assert [client.get_session(f"u{index}") for index in range(100)] == [
                {"n": index} for index in range(100)
            ]
        assert "state replayed" in daemon.output
    finally:
        daemon.close()


# -- Redis mode: the outage journal is what is durable ----------------------------
def test_restart_during_an_outage_keeps_the_outage_writes(
    sock_path: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Writes made while Redis is down survive SIGKILL of the daemon, are served
    after the restart, and go to Redis once it is back; deletes too."""
    require_binary("redis-server")
    state = str(tmp_path / "state")
    env = {
        "REDIS_ENABLED": "1",
        "REDIS_URL": redis_server.url,
        "WKSD_REDIS_TIMEOUT": "0.25",
        "WKSD_STATE_DIR": state,
    }
    daemon = DaemonProcess(sock_path, env).start()
    try:
        wait_until(lambda: backend(sock_path) == "redis", what="redis serving")
        with Client(sock_path) as client:
            client.set_session("before", {"n": 0})
            client.set_session("doomed", {"n": 0})
            client.start_workflow_tracking("run-1", "wf", 10)
        redis_server.kill()
        with Client(sock_path) as client:
            for index in range(50):
                client.set_session(f"outage-{index}", {"n": index})
            assert client.delete_session("doomed")
            client.update_workflow_progress("run-1", 5, "outage step")
            assert backend(sock_path) == "memory"
        daemon.kill()
        daemon.close()
        daemon = DaemonProcess(sock_path, env).start()  # Redis still down
        with Client(sock_path) as client:
            assert client.get_session("outage-49") == {"n": 49}
            assert client.get_session("doomed") is None
            state_1 = client.fetch_workflow_state("run-1")
            assert state_1 is not None and state_1.completed_steps == 5
        redis_server.restart()
        wait_until(lambda: backend(sock_path) == "redis", what="redis serving again")
        with redis_server.client() as direct:
            assert json.loads(direct.get("wks:session:outage-0")) == {"n": 0}
            assert json.loads(direct.get("wks:session:outage-49")) == {"n": 49}
            assert direct.get("wks:session:doomed") is None
            assert json.loads(direct.get("wks:workflow:run-1"))["completedSteps"] == 5
        with Client(sock_path) as client:
            assert client.health().backend == "redis"
    finally:
        daemon.close()


def test_unusable_state_dir_exits_73(sock_path: str, tmp_path: Path) -> None:
    """A state directory that cannot be made (a file is in the way): one line, exit 73."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = refused_start(sock_path, str(blocker))
    assert out.returncode == 73
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "state directory" in lines[0] and str(blocker) in lines[0]


async def test_fsync_always_covers_writes_to_a_journal_compaction_retires(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under always, a commit whose frame went to the journal a compaction then
    switched away from returns only after that journal is fsynced, not on the
    fsync of the new one."""
    memory = open_store(tmp_path, clock, fsync="always")
    log = log_of(memory)
    log.set_freeze(memory.freeze)
    old_fd = log._fd
    gates = [threading.Event(), threading.Event()]  # the 1st, 2nd fsync of the old one
    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == old_fd:
            calls.append(fd)
            if len(calls) <= len(gates):
                gates[len(calls) - 1].wait(10)
        real_fsync(fd)

    monkeypatch.setattr(durable_module.os, "fsync", fsync)
    done: list[str] = []

    async def commit(name: str) -> None:
        await memory.set(name, b"v", None)
        await log.commit()
        done.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "first")  # its fsync of the old journal hangs
        await await_until(lambda: len(calls) == 1)
        nursery.start_soon(commit, "second")  # written to the old journal, waits
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(log.compact)  # switches journals, fsyncs the old one
        await await_until(lambda: len(calls) == 2)
        assert log._fd != old_fd
        gates[0].set()  # the first commit's fsync ends; the compaction's does not
        await await_until(lambda: "first" in done)
        await trio.testing.wait_all_tasks_blocked()  # a wrong early return would be now
        assert "second" not in done
        gates[1].set()
    assert done == ["first", "second"]
    assert done == ["first", "second"]
