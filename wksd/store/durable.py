"""The durable log under the memory store: what wksd holds itself survives it.

Theory of operation
-------------------
Modelled on Redis's append-only file. Every change the memory store makes is
an *op*, a short msgpack list (``["p", key, value, deadline, clean]`` and so
on; ``MemoryStore`` defines them). Ops gather in a buffer while a request is
served; ``flush`` writes the buffer as one *frame* with a single ``write(2)``
before the request is answered (``Dispatcher`` calls ``commit``), so an
answered write is in the kernel's hands and survives SIGKILL, an OOM kill or
a crash of the daemon. A frame is all or nothing: the ops of one request
(a workflow state and its index, a write and its journal entry) are never
half replayed.

A frame is ``length (4 bytes) | crc32 (4 bytes) | payload`` in little-endian,
the payload a msgpack array of ops. At start, ``open`` reads the snapshot and
then the journals after it. A frame cut short at the very end of the last
journal is what a crash in the middle of a write leaves: it is dropped, the
file truncated to the last whole frame, and a warning logged. Any other bad
frame (a checksum that does not match, a frame cut short in a snapshot or in
an older journal) is corruption: ``CorruptState`` names the file and the
offset, and the daemon refuses to start rather than serve half its data.

``fsync`` is Redis's ``appendfsync``: ``always`` makes ``commit`` wait for an
fsync of everything written (one fsync serves every request waiting, so
concurrent writers share it), ``everysec`` fsyncs once a second, ``no``
leaves it to the kernel. Every fsync runs in a worker thread, never on the
event loop.

Compaction keeps the files within a small multiple of the live data. When
the journal has grown past ``REWRITE_MIN_BYTES`` and past the size of the last
snapshot, ``run`` switches new frames to a fresh journal (generation g+1),
takes a copy of the memory store's state at that instant (``freeze``, no
await in between, so the copy holds exactly what the older files hold), and
writes it a slice at a time to ``snapshot.tmp``; once that is fsynced it is
renamed to ``snapshot`` and the older journals are removed. A crash at any
point leaves either the old snapshot and every journal after it, or the new
snapshot and the new journal: both complete.

Files in the state directory: ``lock`` (held with ``flock`` for the daemon's
life, holding its pid: one daemon per directory), ``snapshot``,
``journal.<generation>``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import msgpack
import structlog
import trio

from clientlib.errors import Unavailable

__all__ = [
    "FSYNC_POLICIES",
    "REWRITE_MIN_BYTES",
    "CorruptState",
    "DurableLog",
    "StateDirInUse",
    "lock_state_dir",
]

log = structlog.get_logger("wksd.durable")

FSYNC_POLICIES: Final = ("always", "everysec", "no")

#: The first bytes of every journal and snapshot: the format, so a future
#: layout is recognised instead of misread.
JOURNAL_MAGIC: Final = b"WKSDJ001"
SNAPSHOT_MAGIC: Final = b"WKSDS001"

_FRAME_HEADER: Final = struct.Struct("<II")

#: A journal is compacted once it is larger than this and than the last
#: snapshot (Redis's auto-aof-rewrite-min-size is 64 MB; wksd's values are
#: small, so a smaller floor keeps start-up replay short).
REWRITE_MIN_BYTES: Final = 16 * 1024 * 1024

#: Ops per snapshot frame: large enough that framing costs nothing, small
#: enough that writing one frame holds the event loop well under a millisecond.
SNAPSHOT_OPS_PER_FRAME: Final = 2000

#: Seconds between the background flush (ops of tasks that answer nobody,
#: such as a keepalive extension) and, under ``everysec``, the fsync.
SYNC_INTERVAL: Final = 1.0

#: A frame larger than this is not a frame but a damaged length field.
MAX_FRAME_BYTES: Final = 512 * 1024 * 1024


class StateDirInUse(Exception):
    """Another process holds the state directory's lock."""


