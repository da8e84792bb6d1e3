"""The front door under the controller's switches: hold, release, refuse, retry, cut, drain."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from corral.front import FrontSettings, Upstream
from tests.front_fakes import DEADLINE, Door, Req, echo, front, openai_error, upstreams
from tests.waiting import until


def get(d: Door, path: str = "/health", **kw: object) -> asyncio.Task[httpx.Response]:
    """A request in the background, on its own client (so it can be cancelled)."""
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            return await c.get(path, **kw)  # type: ignore[arg-type]

    return asyncio.create_task(go())


async def test_held_requests_wait_then_go_in_arrival_order() -> None:
    """While holding, a request sees latency, not an error; route_to releases them all at once
    (in arrival order: the router's tests check the order; here fresh connections race)."""
    async with upstreams(echo) as [up], front() as d:
        tasks = []
        for i in range(5):
            tasks.append(get(d, f"/r{i}"))
            await until(lambda i=i: d.door.stats().held_now == i + 1, DEADLINE,
                        f"{i + 1} held")
        assert not any(t.done() for t in tasks)
        d.door.route_to(up.upstream)
        assert d.door.stats().held_now == 0 and d.door.in_flight(up.upstream) == 5
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * 5
        assert sorted(r.target for r in up.requests) == [f"/r{i}" for i in range(5)]
        stats = d.door.stats()
        assert stats.held_total == 5 and stats.released_total == 5 and stats.in_flight == 0


async def test_past_max_held_the_answer_is_503_at_once() -> None:
    """Past max_held a new request gets an OpenAI-style 503 at once, with Retry-After."""
    async with front(FrontSettings(max_held=2, retry_after_s=7)) as d:
        held = [get(d), get(d)]
        await until(lambda: d.door.stats().held_now == 2, DEADLINE, "2 held")
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            r = await c.post("/v1/chat/completions", json={"messages": []})
        assert "waiting" in openai_error(r, 503)
        assert r.json()["error"]["type"] == "unavailable_error"
        assert r.headers["retry-after"] == "7"
        d.door.refuse("test over")
        assert [t.status_code for t in await asyncio.gather(*held)] == [503, 503]
        assert d.door.stats().failed == {"held_overflow": 1, "refused": 2}


async def test_a_request_held_past_hold_timeout_gets_503() -> None:
    """A request held longer than hold_timeout_s gets a 503 with Retry-After."""
    async with front(FrontSettings(hold_timeout_s=0.05)) as d:
        r = await get(d)
        assert "ready within 0.05 s" in openai_error(r, 503)
        assert "retry-after" in r.headers
        assert d.door.stats().failed == {"hold_timeout": 1}


async def test_refuse_answers_held_and_new_requests_with_the_reason() -> None:
    """refuse() answers held and new requests with a 503 carrying its reason."""
    async with front() as d:
        held = get(d)
        await until(lambda: d.door.stats().held_now == 1, DEADLINE, "1 held")
        d.door.refuse("FATAL: 5 failed starts")
        assert openai_error(await held, 503) == "FATAL: 5 failed starts"
        assert openai_error(await get(d, "/v1/models"), 503) == "FATAL: 5 failed starts"


async def test_a_head_request_refused_gets_no_body() -> None:
    """A refused HEAD request gets a 503 with Content-Length but no body."""
    async with front() as d:
        d.door.refuse("stopping")
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            r = await c.head("/health")
        assert r.status_code == 503 and r.content == b"" and int(r.headers["content-length"]) > 0


async def slam(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """A crash: the connection closes before any answer."""
    return False


async def test_no_byte_from_a_crashed_upstream_means_one_retry_on_the_next() -> None:
    """The retry waits (parked) until the controller switches, then goes to the new server."""
    async with upstreams(slam, echo) as [a, b], front() as d:
        d.door.route_to(a.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            task = asyncio.create_task(c.post("/completion", content=b"prompt"))
            await until(lambda: d.door.stats().retried == 1, DEADLINE, "the retry")
            assert d.door.stats().held_now == 1   # parked: a is still the active upstream
            d.door.hold()                          # the controller noticed the crash
            d.door.route_to(b.upstream)            # ... and revived it
            r = await task
        assert r.status_code == 200 and r.json()["length"] == len(b"prompt")
        assert len(a.requests) == 1 and len(b.requests) == 1
        assert d.door.stats().failed == {}


async def test_a_second_failure_is_a_502() -> None:
    """A request whose retry fails too before any byte gets a 502."""
    async with upstreams(slam, slam) as [a, b], front() as d:
        d.door.route_to(a.upstream)
        task = get(d)
        await until(lambda: d.door.stats().retried == 1, DEADLINE, "the retry")
        d.door.route_to(b.upstream)
        assert "failed before answering" in openai_error(await task, 502)
        assert d.door.stats().failed == {"bad_gateway": 1}


async def test_an_active_upstream_that_refuses_connections_is_a_502_after_the_grace() -> None:
    """An active upstream refusing connections gives a 502 after one retry and the grace."""
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    dead = Upstream("127.0.0.1", s.getsockname()[1], 1)
    s.close()
    async with front(FrontSettings(retry_grace_s=0.05)) as d:
        d.door.route_to(dead)
        r = await get(d)
        assert "connect" in openai_error(r, 502)
        assert d.door.stats().retried == 1 and d.door.in_flight() == 0


async def test_a_stream_cut_midway_closes_the_client_and_is_counted() -> None:
    """A stream cut midway closes the client's connection, counted as cut, not retried."""
    async def cut(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        return False

    async with upstreams(cut) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/completion", json={"stream": True})
        stats = d.door.stats()
        assert stats.cut == 1 and stats.retried == 0 and stats.in_flight == 0


@pytest.mark.parametrize("head, body, cut", [
    # no length: the response ends with the connection, and is whole
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"all of it", 0),
    # an interim 100 first, then the same
    (b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"all of it", 0),
    # a declared length not reached: cut
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 100\r\n\r\n", b"short", 1),
])
async def test_a_response_that_ends_with_its_connection(head: bytes, body: bytes,
                                                        cut: int) -> None:
    """A response with no length ends with its connection and is passed on whole; one that
    declared a length and stops short of it is a cut (its head read back after the fact)."""
    async def close_after(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter
                          ) -> bool:
        w.write(head)
        await w.drain()
        w.write(body)
        return False   # the fake closes the connection

    async with upstreams(close_after) as [up], front() as d:
        d.door.route_to(up.upstream)
        async with httpx.AsyncClient(base_url=d.url, timeout=DEADLINE) as c:
            if cut:
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.get("/r")
            else:
                assert (await c.get("/r")).content == body
        await until(lambda: d.door.stats().in_flight == 0, DEADLINE, "the exchange ended")
        assert d.door.stats().cut == cut


def gated(gate: asyncio.Event):  # type: ignore[no-untyped-def]
    async def handler(req: Req, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.wait_for(gate.wait(), DEADLINE)
        return await echo(req, reader, w)

    return handler


async def test_drain_waits_for_the_last_in_flight_request() -> None:
    """drain() of the old upstream returns only after its last in-flight request ends."""
    gate = asyncio.Event()
    async with upstreams(gated(gate), echo) as [old, new], front() as d:
        d.door.route_to(old.upstream)
        slow = get(d)
        await until(lambda: len(old.requests) == 1, DEADLINE, "the request upstream")
        d.door.route_to(new.upstream)        # start-first: switch, then drain the old one
        assert (await get(d)).status_code == 200
        drain = asyncio.create_task(d.door.drain(old.upstream, DEADLINE))
        assert d.door.in_flight(old.upstream) == 1 and not drain.done()
        gate.set()
        assert await drain == 0
        assert (await slow).status_code == 200
        await until(lambda: old.closed == 1, DEADLINE,
                    "the old upstream's connection closed")


async def test_drain_times_out_and_says_how_many_were_left() -> None:
    """drain() past its timeout returns how many requests were still in flight."""
    gate = asyncio.Event()
    async with upstreams(gated(gate)) as [up], front() as d:
        d.door.route_to(up.upstream)
        slow = get(d)
        await until(lambda: d.door.in_flight(up.upstream) == 1, DEADLINE, "one in flight")
        d.door.hold()
        assert await d.door.drain(up.upstream, 0.05) == 1
        gate.set()
        assert (await slow).status_code == 200


async def test_close_lets_in_flight_finish_then_answers_held_503() -> None:
    """close() lets in-flight requests finish, then answers held ones 503 shutting down."""
    gate = asyncio.Event()
    async with upstreams(gated(gate)) as [up], front() as d:
        d.door.route_to(up.upstream)
        in_flight = get(d)
        await until(lambda: d.door.in_flight() == 1, DEADLINE, "one in flight")
        d.door.hold()
        held = get(d)
        await until(lambda: d.door.stats().held_now == 1, DEADLINE, "one held")
        closing = asyncio.create_task(d.door.close(DEADLINE))
        await asyncio.sleep(0)
        assert not closing.done() and not held.done()
        gate.set()
        await closing
        assert (await in_flight).status_code == 200
        assert "shutting down" in openai_error(await held, 503)
