"""The client commands' side of the wire: ``status``, ``params`` and ``apply`` ask a running
supervisor over HTTP; ``fleet`` reads etcd.

These functions return what was answered, or raise :class:`~corral.errors.CorralError` when
nobody could be asked; printing and exit codes belong to :mod:`corral.cli`. A supervisor's
own refusal (401, 422, 503, ...) is an answer, not an error: it comes back as a
:class:`Reply` with ``ok`` false and the body that explains it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx

from corral.core.args import parse_argv
from corral.defaults import SUPERVISOR_ADDR
from corral.errors import CorralError, InvalidArgs, UsageError
from corral.fleet.view import fleet_report
from corral.store.factory import DriverSpec

__all__ = ["Reply", "SupervisorClient", "change_body", "fleet"]

STATUS_TIMEOUT_S = 10.0
"""A status read answers at once; an apply waits for llama-server, so it has no timeout."""


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

    def _request(self, method: str, path: str, **kwargs: Any) -> Reply:
        url = self.base_url + path
        try:
            with httpx.Client(transport=self._transport, headers=self._headers) as http:
                response = http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise CorralError(f"{url}: {exc}") from exc
        return Reply(response.is_success, _decoded(response))


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