class CorruptState(Exception):
    """A snapshot or journal holds bytes that are not what wksd wrote."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path} is damaged at byte {offset}: {reason}")
        self.path = path
        self.offset = offset


def lock_state_dir(directory: Path) -> int:
    """Create ``directory`` if needed and take its lock; the lock's fd.

    ``StateDirInUse`` names the pid that holds it. The lock is released when
    the process ends, however it ends, so a crash never leaves it held.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StateDirInUse(f"{directory} is in use by another wksd (pid {holder})") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def encode_frame(ops: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(ops, use_bin_type=True)
    return _FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _frames(
    path: Path, data: bytes | mmap.mmap, start: int, *, tail_ok: bool
) -> Iterator[tuple[int, Any]]:
    """(end offset, ops) for each frame of ``data`` from ``start``.

    A frame cut short at the end is yielded last as (its offset, None) when
    ``tail_ok`` (the caller truncates there), else ``CorruptState``.
    """
    offset, size = start, len(data)
    while offset < size:
        if offset + _FRAME_HEADER.size > size:
            if tail_ok:
                yield offset, None
                return
            raise CorruptState(path, offset, "a frame header is cut short")
        length, crc = _FRAME_HEADER.unpack_from(data, offset)
        body = offset + _FRAME_HEADER.size
        if length > MAX_FRAME_BYTES:
            raise CorruptState(path, offset, f"a frame claims {length} bytes")
        if body + length > size:
            if tail_ok:
                yield offset, None
                return
            raise CorruptState(path, offset, "a frame is cut short")
        payload = data[body : body + length]
        problem = None
        if zlib.crc32(payload) != crc:
            problem = "checksum mismatch"
        else:
            try:
                ops = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)
            except ValueError as exc:
                problem = f"undecodable frame: {exc}"
        if problem is not None:
            # The last frame of the last journal, or zeros to the end (what a
            # file system leaves of blocks it had not written at a power
            # loss): a write the crash interrupted, not damage.
            if tail_ok and (body + length == size or not data[offset:].strip(b"\0")):
                yield offset, None
                return
            raise CorruptState(path, offset, problem)
        offset = body + length
        yield offset, ops


