"""The front door forwards transparently: methods, headers, bodies, streams, keep-alive."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import httpx

from tests.front_fakes import (
    DEADLINE,
    Req,
    echo,
    front,
    raw,
    response,
    upstreams,
)
from tests.waiting import until


async def test_methods_headers_and_bodies_pass_through() -> None:
    """What the client sends is what llama-server gets, and back; header names keep case."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                body = b"" if method in ("GET", "OPTIONS") else os.urandom(1000)
                r = await c.request(method, "/v1/x?a=1&b=%20", content=body or None,
                                    headers={"Authorization": "Bearer sk-1", "X-Mixed-Case": "v"})
                assert r.status_code == 200 and r.headers["x-up"] == "yes"
                seen = r.json()
                assert seen["method"] == method and seen["target"] == "/v1/x?a=1&b=%20"
                assert ["Authorization", "Bearer sk-1"] in seen["headers"]
                assert ["X-Mixed-Case", "v"] in seen["headers"]
                assert seen["sha256"] == hashlib.sha256(body).hexdigest()
        stats = d.door.stats()
        assert stats.requests_total == {"2xx": 6} and stats.in_flight == 0


async def test_a_100_mb_body_arrives_whole() -> None:
    """No 64 KiB limit: a multimodal-sized body streams through intact."""
    body = os.urandom(1 << 20) * 100
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", content=body)
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_request_body_is_forwarded() -> None:
    """A Transfer-Encoding: chunked request body arrives whole, however it was cut."""
    parts = [os.urandom(n) for n in (1, 10, 100_000, 7)]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            r = await c.post("/completion", content=gen())
        seen = r.json()
        assert ["Transfer-Encoding", "chunked"] in seen["headers"] or \
            ["transfer-encoding", "chunked"] in seen["headers"]
        assert seen["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_keep_alive_both_sides() -> None:
    """Twenty requests on one client connection use one upstream connection."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        reqs = b"".join(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(20))
        got = await raw(d.port, reqs, until_bytes=b"HTTP/1.1 200", n=20)
        assert got.count(b"HTTP/1.1 200") == 20
        assert up.connections == 1 and len(up.requests) == 20


async def test_a_keep_alive_client_follows_a_switch() -> None:
    """Consecutive requests on one client connection go to whichever upstream is active."""
    async with upstreams(echo, echo) as [a, b], front() as d:
        d.door.route_to(a.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            assert (await c.get("/one")).status_code == 200
            d.door.route_to(b.upstream)
            assert (await c.get("/two")).status_code == 200
        assert [r.target for r in a.requests] == ["/one"]
        assert [r.target for r in b.requests] == ["/two"]


async def test_sse_chunks_arrive_as_they_are_sent() -> None:
    """Each SSE event reaches the client before llama-server sends the next."""
    received = asyncio.Event()

    async def sse(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = f"data: {{\"n\": {i}}}\n\n".encode()
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
            await asyncio.wait_for(received.wait(), DEADLINE)  # the client saw it first
            received.clear()
        w.write(b"0\r\n\r\n")
        return True

    async with upstreams(sse) as [up], front() as d:
        d.door.route_to(up.upstream)
        seen = []
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c, \
                c.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    seen.append(line)
                    received.set()
        assert seen == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}']


async def test_a_client_that_hangs_up_closes_its_upstream_connection() -> None:
    """llama-server sees the socket close, so it can cancel the task and free the slot."""
    upstream_saw_close = asyncio.Event()

    async def endless(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        if await reader.read(1) == b"":   # EOF: the proxy closed the connection
            upstream_saw_close.set()
        return False

    async with upstreams(endless) as [up], front() as d:
        d.door.route_to(up.upstream)
        got = await raw(d.port, b"POST /completion HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 0\r\n\r\n", until_bytes=b"hello")
        assert b"hello" in got   # raw() closed the client connection after that
        await asyncio.wait_for(upstream_saw_close.wait(), DEADLINE)
        await until(lambda: d.door.in_flight() == 0, DEADLINE, "in-flight to drop to 0")


async def test_head_204_304_and_1xx_end_where_they_should() -> None:
    """Responses without a body do not hang the connection; the next request follows."""
    async def bodiless(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if req.method == "HEAD":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        elif req.target == "/204":
            w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif req.target == "/304":
            w.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + response(200, b"done"))
        return True

    async with upstreams(bodiless) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            for _ in range(2):
                head = await c.head("/x")
                assert head.status_code == 200 and head.headers["content-length"] == "1234"
                assert (await c.get("/204")).status_code == 204
                assert (await c.get("/304")).status_code == 304
                final = await c.get("/hints")
                assert final.status_code == 200 and final.content == b"done"
        assert up.connections == 1


async def test_expect_100_continue_is_answered_and_the_body_forwarded() -> None:
    """The door answers Expect: 100-continue itself and forwards the body without the header."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.readuntil(b"}"), DEADLINE)
        writer.close()
        await writer.wait_closed()
        assert final.startswith(b"HTTP/1.1 200")
        assert hashlib.sha256(b"hello").hexdigest().encode() in final
        assert up.requests[0].header("expect") is None


async def test_pipelined_requests_are_answered_in_order() -> None:
    """Pipelined requests, fixed-length and chunked, are forwarded and answered in order."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        reqs = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nde\r\n0\r\n\r\n")
        got = await raw(d.port, reqs, until_bytes=b"HTTP/1.1 200", n=3)
        assert got.count(b"HTTP/1.1 200") == 3
        assert [r.target for r in up.requests] == ["/a", "/b", "/c"]
        assert [r.body for r in up.requests] == [b"abc", b"", b"de"]
        assert got.index(b'"/a"') < got.index(b'"/b"') < got.index(b'"/c"')


async def test_each_request_keeps_its_http_version_when_its_head_is_rebuilt() -> None:
    """Heads rebuilt from the parse (pipelined, or cut across reads) carry their own
    request's HTTP version: the parser is asked only when a head is rebuilt, and must be
    asked before the next request line replaces it."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        reqs = (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await raw(d.port, reqs, until_bytes=b" 200 ", n=4)
        assert got.count(b" 200 ") == 4
        # one request's head cut in two reads, the next one behind it in the second read
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"GET /e HTTP/1.0\r\nConnection: keep-")
        await writer.drain()
        await until(lambda: any(c.head_timed for c in d.door.edge.open), DEADLINE,
                    "the first read parsed, its head not whole")
        writer.write(b"alive\r\n\r\nGET /f HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await until(lambda: len(up.requests) == 6, DEADLINE, "both forwarded")
        writer.close()
    assert [(r.target, r.version) for r in up.requests] == [
        ("/a", "HTTP/1.0"), ("/b", "HTTP/1.1"), ("/c", "HTTP/1.0"), ("/d", "HTTP/1.1"),
        ("/e", "HTTP/1.0"), ("/f", "HTTP/1.1")]


async def test_a_malformed_request_gets_400_and_a_close() -> None:
    """A malformed request gets a 400 invalid_request_error and never reaches the upstream."""
    async with upstreams(echo) as [up], front() as d:
        d.door.route_to(up.upstream)
        got = await raw(d.port, b"NOT HTTP AT ALL\r\n\r\n", until_bytes=b"}")
        assert got.startswith(b"HTTP/1.1 400") and b"invalid_request_error" in got
        assert up.requests == [] and d.door.stats().failed == {"bad_request": 1}

