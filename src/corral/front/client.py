"""The client side: requests parsed off one client connection, as exchanges.

An ``Exchange`` is one request from its first byte to the end of its response. Its ``buf``
holds what is to be sent upstream: the head, then the body as it arrives. Until the first
response byte comes back the whole request is kept there, so it can be sent again (the
crash retry); after that, what was sent is dropped and the rest is streamed.

The common request (head and body in one read, nothing pipelined behind it) is forwarded as
the very bytes received. Otherwise the head is rebuilt from the parsed pieces, byte for byte
the same headers in the same order, and a chunked body is re-framed chunk for chunk.
Pipelined requests queue on the connection and are answered in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

import httptools

if TYPE_CHECKING:
    from corral.front.model import Upstream


class ClientEvents(Protocol):
    """What a client connection tells the front door (which implements this)."""

    def client_opened(self, client: ClientConn) -> None: ...

    def pump(self, ex: Exchange) -> None: ...

    def bad_request(self, client: ClientConn, message: str) -> None: ...

    def client_lost(self, client: ClientConn) -> None: ...


class HeadEvents(Protocol):
    """What a client connection tells the edge (``edge.Edge``) about request heads."""

    max_head_bytes: int

    def busy(self, client: ClientConn) -> None:
        """A request began: the connection is no longer idle."""

    def head_began(self, client: ClientConn) -> None:
        """A read ended with a head begun and not whole: its header timeout runs."""

    def head_ended(self, client: ClientConn) -> None: ...

    def head_too_large(self, client: ClientConn) -> None: ...


class AttemptConn(Protocol):
    """The upstream connection an exchange's attempt runs on (``upstream.UpstreamConn``)."""

    @property
    def upstream(self) -> Upstream: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    def send(self, ex: Exchange) -> None: ...

    def set_reading(self, on: bool) -> None: ...

    def unbind(self) -> None: ...


