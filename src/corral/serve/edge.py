"""``corral serve``'s public port: each request goes to the door of the model it names.

A plain ASGI app (served by uvicorn): it reads the request body whole (the model is named
inside it), finds the model (:mod:`corral.core.requested`), pokes the scheduler when that
model is not loaded, and streams the request to the model's own front door on loopback and
the answer back, chunk by chunk (SSE included). The model's door does the rest: it holds
the request while the model loads, retries once across a crash, and answers 503 with the
reason when the model failed. ``GET /v1/models`` lists every model with its state; an
unknown model is a 404 in the OpenAI error format that lists the ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from corral.core.placement import Phase
from corral.core.requested import model_in_body, model_in_query, upstream_path
from corral.serve.model import ServedModel

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"host", b"content-length"})
# A response keeps its length (the raw bytes are passed on as they came).
RESPONSE_HOP_BY_HOP = HOP_BY_HOP - {b"content-length"}
MAX_BODY = 64 * 1024 * 1024  # an audio upload fits; a runaway client does not


def openai_error(status: int, message: str, kind: str, code: str | None = None,
                 retry_after: int | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return status, headers, body


class Edge:
    def __init__(self, models: Mapping[str, ServedModel], aliases: Mapping[str, str],
                 poke: Callable[[], None]) -> None:
        self.models = models
        self.aliases = aliases
        self.poke = poke
        self.created = int(time.time())
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0), trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512))

    def find(self, name: str | None) -> ServedModel | None:
        if name is None:
            return None
        return self.models.get(self.aliases.get(name, name))

    def listing(self) -> dict[str, Any]:
        """``GET /v1/models``: the OpenAI list, with Corral's state of each model."""
        data = []
        for m in self.models.values():
            item: dict[str, Any] = {"id": m.id, "object": "model", "created": self.created,
                                    "owned_by": "corral", "state": m.shown.value,
                                    "aliases": list(m.serve.aliases)}
            if m.reason:
                item["reason"] = m.reason
            data.append(item)
        return {"object": "list", "data": data}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path in ("/v1/models", "/models") and method == "GET":
            return await _answer(send, 200, [(b"content-type", b"application/json")],
                                 json.dumps(self.listing()).encode())
        if path == "/health" and method == "GET":
            return await _answer(send, 200, [(b"content-type", b"application/json")],
                                 b'{"status":"ok"}')
        body = await _read_body(receive)
        if body is None:
            return await _answer(send, *openai_error(
                413, f"request body over {MAX_BODY // (1024 * 1024)} MiB",
                "invalid_request_error"))
        direct = upstream_path(path)
        name: str | None
        if direct is not None:
            name, path = direct
        else:
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            name = model_in_body(content_type, body) if body else None
            if name is None:
                name = model_in_query(scope["query_string"].decode("latin-1"))
        model = self.find(name)
        if model is None:
            return await _answer(send, *self._unknown(name))
        if model.phase is not Phase.LOADED:
            self.poke()  # the door holds it; the scheduler loads the model
        await _until_disconnect(self._forward(model, scope, path, body, send), receive)

    def _unknown(self, name: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        ids = ", ".join(sorted(self.models))
        if name is None:
            return openai_error(400, f"no model named in the request (the body's \"model\", "
                                f"or ?model=); models: {ids}", "invalid_request_error",
                                "model_not_found")
        return openai_error(404, f"the model {name!r} does not exist; models: {ids}",
                            "invalid_request_error", "model_not_found")

    async def _forward(self, model: ServedModel, scope: Scope, path: str, body: bytes,
                       send: Send) -> None:
        query = scope["query_string"]
        url = f"http://127.0.0.1:{model.port}{path}" + (f"?{query.decode()}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return await _answer(send, *openai_error(
                503, f"model {model.id!r} is not reachable: {exc}", "server_error",
                retry_after=2))
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.lower() not in RESPONSE_HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _until_disconnect(forward: Awaitable[None], receive: Receive) -> None:
    """Run ``forward`` unless the client hangs up first: then it is cancelled, which
    closes the connection to the model's door, which aborts llama-server's request (its
    slot is freed instead of generating for nobody)."""
    async def hung_up() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(forward)
    watch = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.done() and not work.cancelled():
        work.result()  # its exception, if it failed


async def _read_body(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
