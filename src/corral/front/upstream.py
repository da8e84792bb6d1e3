"""The upstream side: connections to one llama-server, and the pool of idle ones.

An ``UpstreamConn`` carries one exchange at a time. Response bytes are written to the client
as they arrive, unchanged; a response parser runs over the same bytes only to learn the
status, whether the connection may be kept, and where the response ends (Content-Length,
chunked, or the end of the connection). HEAD answers have a head saying how long a body they
do not have, so their end is known from the request, and the parser is replaced after one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

import httptools

from corral.front.model import Upstream

if TYPE_CHECKING:
    from corral.front.client import Exchange

log = logging.getLogger("corral.front")

MAX_IDLE_PER_UPSTREAM = 64


class UpstreamEvents(Protocol):
    """What an upstream connection tells the front door (which implements this)."""

    def response_done(self, ex: Exchange, conn: UpstreamConn) -> None: ...

    def upstream_lost(self, conn: UpstreamConn, exc: Exception | None) -> None: ...

    status_classes: list[int]  # responses by status class: [0, 1xx, 2xx, 3xx, 4xx, 5xx]


class UpstreamConn:
    """A connection to one upstream (an ``asyncio.Protocol`` by its methods, as
    ``client.ClientConn`` is)."""

    def __init__(self, door: UpstreamEvents, upstream: Upstream) -> None:
        self.door = door
        self.upstream = upstream
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.ex: Exchange | None = None
        self.reused = False          # it served a response before (it may have gone stale)
        self.parser: httptools.HttpResponseParser | None = None
        self.final = False           # the head of the final (non-1xx) response arrived
        self.complete = False
        self.keep_alive = False
        self.head: list[bytes] = []  # what arrived until the final head was parsed
        self.reading = True
        self.paused_client = False   # this connection paused the client's reading

    # ---- the exchange ---------------------------------------------------------------------

    def bind(self, ex: Exchange) -> None:
        self.ex = ex
        ex.conn = self
        ex.sent = 0
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(_HeadCallbacks(self))
        self.final = self.complete = self.keep_alive = False
        self.head = []
        if ex.client.write_paused:
            self.set_reading(False)

    def send(self, ex: Exchange) -> None:
        """Write what the exchange has that this connection has not sent yet."""
        buf = ex.buf
        n = len(buf)
        if ex.sent < n and not self.transport.is_closing():  # else connection_lost follows
            if n - ex.sent == 1:
                self.transport.write(buf[-1])
            else:
                self.transport.writelines(buf[ex.sent:])
            ex.sent = n
        if ex.responded and n:
            buf.clear()   # no retry any more: keep no copy
            ex.sent = 0

    def unbind(self) -> None:
        if self.paused_client and self.ex is not None:
            self.paused_client = False
            if not self.ex.client.transport.is_closing():
                self.ex.client.transport.resume_reading()
        if self.ex is not None and self.ex.is_head:
            self.parser = None  # it still expects the body the head announced
        self.ex = None
        if not self.reading:
            self.set_reading(True)

    def set_reading(self, on: bool) -> None:
        if on != self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = on
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None or self.parser is None:
            self.transport.abort()  # bytes nobody asked for: the connection is out of step
            return
        if not ex.responded:
            ex.responded = True
            del ex.buf[:ex.sent]
            ex.sent = 0
        if not self.final:
            self.head.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.warning("front door: malformed response from llama-server on port %d: %s",
                        self.upstream.port, exc)
            self.transport.abort()
            return
        client = ex.client.transport
        if client.is_closing():   # the client is leaving: client_lost will abort this one
            return
        client.write(data)
        if self.complete:
            self.door.response_done(ex, self)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.ex is not None and not self.paused_client:
            client = self.ex.client.transport
            if not client.is_closing():
                self.paused_client = True
                client.pause_reading()

    def resume_writing(self) -> None:
        if self.ex is not None and self.paused_client:
            self.paused_client = False
            client = self.ex.client.transport
            if not client.is_closing():
                client.resume_reading()

    # ---- httptools callbacks ------------------------------------------------------------

    def on_headers_complete(self) -> None:
        assert self.parser is not None and self.ex is not None
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx: forwarded, the final answer follows
        self.final = True
        self.keep_alive = self.parser.should_keep_alive()
        self.door.status_classes[min(status // 100, 5)] += 1  # inline: once per request
        if self.ex.is_head or status == 204 or status == 304:
            self.complete = True

    def on_message_complete(self) -> None:
        if self.final:
            self.complete = True
            self.head = []  # not needed once the end came: pooled, it would pin a chunk

    def is_eof_delimited(self) -> bool:
        """The response's end is the end of the connection (no length, not chunked)."""
        return (self.final and not self.complete
                and not final_head_declares_length(b"".join(self.head)))


class _HeadCallbacks:
    """The response parser's callbacks, without ``on_header``: with it, llhttp calls into
    Python once per header of every response. The headers matter only when a connection
    ends before its response did (is that the end the response declared?), and then they
    are read from the saved head (``final_head_declares_length``)."""

    __slots__ = ("on_headers_complete", "on_message_complete")

    def __init__(self, conn: UpstreamConn) -> None:
        self.on_headers_complete = conn.on_headers_complete
        self.on_message_complete = conn.on_message_complete


def final_head_declares_length(raw: bytes) -> bool:
    """Whether the final (non-1xx) response head at the start of ``raw`` has a
    Content-Length or Transfer-Encoding header, i.e. its end is in the bytes rather than
    at the end of the connection."""
    for head in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        status_line, _, fields = head.partition(b"\n")
        if status_line[9:10] == b"1":
            continue  # an interim 1xx head: the final one follows
        names = {line.partition(b":")[0].strip().lower() for line in fields.split(b"\n")}
        return bool(names & {b"content-length", b"transfer-encoding"})
    return False


class Pool:
    """Idle keep-alive connections per upstream, newest first."""

    def __init__(self) -> None:
        self._idle: dict[Upstream, list[UpstreamConn]] = {}

    def take(self, upstream: Upstream) -> UpstreamConn | None:
        idle = self._idle.get(upstream)
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpstreamConn) -> None:
        idle = self._idle.setdefault(conn.upstream, [])
        if len(idle) >= MAX_IDLE_PER_UPSTREAM:
            conn.transport.close()
            return
        conn.reused = True
        idle.append(conn)

    def discard(self, conn: UpstreamConn) -> None:
        idle = self._idle.get(conn.upstream)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.upstream]

    def close_idle(self, upstream: Upstream | None = None) -> None:
        """Close the idle connections to ``upstream`` (to every upstream with None)."""
        ups = list(self._idle) if upstream is None else [upstream]
        for up in ups:
            for conn in self._idle.pop(up, []):
                conn.transport.close()

    def idle_count(self, upstream: Upstream) -> int:
        return len(self._idle.get(upstream, []))
