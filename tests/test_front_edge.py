"""The front door as an edge: idle and slow connections are closed, heads are bounded, and
the connection cap makes room without disturbing requests in progress (a hand-moved clock;
the sweep is called directly)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from corral.front import FrontSettings
from tests.front_fakes import DEADLINE, Door, Req, echo, front, raw, response, upstreams
from tests.waiting import until

GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


class HandClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connections(d: Door, n: int) -> AsyncIterator[list[Conn]]:
    """``n`` client connections, open at the door (counted) before this yields."""
    before = d.door.stats().connections
    conns = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(n)]
    try:
        await until(lambda: d.door.stats().connections >= before + n, DEADLINE,
                    "the door counts the connections")
        yield conns
    finally:
        for _, w in conns:
            w.close()


async def read_to_eof(conn: Conn) -> bytes:
    return await asyncio.wait_for(conn[0].read(), DEADLINE)


async def answer_on(conn: Conn, data: bytes) -> bytes:
    reader, writer = conn
    writer.write(data)
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)


async def test_idle_connections_close_after_the_idle_timeout() -> None:
    """Silent and kept-alive connections close idle_timeout after they went idle, no sooner."""
    clock = HandClock()
    async with upstreams(echo) as [up], \
            front(FrontSettings(idle_timeout_s=60, header_timeout_s=10), clock) as d:
        d.door.route_to(up.upstream)
        async with connections(d, 2) as [silent, kept]:
            clock.now += 30
            assert b" 200 " in await answer_on(kept, GET)   # kept: idle again from now
            clock.now += 30
            d.door.edge.sweep()
            assert await read_to_eof(silent) == b""
            assert not kept[0].at_eof() and d.door.stats().connections == 1
            clock.now += 30
            d.door.edge.sweep()
            assert await read_to_eof(kept) == b""
        assert d.door.stats().closed_idle == 2


async def test_a_head_not_whole_in_time_gets_408() -> None:
    """header_timeout counts from the head's first byte: a trickled head gets 408, closed."""
    clock = HandClock()
    async with upstreams(echo) as [up], \
            front(FrontSettings(idle_timeout_s=60, header_timeout_s=10), clock) as d:
        d.door.route_to(up.upstream)
        async with connections(d, 2) as [slow, idle]:
            clock.now += 9   # idle before its first byte: not the header timeout's time
            slow[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            await until(lambda: d.door.edge.table.idle_count == 1, DEADLINE, "head began")
            clock.now += 9.9
            d.door.edge.sweep()
            slow[1].write(b"X-Slow: 1\r\n")  # read before the 408 (else the close resets)
            await until(lambda: any(c.head_bytes > 40 for c in d.door.edge.open), DEADLINE,
                        "the door read the second line")
            clock.now += 0.1
            d.door.edge.sweep()
            got = await read_to_eof(slow)
            assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
            assert b"Connection: close" in got and not idle[0].at_eof()
        assert d.door.stats().failed == {"header_timeout": 1}
        assert up.requests == []


async def test_a_head_over_the_limit_gets_431() -> None:
    """A 1 MiB header is answered 431 at once and never reaches llama-server."""
    async with upstreams(echo) as [up], front(FrontSettings(max_head_bytes=65536)) as d:
        d.door.route_to(up.upstream)
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        got = await raw(d.port, head, until_bytes=b"}")
        assert got.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), got[:80]
        assert up.requests == [] and d.door.stats().failed == {"header_too_large": 1}
        ok = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60000 + b"\r\n\r\n"
        assert b" 200 " in await raw(d.port, ok, until_bytes=b"}")


async def test_a_head_just_over_the_limit_in_one_read_gets_431() -> None:
    """A head a little over the limit arrives whole in one or two reads (no read is counted
    while it is unfinished): measured as parsed, it gets 431 and never reaches llama-server."""
    async with upstreams(echo) as [up], front(FrontSettings(max_head_bytes=65536)) as d:
        d.door.route_to(up.upstream)
        for size in (70_000, 100_000):
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
            got = await raw(d.port, head, until_bytes=b"}")
            assert got.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), \
                got[:80]
        assert up.requests == [] and d.door.stats().failed == {"header_too_large": 2}


async def test_at_the_cap_a_new_connection_takes_the_longest_idle_ones_place() -> None:
    """max_connections holds; the oldest idle connection makes room, the new one is served."""
    clock = HandClock()
    async with upstreams(echo) as [up], front(FrontSettings(max_connections=2), clock) as d:
        d.door.route_to(up.upstream)
        async with connections(d, 1) as [oldest]:
            clock.now += 1
            async with connections(d, 1) as [newer]:
                clock.now += 1
                newest = await asyncio.open_connection("127.0.0.1", d.port)
                try:
                    assert b" 200 " in await answer_on(newest, GET)
                    assert await read_to_eof(oldest) == b""
                    assert not newer[0].at_eof()
                    stats = d.door.stats()
                    assert stats.connections == 2 and stats.max_connections == 2
                    assert stats.closed_idle == 1
                finally:
                    newest[1].close()


async def test_at_the_cap_with_none_idle_a_new_connection_gets_503_and_the_served_finish(
        ) -> None:
    """No idle connection to evict: the newcomer gets 503 at once; the request in progress
    finishes undisturbed."""
    release = asyncio.Event()

    async def slow(req: Req, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(response(200, b"finished"))
        return True

    async with upstreams(slow) as [up], front(FrontSettings(max_connections=1)) as d:
        d.door.route_to(up.upstream)
        async with connections(d, 1) as [served]:
            served[1].write(GET)
            await until(lambda: up.requests, DEADLINE, "the request reached llama-server")
            got = await raw(d.port, GET, until_bytes=b"}")
            assert got.startswith(b"HTTP/1.1 503 "), got
            assert b"Retry-After:" in got and b"too many connections" in got
            release.set()
            async with asyncio.timeout(DEADLINE):
                head = await served[0].readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and \
                    await served[0].readexactly(8) == b"finished"
        assert d.door.stats().failed == {"too_many_connections": 1}
