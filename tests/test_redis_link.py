"""The trio-native Redis link against a real redis-server (wksd.store.redis_link)."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import trio
from redis.connection import Connection
from redis.exceptions import DataError, ResponseError

from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.store.redis import RedisStore
from wksd.store.redis_link import LinkDown, RedisLink
from wksd.store.redis_target import RedisTarget, open_link
from wksd.store.resp import pack, reply_reader

from .redis_server import RedisServer


class CountingStream(trio.abc.Stream):
    """A stream that counts the writes going through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: Any) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:  # pragma: no cover - not used by the link
        raise NotImplementedError

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def connect(
    server: RedisServer, nursery: trio.Nursery, command_timeout: float = 5.0, **target: Any
) -> RedisLink:
    return await open_link(RedisTarget(port=server.port, **target), command_timeout, nursery)


async def test_replies_reach_their_callers(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A thousand concurrent commands each get their own reply."""
    link = await connect(redis_server, nursery)
    results: dict[int, Any] = {}

    async def one(index: int) -> None:
        await link.execute("SET", f"k{index}", index)
        results[index] = await link.execute("GET", f"k{index}")

    async with trio.open_nursery() as inner:
        for index in range(1000):
            inner.start_soon(one, index)
    assert results == {index: str(index).encode() for index in range(1000)}


async def test_concurrent_commands_share_writes(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """Commands queued while a write is under way go out together (auto-pipelining)."""
    stream = CountingStream(await trio.open_tcp_stream("127.0.0.1", redis_server.port))
    link = RedisLink(stream, 5.0)
    await nursery.start(link.run)
    # Fill Redis's side so writes block for a moment, then queue many commands.
    big = b"x" * (4 * 1024 * 1024)

    async def command(index: int) -> None:
        await link.execute("SET", f"k{index}", big if index == 0 else b"v")

    async with trio.open_nursery() as inner:
        for index in range(200):
            inner.start_soon(command, index)
    assert stream.writes < 50
    assert await link.execute("GET", "k199") == b"v"


async def test_error_reply_is_raised_and_the_link_lives(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """An error about the command is raised to its caller; others carry on."""
    link = await connect(redis_server, nursery)
    await link.execute("SET", "s", "v")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await link.execute("LPUSH", "s", "x")
    assert not link.broken
    assert await link.execute("GET", "s") == b"v"


async def test_pipeline_returns_errors_as_values(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A pipeline's replies come back in order, error replies in place."""
    link = await connect(redis_server, nursery)
    replies = await link.pipeline([["SET", "a", 1], ["INCR", "a"], ["HGET", "a", "f"]])
    assert replies[:2] == [b"OK", 2] and isinstance(replies[2], ResponseError)


async def test_stalled_redis_breaks_the_link_after_the_timeout(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """No reply within the timeout: the command and the link fail with LinkDown."""
    link = await connect(redis_server, nursery, command_timeout=0.2)
    redis_server.pause()
    try:
        with trio.fail_after(5):  # far above the 0.2 s it should take
            with pytest.raises(LinkDown, match=r"did not answer within 0.2 s"):
                await link.execute("PING")
    finally:
        redis_server.resume()
    assert link.broken
    with pytest.raises(LinkDown):
        await link.execute("PING")


async def test_killed_redis_fails_every_waiter(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """When Redis dies, every command waiting on the link raises LinkDown."""
    link = await connect(redis_server, nursery)
    failures = []

    async def blocked(index: int) -> None:
        try:
            await link.execute("BLPOP", f"never{index}", 0)
        except LinkDown:
            failures.append(index)

    async with trio.open_nursery() as inner:
        for index in range(3):
            inner.start_soon(blocked, index)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        redis_server.kill()
    assert sorted(failures) == [0, 1, 2]
    assert isinstance(await link.wait_broken(), LinkDown)


async def test_a_cancelled_caller_does_not_shift_the_replies(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """If a caller gives up, its reply is read and dropped; the next caller gets its own."""
    link = await connect(redis_server, nursery)
    with trio.move_on_after(0.05):
        await link.execute("BLPOP", "empty", 0.3)  # answered after 0.3 s, to nobody
    assert await link.execute("ECHO", "mine") == b"mine"
    assert not link.broken


async def test_readonly_reply_breaks_the_link(
    redis_server: RedisServer, tmp_path_factory: Any, nursery: trio.Nursery
) -> None:
    """A replica's READONLY means the node cannot serve us: the link breaks."""
    replica = RedisServer(
        tmp_path_factory.mktemp("replica"), "--replicaof", "127.0.0.1", str(redis_server.port)
    ).start()
    try:
        link = await open_link(RedisTarget(port=replica.port), 5.0, nursery)
        with pytest.raises(LinkDown, match=r"READONLY|read only"):
            await link.execute("SET", "k", "v")
        assert link.broken
    finally:
        replica.stop()


async def test_noscript_reloads_the_script(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """After SCRIPT FLUSH, the next scripted step loads its script again and succeeds."""
    store = RedisStore(await connect(redis_server, nursery), KeySpace("wks:"))
    await store.load_scripts()
    assert (await store.lock_acquire("e1", "w1", 10_000)).acquired
    with redis_server.client() as direct:
        direct.script_flush()
    assert (await store.lock_release("e1", "w1")) == "released"


async def test_handshake_names_the_connection_and_selects_the_db(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """CLIENT SETNAME wksd and SELECT db happen at connect."""
    link = await connect(redis_server, nursery, db=3)
    await link.execute("SET", "in-db-3", "yes")
    with redis.Redis(port=redis_server.port, db=3) as direct:
        assert direct.get("in-db-3") == b"yes"
        names = [client["name"] for client in direct.client_list()]
    assert names.count("wksd") == 1


async def test_password_is_sent_and_a_wrong_one_refused(
    tmp_path_factory: Any, nursery: trio.Nursery
) -> None:
    """AUTH with the right password works; a wrong one raises AuthenticationError."""
    server = RedisServer(tmp_path_factory.mktemp("auth"), "--requirepass", "s3cret").start()
    try:
        link = await connect(server, nursery, password="s3cret")
        assert await link.execute("PING") == b"PONG"
        with pytest.raises(redis.exceptions.AuthenticationError):
            await connect(server, nursery, password="wrong")
    finally:
        server.stop()


async def test_a_redis_without_pexpiretime_is_refused_as_too_old(
    tmp_path_factory: Any, nursery: trio.Nursery
) -> None:
    """A Redis older than 7.0 (here a 7 with PEXPIRETIME renamed away) is refused at
    connect with the reason, not left to fail every lock later; a 7 is not."""
    from wksd.store.redis_target import TooOld

    server = RedisServer(
        tmp_path_factory.mktemp("old"), "--rename-command", "PEXPIRETIME", ""
    ).start()
    try:
        with pytest.raises(TooOld, match=r"Redis 7\.0 or later"):
            await connect(server, nursery)
    finally:
        server.stop()


async def test_unreachable_redis_is_a_connection_error(nursery: trio.Nursery) -> None:
    """Nothing listening: open_link raises redis-py's ConnectionError naming the target."""
    from .redis_server import free_port

    port = free_port()
    with pytest.raises(redis.exceptions.ConnectionError, match=f"127.0.0.1:{port}"):
        await open_link(RedisTarget(host="127.0.0.1", port=port), 1.0, nursery)


async def test_commands_are_counted(redis_server: RedisServer, nursery: trio.Nursery) -> None:
    """redis_commands_total counts by command, redis_commands_failed_total the errors."""
    metrics = Metrics()
    link = await open_link(RedisTarget(port=redis_server.port), 5.0, nursery, metrics)
    await link.execute("SET", "s", "v")
    await link.execute("GET", "s")
    with pytest.raises(ResponseError):
        await link.execute("LPUSH", "s", "x")
    rendered = metrics.render()
    assert 'redis_commands_total{command="GET"} 1.0' in rendered
    assert 'redis_commands_failed_total{command="LPUSH"} 1.0' in rendered


@pytest.mark.parametrize("chunk", [1, 1 << 16])
def test_error_replies_come_out_as_redis_pys_exception_classes(chunk: int) -> None:
    """The RESP reader gives replies whole, fed byte by byte or at once; an error reply
    is the class redis-py raises for it, and bytes that are no RESP raise InvalidResponse."""
    from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError

    wire = b"+OK\r\n-NOSCRIPT No matching script\r\n-READONLY replica\r\n*1\r\n$1\r\nx\r\n"
    reader, replies = reply_reader(), []
    for start in range(0, len(wire), chunk):
        reader.feed(wire[start : start + chunk])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    assert replies[0] == b"OK" and replies[3] == [b"x"]
    assert type(replies[1]) is NoScriptError and type(replies[2]) is ReadOnlyError
    garbage = reply_reader()
    garbage.feed(b"?what\r\n")
    with pytest.raises(InvalidResponse):
        garbage.gets()
    assert pack("SET", "k", b"v") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "wks:session:u1"),
        ("SET", "wks:session:é☃", b"\x00\xff{}", "PX", 60_000),
        ("EVALSHA", "a" * 40, 3, "k1", "k2", "k3", b"", "", -1, 2**70, 1.5, 1e20),
        ("SET", "k", bytearray(b"from a buffer")),  # hiredis refuses: redis-py packs it
        ("SET", "k", memoryview(b"a view")),
        ("SET", "k", b"x" * 100_000),  # redis-py sends a large value as its own chunk
    ],
    ids=["get", "unicode", "evalsha", "bytearray", "memoryview", "large"],
)
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    assert pack(*args) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [None, True, object()])
def test_an_argument_no_packer_takes_is_redis_pys_data_error(bad: object) -> None:
    with pytest.raises(DataError):
        pack("SET", "k", bad)


async def test_pushes_and_observed_replies_arrive_in_wire_order(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """On a RESP3 link, a push another client caused and the replies around it
    reach the hooks in the order Redis executed the commands, even for a
    caller that was cancelled before its reply came."""
    link = await connect(redis_server, nursery)
    seen: list[Any] = []
    link.on_push = lambda push: seen.append(("push", list(push)))
    await link.execute("HELLO", "3")
    await link.execute("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "t:", "NOLOOP")
    other = redis.Redis(port=redis_server.port)

    def observe(replies: list[Any]) -> None:
        seen.append(("reply", replies))

    await link.execute("SET", "t:a", "1", observe=observe)  # ours: no push (NOLOOP)
    await trio.to_thread.run_sync(other.set, "t:a", "2")
    await link.execute("GET", "t:a", observe=observe)
    with trio.move_on_after(0.01) as scope:  # cancelled while waiting
        await link.execute("BLPOP", "t:empty", 0.05, observe=observe)
    assert scope.cancelled_caught
    await link.execute("PING")
    assert seen == [
        ("reply", [b"OK"]),
        ("push", [b"invalidate", [b"t:a"]]),
        ("reply", [b"2"]),
        ("reply", [None]),
    ]


async def test_a_hook_that_raises_breaks_the_link(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    link = await connect(redis_server, nursery)

    def observe(replies: list[Any]) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(LinkDown, match="could not be handled"):
        await link.execute("PING", observe=observe)
    assert link.broken


async def reading_task(link: RedisLink, *command: Any) -> trio.lowlevel.Task:
    """The task that read the reply to ``command`` (its ``observe`` runs there)."""
    readers: list[trio.lowlevel.Task] = []
    await link.execute(
        *command, observe=lambda replies: readers.append(trio.lowlevel.current_task())
    )
    (reader,) = readers
    return reader


async def test_a_lone_command_is_read_by_its_own_caller(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A socket link's caller reads its own reply instead of waiting for the
    reader task's pass; a TLS-like stream (any other) leaves it to the reader."""
    link = await connect(redis_server, nursery)
    assert await reading_task(link, "PING") is trio.lowlevel.current_task()
    assert await reading_task(link, "ECHO", "again") is trio.lowlevel.current_task()

    stream = await trio.open_tcp_stream("127.0.0.1", redis_server.port)
    other = RedisLink(CountingStream(stream), 5.0)
    await nursery.start(other.run)
    assert await reading_task(other, "PING") is not trio.lowlevel.current_task()
    other.fail(RuntimeError("test over"))


async def test_a_caller_reading_for_others_delivers_their_replies(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """Commands queued behind one another get their own replies, whoever reads."""
    link = await connect(redis_server, nursery)
    answers: dict[int, Any] = {}

    async def echo(index: int) -> None:
        answers[index] = await link.execute("ECHO", str(index))

    async with trio.open_nursery() as inner:
        inner.start_soon(link.execute, "BLPOP", "nothing", 0.2)  # holds the line
        await trio.testing.wait_all_tasks_blocked()
        for index in range(5):
            inner.start_soon(echo, index)
    assert answers == {index: str(index).encode() for index in range(5)}


async def test_the_read_side_goes_back_to_the_reader_after_a_caller(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """After a caller read its own reply, or gave up while reading, a push
    that comes while no command is in flight still reaches ``on_push``."""
    link = await connect(redis_server, nursery)
    pushed = trio.Event()
    link.on_push = lambda push: pushed.set()
    await link.execute("HELLO", "3")
    await link.execute("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "r:")
    with trio.move_on_after(0.05) as scope:  # cancelled while it holds the read side
        await link.execute("BLPOP", "r:never", 0.3)
    assert scope.cancelled_caught
    assert await link.execute("ECHO", "mine") == b"mine"  # read by this task
    other = redis.Redis(port=redis_server.port)
    await trio.to_thread.run_sync(other.set, "r:x", "1")
    with trio.fail_after(5):
        await pushed.wait()  # read by the reader task: nobody else reads now
    other.close()
    assert not link.broken


async def test_a_caller_reading_when_redis_stalls_gets_link_down(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """The stall watch reaches a caller that holds the read side, too."""
    link = await connect(redis_server, nursery, command_timeout=0.2)
    assert await reading_task(link, "PING") is trio.lowlevel.current_task()
    redis_server.pause()
    try:
        with trio.fail_after(5), pytest.raises(LinkDown, match="did not answer"):
            await link.execute("PING")
    finally:
        redis_server.resume()
    with pytest.raises(LinkDown):
        await link.execute("PING")
