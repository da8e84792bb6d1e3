"""The proxies ``bench.front_door`` measures, each run as a process of its own.

- ``front``: Corral's ``FrontDoor`` (httptools byte pump), routed to the upstream at once;
- ``aiohttp``: the off-the-shelf alternative, an aiohttp low-level server whose handler
  streams each request through an aiohttp ``ClientSession`` (keep-alive pool) and streams the
  answer back with ``StreamResponse`` (hop-by-hop headers dropped, as a proxy must);
- ``splice``: a bare TCP splice, two asyncio Protocols copying bytes: no HTTP at all, the
  floor for any proxy written in Python on that loop;
- ``paced``: not a proxy but an upstream whose streams are paced by a clock (a token every
  10 ms after 30 ms), to measure what a proxy adds to time to first token.

    .venv/bin/python -m bench.front_proxies --impl front --loop uvloop --listen P --upstream Q
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from typing import Any

from corral.cli.loop import LOOPS, run
from corral.front import FrontDoor, FrontSettings, Upstream

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}


async def front(listen: int, upstream: int) -> None:
    sock = socket.create_server(("127.0.0.1", listen), backlog=1024)
    door = FrontDoor(sock, FrontSettings())
    door.route_to(Upstream("127.0.0.1", upstream, 1))
    await door.serve()


async def aiohttp_pair(listen: int, upstream: int) -> None:
    from aiohttp import ClientSession, TCPConnector, web

    base = f"http://127.0.0.1:{upstream}"
    session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content if request.body_exists else None
        async with session.request(request.method, base + request.raw_path, headers=headers,
                                   data=data, allow_redirects=False,
                                   skip_auto_headers=("User-Agent", "Accept-Encoding")) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    runner = web.ServerRunner(web.Server(handler), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", listen, backlog=1024).start()
    try:
        await asyncio.Future()
    finally:
        await runner.cleanup()
        await session.close()


class _Half(asyncio.Protocol):
    """One side of a splice: what arrives is written to the peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def splice(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()

    class Client(_Half):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            loop.create_task(self.connect())

        async def connect(self) -> None:
            try:
                _, up = await loop.create_connection(_Half, "127.0.0.1", upstream)
            except OSError:
                assert self.transport is not None
                self.transport.close()
                return
            up.peer, self.peer = self, up
            for data in self.pending:
                up.transport.write(data)  # type: ignore[union-attr]
            self.pending.clear()

    server = await loop.create_server(Client, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


# The paced stream: what a stream of llama-server looks like on the wire, on a clock.
PACED_FIRST_S = 0.030   # "prompt processing": the head and the first token after this
PACED_EVERY_S = 0.010   # one token every 10 ms after it
PACED_TOKENS = 64


async def paced(listen: int, upstream: int) -> None:
    """Not a proxy: an upstream whose streams are paced by a clock, not by a CPU-bound
    model, so a proxy's added time to first token is not lost in the model's own spread.
    Every request gets ``PACED_TOKENS`` SSE events of llama-server's /completion form."""
    del upstream

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                await asyncio.sleep(PACED_FIRST_S)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for i in range(PACED_TOKENS):
                    if i:
                        await asyncio.sleep(PACED_EVERY_S)
                    last = i == PACED_TOKENS - 1
                    event = b'data: {"content": "x", "stop": %s}\n\n' % (
                        b"true" if last else b"false")
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


IMPLS: dict[str, Any] = {"front": front, "aiohttp": aiohttp_pair, "splice": splice,
                         "paced": paced}


async def main_async(impl: str, listen: int, upstream: int) -> None:
    task = asyncio.ensure_future(IMPLS[impl](listen, upstream))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=sorted(IMPLS), default="front")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="auto: what `corral supervise` runs by default (uvloop if installed)")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", type=int, required=True)
    ns = p.parse_args()
    run(main_async(ns.impl, ns.listen, ns.upstream), ns.loop)


if __name__ == "__main__":
    main()
