"""Streams, change history and operations: ``/v1/events``, ``/v1/logs``, ``/v1/changes``,
``/v1/restart`` and ``/v1/changes/{id}/revert``.

Streams are Server-Sent Events over a plain ``StreamingResponse``::

    id: 42
    event: state
    data: {"id":42,"time":1760000000.123,"kind":"state","from":"RUNNING","to":"APPLYING",...}

A client that reconnects with ``Last-Event-ID: 42`` (or ``?since=42``) first gets what
came after 42 and is still in the bounded buffer; when the oldest kept is newer than asked
(or the supervisor restarted and numbers from 1 again) it gets an ``event: gap`` first, with
no ``id``. A ``: keep-alive`` comment goes out every 15 s of silence. A stream ends when the
client hangs up (Starlette cancels it) or when the supervisor stops (the controller enters
STOPPING): the HTTP server can then shut down without waiting for anyone.

The two stream routes are left out of the OpenAPI description (an endless response is
nothing a schema-driven client or fuzzer can use); they are documented here and in the
README.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from corral.api.answers import (
    change_result,
    error,
    note_refusal,
    record_result,
    store_unreachable,
)
from corral.api.schemas import ChangeResult, ErrorBody
from corral.core.args import Change
from corral.errors import CorralError, StoreUnavailable
from corral.observe.audit import AuditLog
from corral.observe.events import Event, EventBus, Line, LineBus
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.operate import REVERT, NoBefore, admit_whole, before_of

if TYPE_CHECKING:
    from corral.supervisor.seams import FleetGate
    from corral.supervisor.view import Supervisor

__all__ = ["Closing", "format_sse", "observe_router", "replay_start"]

KEEPALIVE_S = 15.0
MAX_TAIL = 10_000
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

T = TypeVar("T", Event, Line)
Ring = EventBus | LineBus


class RestartResult(ChangeResult):
    pid: int | None = None
    generation: int = 0


def format_sse(event: str, data: Any, id: int | None = None) -> bytes:
    """One SSE message (the JSON is on one line, so one ``data:`` field)."""
    head = f"id: {id}\n" if id is not None else ""
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


def replay_start(ring: Ring, asked: int) -> tuple[int, dict[str, Any] | None]:
    """Where a stream resumes for a client that last saw ``asked``, and the gap notice to
    send first (None if nothing was lost)."""
    newest = ring.last_id
    if asked > newest:  # ids from a previous supervisor: this one numbers from 1 again
        kept = ring.since(0)
        return 0, {"asked": asked, "oldest": kept[0].id if kept else None, "missed": None,
                   "reset": True}
    kept = ring.since(asked)
    if kept and kept[0].id > asked + 1:
        return asked, {"asked": asked, "oldest": kept[0].id,
                       "missed": kept[0].id - asked - 1, "reset": False}
    return asked, None


def last_event_id(request: Request, since: int | None) -> int | None:
    """``Last-Event-ID`` (a reconnect) wins over ``?since=``."""
    header = request.headers.get("last-event-id", "").strip()
    return int(header) if header.isdigit() else since


class Closing:
    """Ends every open stream when the supervisor stops."""

    def __init__(self) -> None:
        self.closed = False
        self._future: asyncio.Future[None] | None = None

    def future(self) -> asyncio.Future[None]:
        """Resolved when the supervisor stops (one per event loop, shared by the streams)."""
        loop = asyncio.get_running_loop()
        if self._future is None or self._future.get_loop() is not loop:
            self._future = loop.create_future()
            if self.closed:
                self._future.set_result(None)
        return self._future

    def close(self) -> None:
        self.closed = True
        future = self._future
        if future is not None and not future.done() and not future.get_loop().is_closed():
            future.get_loop().call_soon_threadsafe(_resolve, future)

    def on_event(self, event: Event) -> None:
        if event.kind == "state" and event.data.get("to") == "STOPPING":
            self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def follow(ring: Ring, after: int, closing: Closing,
                 keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[Any]:
    """Each item of ``ring`` after ``after``, as it comes; ``None`` after each
    ``keepalive_s`` of silence. Ends when ``closing`` closes (after what is already in the
    ring); one task at most runs for it, and none is left when it ends or is cancelled.

    The ring's own ``follow`` serves only to wake this up (a fresh one per wait, started
    when nothing is new: it cannot miss an item); what to send is read with ``since``.
    """
    closed = closing.future()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            while news := ring.since(after):  # again: more may come while one is sent
                for item in news:
                    after = item.id
                    yield item
            if closing.closed:
                return
            waker = cast("AsyncGenerator[Any, None]", ring.follow(after))  # an async def
            pending = asyncio.ensure_future(anext(waker))
            done, _ = await asyncio.wait({pending, closed}, timeout=keepalive_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                await waker.aclose()  # suspended at its yield: closes at once
            else:
                pending.cancel()  # ends the waker by its own CancelledError
                await asyncio.wait({pending})
            pending = None
            if not done:
                yield None
    finally:
        if pending is not None:
            pending.cancel()


def observe_router(controller: Supervisor, lines: LineBus, audit: AuditLog | None, *,
                   fleet: FleetGate | None = None,
                   keepalive_s: float = KEEPALIVE_S) -> APIRouter:
    """The routes of this module, on ``controller``'s events, the ``lines`` of the logs and
    the ``audit`` log (None: no history kept, and ``/v1/changes`` answers 404)."""
    router = APIRouter()
    closing = Closing()
    controller.events.listen(closing.on_event)
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}}

    def sse(stream: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)

    async def event_stream(after: int, gap: dict[str, Any] | None) -> AsyncIterator[bytes]:
        if gap is not None:
            yield format_sse("gap", gap)
        async for item in follow(controller.events, after, closing, keepalive_s):
            yield KEEPALIVE if item is None else format_sse(item.kind, item.to_json(), item.id)

    async def line_stream(after: int, gap: dict[str, Any] | None) -> AsyncIterator[bytes]:
        if gap is not None:
            yield format_sse("gap", gap)
        async for item in follow(lines, after, closing, keepalive_s):
            yield KEEPALIVE if item is None else format_sse("line", item.to_json(), item.id)

    @router.get("/v1/events", include_in_schema=False)
    async def get_events(request: Request, since: int | None = Query(None, ge=0)
                         ) -> StreamingResponse:
        """SSE: every event after ``Last-Event-ID``/``since`` (default: only new ones)."""
        asked = last_event_id(request, since)
        if asked is None:
            return sse(event_stream(controller.events.last_id, None))
        return sse(event_stream(*replay_start(controller.events, asked)))

    @router.get("/v1/logs", responses=errors)
    async def get_logs(request: Request,
                       tail: Annotated[int, Query(ge=0, le=MAX_TAIL, description=(
                           "how many of the newest lines"))] = 200,
                       follow_: Annotated[bool, Query(alias="follow",
                                                      include_in_schema=False)] = False,
                       since: Annotated[int | None, Query(ge=0, include_in_schema=False)] = None,
                       ) -> Any:
        """The newest lines of llama-server's output (``source`` "llama-server") and of the
        supervisor's own log ("corral"): ``[{id, time, source, text}, ...]``, oldest first.

        ``?follow=1`` streams them as SSE instead (``event: line``): the last ``tail`` lines,
        then each new one; a reconnect with ``Last-Event-ID`` resumes after that line.
        """
        if not follow_:
            return [line.to_json() for line in lines.tail(tail)]
        asked = last_event_id(request, since)
        if asked is None:
            recent = lines.tail(tail)
            return sse(line_stream(recent[0].id - 1 if recent else lines.last_id, None))
        return sse(line_stream(*replay_start(lines, asked)))

    @router.get("/v1/changes", responses=errors)
    async def get_changes(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JSONResponse:
        """The change history, newest first: every change's outcome (``kind`` "change"),
        start-ups ("start-up") and changes the API refused ("refused"), from the audit log
        (it survives restarts). Each has ``time``, ``id``, ``source``, ``client``,
        ``outcome``, ``error``, ``duration_s``, ``strategy``, ``restarted``, ``diff``
        (``{flag: [before, after]}``) and the whole ``before``/``after`` configs."""
        if audit is None:
            return error(404, "this supervisor keeps no change history")
        return JSONResponse({"changes": audit.last(limit)})

    @router.post("/v1/restart", response_model=RestartResult,
                 responses={**errors, 422: {"model": RestartResult},
                            503: {"model": RestartResult}})
    async def post_restart(request: Request) -> JSONResponse:
        """Restart llama-server with the config in effect, also out of BACKOFF or FATAL.

        Goes through the controller like an apply (never beside one) and answers like one:
        200 once the new server is ready (with its ``pid`` and ``generation``), 422 if it
        failed to start, 503 if the supervisor is stopping.
        """
        record = controller.restart(_client(request))
        await asyncio.shield(record.done)  # a client hanging up must not cancel the restart
        response = record_result(record)
        status = controller.status()
        body = json.loads(bytes(response.body))
        body.update(pid=status.pid, generation=status.generation)
        return JSONResponse(body, response.status_code)

    @router.post("/v1/changes/{change_id}/revert", response_model=ChangeResult,
                 responses={**errors, 409: {"model": ErrorBody},
                            422: {"model": ChangeResult}, 500: {"model": ChangeResult},
                            503: {"model": ChangeResult}})
    async def post_revert(change_id: str, request: Request) -> JSONResponse:
        """Apply the whole config that was in effect before change ``change_id`` (from the
        supervisor's memory, else from the audit log); answers like ``POST /v1/params``.
        404 if the change is unknown, 409 if it never ran."""
        client = _client(request)
        try:
            before = before_of(controller, audit, change_id)
        except NoBefore as exc:
            return error(409, str(exc))
        if before is None:
            return error(404, f"no change {change_id!r} in memory or in the audit log")
        if not controller.store_connected:
            return store_unreachable(controller, "revert")
        try:
            await admit_whole(controller, before)
        except CorralError as exc:
            note_refusal(controller, audit, REVERT, client, exc, {"revert": change_id})
            return change_result(Outcome.REJECTED, None, controller.last_good, str(exc))
        record: ChangeRecord
        if fleet is not None:
            try:
                record = await fleet.begin(Change.whole(before))
            except StoreUnavailable:  # etcd went away while a slot was being taken
                return store_unreachable(controller, "revert")
            record.client = client
        else:
            record = controller.submit(Change.whole(before), source=REVERT, client=client)
        await asyncio.shield(record.done)
        return record_result(record)

    return router


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