class Exchange:
    """One request and its response, across attempts."""

    __slots__ = ("client", "method", "url", "version", "headers", "is_head", "keep_alive",
                 "expect_continue", "chunked", "buf", "sent", "body_done", "submitted",
                 "upstream", "conn", "attempt", "responded", "retried", "stale_retried",
                 "timer", "gone", "began")

    def __init__(self, client: ClientConn) -> None:
        self.client = client
        self.method = b""
        self.url = b""
        self.version: str | None = None  # read from the parser only if the head is rebuilt
        self.headers: list[tuple[bytes, bytes]] = []
        self.is_head = False
        self.keep_alive = True
        self.expect_continue = False
        self.chunked = False
        self.buf: list[bytes] = []       # to send upstream; buf[:sent] went to the current conn
        self.sent = 0
        self.body_done = False
        self.submitted = False
        self.upstream: Upstream | None = None   # set while an attempt counts as in flight
        self.conn: AttemptConn | None = None
        self.attempt = 0                # bumped per attempt: a late connect finds it stale
        self.responded = False          # a response byte came: no retry any more
        self.retried = False            # the one crash retry was used
        self.stale_retried = False      # a pooled connection was found dead: free retry used
        self.timer: asyncio.TimerHandle | None = None
        self.gone = False               # the client left or was answered
        self.began = 0.0                # when its head was whole (the door's clock)

    def build_head(self) -> bytes:
        parts = [self.method, b" ", self.url, b" HTTP/", (self.version or "1.1").encode(),
                 b"\r\n"]
        for name, value in self.headers:
            if self.expect_continue and name.lower() == b"expect":
                continue  # the front door answered the 100 itself; the body follows anyway
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ClientConn:
    """One client connection: parses requests, queues them, hands them to the door.

    An ``asyncio.Protocol`` by its methods, not by inheritance: the loop only calls them,
    and a class compiled by mypyc (``setup.py``) cannot inherit from a Python class.
    """

    def __init__(self, door: ClientEvents, edge: HeadEvents | None = None) -> None:
        self.door = door
        self.edge = edge   # None: no limit on heads (their size and time)
        self.in_head = False      # a request's head began and is not whole yet
        self.head_timed = False   # ... and a read ended so: the edge times it
        self.head_bytes = 0       # bytes read since it began (at most one read too many)
        self.parsed_head = 0      # its URL and headers as parsed so far
        self.too_large = False    # a head over the limit was parsed: answered 431
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()   # queue[0] is the one being answered
        self.parsing: Exchange | None = None
        self.closing = False                    # closes after the response in progress
        self.write_paused = False
        self._new: list[Exchange] = []
        self._begins = 0

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.door.client_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closing and not self.queue:
            return  # answered early (400, 408, 431, 503) and closing: nothing more is read
        fresh = self.parsing is None
        self._begins = 0
        try:
            self.parser.feed_data(data)  # not through _feed: one call less per request
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._parse_failed(data, exc):
                return
        if self.too_large and self.edge is not None:
            self.edge.head_too_large(self)
            return
        if self.in_head and self.edge is not None:
            self.head_bytes += len(data)
            if self.head_bytes > self.edge.max_head_bytes:
                self.edge.head_too_large(self)
                return
            if not self.head_timed:  # a head whole in the read that began it is never timed
                self.head_timed = True
                self.edge.head_began(self)
        if self._new:
            whole = fresh and self._begins == 1 and self.parsing is None
            for ex in self._new:
                if whole and not ex.expect_continue:
                    ex.buf[:] = [data]   # exactly one whole request: forward it as received
                else:
                    if ex.version is None:  # the last to begin: the parser still has it
                        ex.version = self.parser.get_http_version()
                    ex.buf[0] = ex.build_head()
            self._new.clear()
        if self.queue:
            self.door.pump(self.queue[0])

    def _feed(self, data: bytes) -> bool:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            return self._parse_failed(data, exc)
        return True

    def _parse_failed(self, data: bytes, exc: Exception) -> bool:
        """False when the request was malformed (answered 400)."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            # An Upgrade (h2c, websocket) request: llama-server ignores the header and
            # answers in HTTP/1.1, so it is forwarded as a plain request.
            rest = data[exc.args[0]:]
            self._begins += 2  # not forwarded as received
            return self._feed(rest) if rest else True
        self.door.bad_request(self, f"malformed HTTP request: {exc}")
        return False

    def eof_received(self) -> bool:
        return False  # close; anything in flight for this client is abandoned

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.client_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._upstream_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._upstream_reading(True)

    def _upstream_reading(self, on: bool) -> None:
        conn = self.queue[0].conn if self.queue else None
        if conn is not None:
            conn.set_reading(on)

    # ---- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._new and self._new[-1].version is None:
            # Another request in the read that completed the last head: that head will be
            # rebuilt, and until this one's request line is parsed the parser still holds
            # its version (reading it formats a string: done only for rebuilt heads).
            self._new[-1].version = self.parser.get_http_version()
        self._begins += 1
        self.parsing = Exchange(self)
        self.in_head = True
        self.head_bytes = 0
        self.parsed_head = 0
        if self.edge is not None:
            self.edge.busy(self)

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        self.parsed_head += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.headers.append((name, value))
        n = len(name)
        self.parsed_head += n + len(value) + 4
        if n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            ex.expect_continue = True
        elif n == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            ex.chunked = True

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.in_head = False
        if self.edge is not None:
            if self.head_timed:
                self.head_timed = False
                self.edge.head_ended(self)
            # A head can arrive whole in one read, before any read is counted: measured as
            # parsed, an oversized one is never queued (431 once this read is parsed).
            if self.parsed_head > self.edge.max_head_bytes:
                self.too_large = True
                return
        parser = self.parser
        ex.method = parser.get_method()
        ex.keep_alive = parser.should_keep_alive()
        ex.is_head = ex.method == b"HEAD"
        ex.buf.append(b"")  # the head's place, filled in after this read
        self.queue.append(ex)
        self._new.append(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.chunked:
            ex.buf += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            ex.buf.append(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if ex.chunked:
            ex.buf.append(b"0\r\n\r\n")
        ex.body_done = True
        self.parsing = None

    # ---- called by the door -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():   # uvloop raises on a closed transport
            self.transport.write(data)

    def is_idle(self) -> bool:
        return not self.queue and self.parsing is None
