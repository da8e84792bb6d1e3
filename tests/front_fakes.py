"""Helpers for the front door tests: scripted in-process upstreams, a door fixture, raw
clients.

The upstreams are tiny HTTP/1.1 servers in the test's own loop (their own parser, not the
proxy's), scripted per test. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from corral.front import FrontDoor, FrontSettings, Upstream
from corral.front.timings import MonotonicClock

DEADLINE = 10.0


@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str = "HTTP/1.1"

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


Handler = Callable[[Req, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> Req | None:
    """One request off ``reader`` (None at EOF): head, then a Content-Length/chunked body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = [(k, v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)]
    req = Req(method, target, headers, b"", version)
    if (req.header("transfer-encoding") or "").lower() == "chunked":
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        req.body = b"".join(parts)
    elif n := int(req.header("content-length") or 0):
        req.body = await reader.readexactly(n)
    return req


def response(status: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None,
             reason: str = "OK") -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def echo(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Answers with what it saw, as JSON."""
    body = json.dumps({"method": req.method, "target": req.target, "headers": req.headers,
                       "sha256": hashlib.sha256(req.body).hexdigest(),
                       "length": len(req.body)}).encode()
    writer.write(response(200, body, {"Content-Type": "application/json", "X-Up": "yes"}))
    return True


@dataclass
class FakeUpstream:
    """An HTTP/1.1 server in the test's loop; ``handler`` answers each request."""

    handler: Handler = echo
    generation: int = 1
    requests: list[Req] = field(default_factory=list)
    connections: int = 0
    closed: int = 0          # connections that ended (EOF or error seen here)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> FakeUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def upstream(self) -> Upstream:
        return Upstream("127.0.0.1", self.port, self.generation)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while (req := await read_request(reader)) is not None:
                self.requests.append(req)
                if not await self.handler(req, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        if hasattr(self.server, "close_clients"):
            self.server.close_clients()
        await self.server.wait_closed()


@dataclass
class Door:
    door: FrontDoor
    port: int
    url: str


@contextlib.asynccontextmanager
async def front(settings: FrontSettings | None = None,
                clock: MonotonicClock | None = None) -> AsyncIterator[Door]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    door = FrontDoor(sock, settings or FrontSettings(), clock=clock)
    task = asyncio.create_task(door.serve())
    try:
        yield Door(door, port, f"http://127.0.0.1:{port}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def upstreams(*handlers: Handler) -> AsyncIterator[list[FakeUpstream]]:
    ups = [await FakeUpstream(h, generation=i + 1).start() for i, h in enumerate(handlers)]
    try:
        yield ups
    finally:
        for up in ups:
            await up.stop()


def client(d: Door, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=d.url, timeout=DEADLINE, **kw)  # type: ignore[arg-type]


async def raw(port: int, data: bytes, *, until_bytes: bytes = b"", n: int = 1,
              timeout: float = DEADLINE) -> bytes:
    """Send ``data`` on a fresh connection; read until ``until_bytes`` seen ``n`` times."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        got = b""
        async with asyncio.timeout(timeout):
            while got.count(until_bytes) < n:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def openai_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == status
    assert resp.headers["content-type"].startswith("application/json")
    return str(body["error"]["message"])