class DurableLog:
    """The snapshot and journals of one state directory (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        fsync: str = "everysec",
        *,
        rewrite_min_bytes: int = REWRITE_MIN_BYTES,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.directory = directory
        self.fsync = fsync
        self.rewrite_min_bytes = rewrite_min_bytes
        self._pending: list[Any] = []
        self._fd = -1
        self._generation = 0
        self._journal_bytes = 0  # of the current journal
        self._snapshot_bytes = 0
        #: Bytes handed to the kernel, and of those, fsynced: across files.
        self._written = 0
        self._synced = 0
        self._syncing: trio.Event | None = None
        #: While compaction fsyncs the journal it switched away from: the bytes
        #: written up to the switch, and the event set once they are synced.
        self._retiring: tuple[int, trio.Event] | None = None
        self._compacting = False
        self._freeze: Callable[[], Iterable[list[Any]]] | None = None
        self._failed: OSError | None = None
        #: Figures for the log line at start and the metrics.
        self.replayed_ops = 0
        self.dropped_tail_bytes = 0
        self.compactions = 0

    # -- start -------------------------------------------------------------------
    def open(self) -> Iterator[list[Any]]:
        """Replay every op the directory holds, oldest first, then open for appending.

        A generator: the journal is ready for ``append`` once it is exhausted.
        ``CorruptState`` if a file is damaged (see the module docstring).
        """
        directory = self.directory
        snapshot = directory / "snapshot"
        generation = 0
        if snapshot.exists():
            with _mapped(snapshot) as data:
                generation = yield from self._replay_snapshot(snapshot, data)
        journals = sorted(
            (int(path.name.split(".", 1)[1]), path)
            for path in directory.glob("journal.*")
            if path.name.split(".", 1)[1].isdigit()
        )
        for number, path in journals:
            if number < generation:
                path.unlink()  # superseded by the snapshot; a crash kept it
        journals = [(number, path) for number, path in journals if number >= generation]
        for position, (number, path) in enumerate(journals):
            last = position == len(journals) - 1
            yield from self._replay_journal(path, last)
            generation = number
        self._generation = generation
        path = self._journal_path(generation)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._journal_bytes = os.fstat(self._fd).st_size
        if self._journal_bytes == 0:
            self._write(JOURNAL_MAGIC)
            self._journal_bytes = len(JOURNAL_MAGIC)
            _fsync_directory(directory)

    def _replay_snapshot(
        self, snapshot: Path, data: bytes | mmap.mmap
    ) -> Generator[list[Any], None, int]:
        """Yield the snapshot's ops; its generation."""
        self._snapshot_bytes = len(data)
        if data[: len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC:
            raise CorruptState(snapshot, 0, "not a wksd snapshot")
        generation = 0
        for index, (_, ops) in enumerate(
            _frames(snapshot, data, len(SNAPSHOT_MAGIC), tail_ok=False)
        ):
            if index == 0:
                generation = int(ops[0][1])  # ["snapshot", generation, created]
                continue
            if ops and ops[0][0] == "end":
                return generation
            self.replayed_ops += len(ops)
            yield from ops
        raise CorruptState(snapshot, len(data), "the snapshot has no end mark")

    def _replay_journal(self, path: Path, last: bool) -> Iterator[list[Any]]:
        torn = None
        with _mapped(path) as data:
            size = len(data)
            torn = yield from self._journal_ops(path, data, last)
        if torn is not None:  # after the mapping is gone
            self._truncate(path, torn, size - torn)

    def _journal_ops(
        self, path: Path, data: bytes | mmap.mmap, last: bool
    ) -> Generator[list[Any], None, int | None]:
        """Yield the journal's ops; the offset of a torn tail, if any."""
        if len(data) < len(JOURNAL_MAGIC):
            if not last or not JOURNAL_MAGIC.startswith(data[:]):
                raise CorruptState(path, 0, "not a wksd journal")
            return 0  # created, then the crash
        if data[: len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
            raise CorruptState(path, 0, "not a wksd journal")
        for end, ops in _frames(path, data, len(JOURNAL_MAGIC), tail_ok=last):
            if ops is None:
                return end
            self.replayed_ops += len(ops)
            yield from ops
        return None

    def _truncate(self, path: Path, offset: int, dropped: int) -> None:
        log.warning(
            "dropped a torn record at the end of the journal",
            path=str(path),
            offset=offset,
            bytes=dropped,
        )
        self.dropped_tail_bytes += dropped
        os.truncate(path, offset)

    def _journal_path(self, generation: int) -> Path:
        return self.directory / f"journal.{generation}"

    # -- writing -------------------------------------------------------------------
    def append(self, op: list[Any]) -> None:
        """Add an op to the frame being gathered (written by the next ``flush``)."""
        self._pending.append(op)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Hand every gathered op to the kernel, in one frame.

        If the write fails (a full disk), the ops stay gathered for the next
        try and ``Unavailable`` is raised, so the request is not acknowledged.
        """
        if not self._pending:
            return
        frame = encode_frame(self._pending)
        try:
            self._write(frame)
        except OSError as exc:
            if self._failed is None:
                log.error("cannot write the journal", path=str(self.directory), error=str(exc))
            self._failed = exc
            raise Unavailable(f"cannot write the journal in {self.directory}: {exc}") from exc
        if self._failed is not None:
            log.info("the journal is writable again", path=str(self.directory))
            self._failed = None
        self._pending.clear()
        self._journal_bytes += len(frame)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._written += len(data)

    async def commit(self) -> None:
        """What a request calls before it is answered: flush, and under
        ``always`` wait until all of it is on disk."""
        self.flush()
        if self.fsync == "always" and self._synced < self._written:
            await self.sync()

    async def sync(self) -> None:
        """Return once everything written before the call is fsynced."""
        target = self._written
        while self._synced < target:
            retiring = self._retiring
            if retiring is not None and self._synced < retiring[0]:
                # Those bytes are in the journal compaction just retired; the
                # current fd's fsync would not cover them: wait for its own.
                await retiring[1].wait()
                continue
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            self._syncing = done = trio.Event()
            upto, fd = self._written, self._fd
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            except OSError as exc:
                log.error("fsync of the journal failed", error=str(exc))
                raise Unavailable(f"cannot sync the journal in {self.directory}: {exc}") from exc
            finally:
                self._syncing = None
                done.set()
            self._synced = max(self._synced, upto)

    # -- the background task ---------------------------------------------------------
    def set_freeze(self, freeze: Callable[[], Iterable[list[Any]]]) -> None:
        """``freeze()`` copies the state at once and yields the ops that rebuild it."""
        self._freeze = freeze

    @property
    def needs_compaction(self) -> bool:
        return self._journal_bytes > max(self.rewrite_min_bytes, self._snapshot_bytes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush, fsync (``everysec``) and compact in the background, for ever."""
        task_status.started()
        while True:
            await trio.sleep(SYNC_INTERVAL)
            try:
                self.flush()
                if self.fsync == "everysec":
                    await self.sync()
                if self.needs_compaction and self._freeze is not None:
                    await self.compact()
            except (Unavailable, OSError) as exc:
                log.error("journal upkeep failed; retrying", error=str(exc))

    async def compact(self) -> None:
        """Write a snapshot of the state and start a new journal (module docstring)."""
        if self._compacting or self._freeze is None:
            return
        self._compacting = True
        try:
            await self._compact(self._freeze)
        finally:
            self._compacting = False

    async def _compact(self, freeze: Callable[[], Iterable[list[Any]]]) -> None:
        directory = self.directory
        self.flush()
        old_fd, old_generation = self._fd, self._generation
        generation = old_generation + 1
        fd = os.open(
            self._journal_path(generation),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        # From here to freeze() nothing awaits: the copy holds exactly what
        # the older files hold, and every later op goes to the new journal.
        self._fd, self._generation = fd, generation
        self._retiring = retiring = (self._written, trio.Event())
        self._write(JOURNAL_MAGIC)
        self._journal_bytes = len(JOURNAL_MAGIC)
        ops = freeze()
        try:
            await trio.to_thread.run_sync(os.fsync, old_fd)
            self._synced = max(self._synced, retiring[0])
            while self._syncing is not None:  # one may still hold old_fd
                await self._syncing.wait()
        finally:
            os.close(old_fd)
            self._retiring = None
            retiring[1].set()
        temporary = directory / "snapshot.tmp"
        written = 0
        try:
            out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                created = int(time.time() * 1000)  # for people reading the file
                chunks = [SNAPSHOT_MAGIC, encode_frame([["snapshot", generation, created]])]
                batch: list[Any] = []
                for op in ops:
                    batch.append(op)
                    if len(batch) >= SNAPSHOT_OPS_PER_FRAME:
                        chunks.append(encode_frame(batch))
                        batch = []
                        written += _write_all(out, chunks)
                        chunks = []
                        await trio.lowlevel.checkpoint()
                if batch:
                    chunks.append(encode_frame(batch))
                chunks.append(encode_frame([["end", generation]]))
                written += _write_all(out, chunks)
                await trio.to_thread.run_sync(os.fsync, out)
            finally:
                os.close(out)
            os.replace(temporary, directory / "snapshot")
            await trio.to_thread.run_sync(_fsync_directory, directory)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._snapshot_bytes = written
        for number in range(old_generation, -1, -1):
            path = self._journal_path(number)
            if not path.exists():
                break
            path.unlink()
        self.compactions += 1
        log.info("journal compacted", generation=generation, snapshot_bytes=written)

    async def aclose(self) -> None:
        """Flush and fsync what is left, then close (at shutdown)."""
        if self._fd < 0:
            return
        with trio.CancelScope(shield=True):
            try:
                self.flush()
                await trio.to_thread.run_sync(os.fsync, self._fd)
            except (Unavailable, OSError) as exc:
                log.error("could not sync the journal at shutdown", error=str(exc))
        self.close()

    def close(self) -> None:
        """Close at once: what was flushed is the kernel's to keep."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes, mapped rather than read: replay never holds a second
    copy of a large journal in memory."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            yield b""
            return
        with mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as data:
            yield data


def _write_all(fd: int, chunks: list[bytes]) -> int:
    total = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        total += len(chunk)
    return total


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation or rename durable (the directory entry)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
