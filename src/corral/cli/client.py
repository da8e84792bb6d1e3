"""The client commands' side of the wire: ``status``, ``params``, ``apply``, ``restart``,
``revert``, ``history``, ``logs`` and ``events`` ask a running supervisor over HTTP (the
last two follow its Server-Sent Events streams); ``fleet`` reads etcd.

These functions return what was answered, or raise :class:`~corral.errors.CorralError` when
nobody could be asked; printing and exit codes belong to :mod:`corral.cli`. A supervisor's
own refusal (401, 422, 503, ...) is an answer, not an error: it comes back as a
:class:`Reply` with ``ok`` false and the body that explains it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from corral.core.args import parse_argv
from corral.defaults import SUPERVISOR_ADDR
from corral.errors import CorralError, InvalidArgs, UsageError
from corral.fleet.view import fleet_report
from corral.store.factory import DriverSpec

__all__ = ["Reply", "SseMessage", "SupervisorClient", "change_body", "fleet", "parse_sse"]

STATUS_TIMEOUT_S = 10.0
"""A status read answers at once; an apply waits for llama-server, so it has no timeout."""
STREAM_READ_TIMEOUT_S = 60.0
"""A stream sends a keep-alive every 15 s: a minute of nothing is a dead connection."""


@dataclass(frozen=True)
class Reply:
    """A supervisor's answer: whether it was a success (2xx), and its body."""

    ok: bool
    body: Any  # the decoded JSON, or the text of a body that is not JSON


class SupervisorClient:
    """The management API of one supervisor, at ``addr`` (``host:port``).

    ``transport`` is the seam for tests (``httpx.MockTransport``); by default, the network.
    """

    def __init__(self, addr: str = SUPERVISOR_ADDR, token: str | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = addr if "://" in addr else f"http://{addr}"  # https://... with TLS
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._transport = transport

    def status(self) -> Reply:
        """``GET /v1/status``: state, pid, port, the config in effect, recent failures."""
        return self._request("GET", "/v1/status", timeout=STATUS_TIMEOUT_S)

    def params(self) -> Reply:
        """``GET /v1/params``: the config in effect."""
        return self._request("GET", "/v1/params", timeout=STATUS_TIMEOUT_S)

    def apply(self, body: Any) -> Reply:
        """``POST /v1/params``; returns once the change is applied or refused."""
        return self._request("POST", "/v1/params", json=body, timeout=None)

    def restart(self) -> Reply:
        """``POST /v1/restart``: the config in effect, on a new llama-server."""
        return self._request("POST", "/v1/restart", timeout=None)

    def revert(self, change_id: str) -> Reply:
        """``POST /v1/changes/ID/revert``: the config in effect before that change."""
        return self._request("POST", f"/v1/changes/{quote(change_id, safe='')}/revert",
                             timeout=None)

    def history(self, limit: int) -> Reply:
        """``GET /v1/changes?limit=N``: the newest N entries of the change history."""
        return self._request("GET", "/v1/changes", params={"limit": limit},
                             timeout=STATUS_TIMEOUT_S)

    def logs(self, tail: int | None = None) -> Reply:
        """``GET /v1/logs?tail=N``: the newest log lines."""
        params = {} if tail is None else {"tail": tail}
        return self._request("GET", "/v1/logs", params=params, timeout=STATUS_TIMEOUT_S)

    def follow_logs(self, tail: int | None = None) -> Iterator[SseMessage]:
        """``GET /v1/logs?follow=1``: the last lines, then each new one, until the
        supervisor ends the stream."""
        params: dict[str, Any] = {"follow": 1}
        if tail is not None:
            params["tail"] = tail
        return self.stream("/v1/logs", params)

    def events(self, since: int | None = None) -> Iterator[SseMessage]:
        """``GET /v1/events``: events after ``since`` (kept ones first), else new ones."""
        return self.stream("/v1/events", {} if since is None else {"since": since})

    def stream(self, path: str, params: dict[str, Any]) -> Iterator[SseMessage]:
        """The messages of an SSE stream; raises CorralError if it cannot be opened (with
        the supervisor's reason) or breaks."""
        url = self.base_url + path
        timeout = httpx.Timeout(STATUS_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        try:
            with (httpx.Client(transport=self._transport, headers=self._headers,
                               timeout=timeout) as http,
                  http.stream("GET", url, params=params,
                              headers={"accept": "text/event-stream"}) as response):
                if not response.is_success:
                    response.read()
                    body = _decoded(response)
                    why = body.get("error") if isinstance(body, dict) else None
                    raise CorralError(f"{url}: HTTP {response.status_code}: {why or body}")
                try:
                    yield from parse_sse(response.iter_lines())
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    # The supervisor went away mid-stream (it is stopping, and closed the
                    # connection before the stream's last chunk): the stream has ended.
                    return
        except httpx.HTTPError as exc:
            raise CorralError(f"{url}: {exc}") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> Reply:
        url = self.base_url + path
        try:
            with httpx.Client(transport=self._transport, headers=self._headers) as http:
                response = http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise CorralError(f"{url}: {exc}") from exc
        return Reply(response.is_success, _decoded(response))


@dataclass(frozen=True)
class SseMessage:
    """One Server-Sent Event: ``event`` (``message`` when unnamed), ``data``, ``id``."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Messages from the lines of an SSE body (comments skipped; see the WHATWG spec)."""
    event, last_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseMessage(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            last_id = value or None


def _decoded(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # a proxy's error page, say: show it rather than a traceback
        return response.text


def change_body(raw_json: str | None, flags: list[str]) -> Any:
    """The body of ``corral apply``: ``--json BODY`` as given, else ``{"args": FLAGS}``.

    The body is not checked here: the supervisor judges it and says why it refuses.
    """
    if raw_json:
        try:
            return json.loads(raw_json)
        except ValueError as exc:  # json.JSONDecodeError
            raise UsageError(f"--json: {exc}") from exc
    try:
        return {"args": dict(parse_argv(flags, None))}
    except InvalidArgs as exc:
        raise UsageError(f"flags after '--': {exc}") from exc


def fleet(spec: DriverSpec, name: str) -> dict[str, Any]:
    """The fleet report of ``name``, read from the etcd ``spec`` names."""
    return asyncio.run(fleet_report(spec, name))
