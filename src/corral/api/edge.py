"""The management API's edge: the front door's idle and header timeouts, head size limit and
a connection cap, on uvicorn's own HTTP protocol.

uvicorn closes a keep-alive connection ``timeout_keep_alive`` after a response, but a
connection that never sends a byte, or trickles a head, stays open for ever; this protocol
arms the same keep-alive timer when a connection opens, gives a request head
``header_timeout_s`` from its first byte (else 408) and at most ``max_head_bytes`` (else
431). Past ``limit_concurrency`` uvicorn itself answers 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.front.edge import close_gently
from corral.front.responses import error_response

__all__ = ["API_MAX_CONNECTIONS", "guarded_protocol", "uvicorn_limits"]

API_MAX_CONNECTIONS = 64  # inside the front door's descriptor reserve (corral.core.edge)


def uvicorn_limits(idle_timeout_s: float, header_timeout_s: float,
                   max_head_bytes: int = 64 * 1024) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: the protocol, the idle timeout, the cap."""
    return {"http": guarded_protocol(header_timeout_s, max_head_bytes),
            "timeout_keep_alive": idle_timeout_s or 365 * 86400.0,
            "limit_concurrency": API_MAX_CONNECTIONS}


def guarded_protocol(header_timeout_s: float, max_head_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the timer at connect, the head timeout and size."""

    class Guarded(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = -1  # -1: no head in progress
        _answered = False  # answered early: what still arrives is dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if self._answered:
                return
            super().data_received(data)
            if self._head_bytes > max_head_bytes:
                self._too_large()

        # The head is measured as the parser reads it (a whole head can arrive in one
        # read, so counting reads would let it through); past the limit the request is
        # answered 431 before it reaches the application.
        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_body(self, body: bytes) -> None:
            if not self._answered:  # answered at the head: its body goes nowhere
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._answered:
                super().on_message_complete()

        def _too_large(self) -> None:
            self._answer(431, f"the request head is larger than {max_head_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if header_timeout_s > 0:
                self._head_timer = self.loop.call_later(header_timeout_s, self._answer, 408,
                                                        "the request head did not arrive "
                                                        f"whole within {header_timeout_s:g} s")

        def on_headers_complete(self) -> None:
            too_large = self._head_bytes > max_head_bytes
            self._stop_head()
            if too_large:
                self._too_large()
                return
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head()
            super().connection_lost(exc)

        def _stop_head(self) -> None:
            self._head_bytes = -1
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _answer(self, status: int, message: str) -> None:
            self._stop_head()
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a response in progress (pipelining) is not cut into
            self._answered = True  # whatever else arrives, uvicorn answers nothing more
            if not self.transport.is_closing():
                self.transport.write(error_response(status, message, close=True))
                close_gently(self.transport)

    return Guarded
