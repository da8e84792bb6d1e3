"""Driving one request through an ASGI app by hand, reading its body as it streams.

httpx's ASGITransport waits for the whole body, which an endless SSE stream never ends;
this drives the app with our own ``receive``/``send`` so a test can read the first events,
hang up (``http.disconnect``) and check that the app returned and left no task behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]


class AsgiStream:
    def __init__(self, app: Any, path: str, query: str = "",
                 headers: dict[str, str] | None = None, method: str = "GET") -> None:
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8084),
        }
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        self._asked = False
        self._gone = asyncio.Event()
        self.task = asyncio.create_task(app(self.scope, self._receive, self._send))

    async def _receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        await self._messages.put(message)

    async def _next(self) -> None:
        message = await self._messages.get()
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            self.complete = not message.get("more_body", False)

    @property
    def text(self) -> str:
        return self.body.decode()

    async def read_until(self, condition: Callable[[str], bool], what: str,
                         timeout: float = 5.0) -> str:
        """Read until ``condition(body so far)``; fail after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not condition(self.text):
                    if self.complete:
                        raise AssertionError(f"the response ended before {what}: {self.text!r}")
                    await self._next()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; body: {self.text!r}") from None
        return self.text

    async def read_to_end(self, timeout: float = 5.0) -> str:
        await self.read_until(lambda _: self.complete, "the end of the response", timeout)
        async with asyncio.timeout(timeout):
            await self.task
        return self.text

    async def hang_up(self, timeout: float = 5.0) -> None:
        """The client disconnects; the app must return."""
        self._gone.set()
        async with asyncio.timeout(timeout):
            await self.task


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The messages of an SSE body: ``{"id", "event", "data"}`` each; comments as
    ``{"comment": ...}``."""
    out: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        message: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                message["comment"] = line[1:].strip()
                continue
            field, _, value = line.partition(": ")
            message[field] = value
        out.append(message)
    return out


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every task but the current one (what a stream may have left behind)."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
