"""The management API's edge (corral.api.edge on uvicorn): silent connections close after
the idle timeout, a head not whole in time gets 408, a head over the limit 431."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from corral.api.edge import uvicorn_limits

pytestmark = pytest.mark.timing  # real (short) timeouts
DEADLINE = 10.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def api(idle_s: float, header_s: float) -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           **uvicorn_limits(idle_s, header_s, 65536)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)  # pacing a poll of uvicorn's own flag, not a settle
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, DEADLINE)
        sock.close()


async def exchange(port: int, *parts: bytes) -> tuple[bytes, float]:
    """Send ``parts`` (a pause-free write each), read to EOF: (bytes, seconds to EOF)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t = loop.time()
    for part in parts:
        writer.write(part)
    try:
        got = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    return got, loop.time() - t


async def test_a_silent_connection_is_closed_after_the_idle_timeout() -> None:
    """A connection that never sends a byte is closed after the idle timeout."""
    async with api(0.3, 5.0) as port:
        got, took = await exchange(port)
        assert got == b"" and 0.25 <= took < 5.0


async def test_a_trickled_head_gets_408() -> None:
    """A head begun but not finished within the header timeout is answered 408."""
    async with api(30.0, 0.3) as port:
        got, took = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert 0.25 <= took < 5.0


async def test_a_head_over_the_limit_gets_431_and_a_normal_request_200() -> None:
    """1 MiB of header gets 431; an ordinary request on the same API still 200."""
    async with api(30.0, 5.0) as port:
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        got, _ = await exchange(port, big)
        assert got.startswith(b"HTTP/1.1 431 "), got[:80]
        got, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 "), got


@pytest.mark.parametrize("size", [70_000, 100_000])
async def test_a_head_just_over_the_limit_in_one_read_gets_431(size: int) -> None:
    """A head a little over 64 KiB arrives in one or two reads, whole before any read is
    counted: measured as it is parsed, it still gets 431 (it got through before), and a
    body behind it goes nowhere."""
    async with api(30.0, 5.0) as port:
        big = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nX-Big: " + b"a" * size
               + b"\r\n\r\nabcd")
        got, _ = await exchange(port, big)
        assert got.startswith(b"HTTP/1.1 431 "), got[:80]
        assert got.count(b"HTTP/1.1") == 1, got
