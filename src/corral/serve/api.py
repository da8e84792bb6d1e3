"""``corral serve``'s management API (``--supervisor-addr``).

- ``GET /v1/status``: every model like ``ollama ps`` (state, pid, memory estimate, idle for,
  in flight, held, loads, evictions) and the limits.
- ``POST /v1/models/{id}/load`` and ``/unload`` (drained first).
- ``/v1/models/{id}/...`` of a loaded model is that model's own supervisor API (the one
  ``corral supervise`` serves at ``/``): ``POST /v1/models/{id}/v1/params`` changes its
  flags, ``GET /v1/models/{id}/v1/status`` tells its state, and so on.
- ``GET /metrics``: per-model state, loads, load seconds, evictions by reason, held now.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from corral import __version__
from corral.api.page_routes import HEADERS
from corral.api.routes import create_app
from corral.api.security import TokenAuth, Tokens
from corral.core.placement import Phase
from corral.serve.model import ServedModel
from corral.serve.models import Models
from corral.serve.scheduler import Scheduler


@dataclass
class ModelServer:
    """What the API reads: the models and the scheduler."""

    models: Models
    scheduler: Scheduler


def model_row(m: ServedModel, need_mib: float | None, now: float) -> dict[str, Any]:
    stats = m.door.stats()
    server = m.controller.active_server() if m.controller else None
    return {
        "id": m.id, "state": m.shown.value, "reason": m.reason,
        "aliases": list(m.serve.aliases), "pin": m.serve.pin, "ttl_s": m.serve.ttl_s,
        "pid": server.pid if server else None,
        "memory_mib": round(need_mib) if need_mib else None,
        "idle_s": None if m.last_used is None or stats.in_flight or stats.held_now
        else round(now - m.last_used, 1),
        "in_flight": stats.in_flight, "held": stats.held_now, "loads": m.loads,
        "load_seconds": [round(s, 2) for s in m.load_seconds[-5:]],
        "supervisor": m.controller.state.value if m.controller else None,
    }


def create_serve_app(server: ModelServer, tokens: Tokens | None) -> Any:
    app = FastAPI(title="Corral serve", version=__version__, docs_url="/docs", redoc_url=None)

    def status() -> dict[str, Any]:
        now = time.monotonic()
        rows = [model_row(m, sum(server.scheduler.need(m).values()) or None, now)
                for m in server.models.by_id.values()]
        limits = server.scheduler.limits
        return {"models": rows, "limits": {
            "max_memory_mib": dict(limits.memory_mib), "max_models": limits.max_models,
            "max_wait_s": limits.max_wait_s},
            "evictions": [{"model": m, "reason": r, "count": n}
                          for (m, r), n in sorted(server.scheduler.evictions.items())]}

    def found(model_id: str) -> ServedModel | JSONResponse:
        model = server.models.by_id.get(server.models.aliases.get(model_id, model_id))
        if model is None:
            return JSONResponse({"error": f"no model {model_id!r}; models: "
                                 f"{', '.join(sorted(server.models.by_id))}"}, 404)
        return model

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        """The models page (needs no token; it asks for one when the API does)."""
        return _static("models.html")

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(name: str) -> Response:
        return _static(name)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(server.models.by_id)}

    @app.get("/v1/status")
    async def get_status() -> dict[str, Any]:
        return status()

    @app.post("/v1/models/{model_id}/{action}")
    async def load_or_unload(model_id: str, action: Literal["load", "unload"]) -> JSONResponse:
        """``load``: now (a failed model is tried again); ``unload``: drained first."""
        model = found(model_id)
        if isinstance(model, JSONResponse):
            return model
        await (server.scheduler.load if action == "load" else server.scheduler.unload)(model)
        return JSONResponse(model_row(model, None, time.monotonic()),
                            503 if model.shown is Phase.FAILED else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(exposition(server), media_type="text/plain; version=0.0.4")

    routed = _PerModel(app, server, tokens)
    return TokenAuth(routed, tokens) if tokens is not None else routed


PAGE_FILES = {"models.html": ("corral.serve", "text/html; charset=utf-8"),
              "models.js": ("corral.serve", "text/javascript; charset=utf-8"),
              "style.css": ("corral.api", "text/css; charset=utf-8")}  # the supervise page's


@functools.cache
def _page_file(name: str) -> bytes:
    package = PAGE_FILES[name][0]
    return (resources.files(package) / "static" / name).read_bytes()


def _static(name: str) -> Response:
    if name not in PAGE_FILES:
        return JSONResponse({"error": f"no static file {name!r}"}, 404)
    return Response(_page_file(name), media_type=PAGE_FILES[name][1], headers=HEADERS)


class _PerModel:
    """``/v1/models/{id}/<path>`` (but load and unload): that model's own supervisor API,
    with ``/<path>`` as its path; anything else: the serve API."""

    def __init__(self, app: Any, server: ModelServer, tokens: Tokens | None) -> None:
        self.app, self.server, self.tokens = app, server, tokens
        self._subs: dict[int, Any] = {}  # one supervisor API per loaded controller

    async def __call__(self, scope: Any, receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        model_id, _, rest = path.removeprefix("/v1/models/").partition("/")
        if not path.startswith("/v1/models/") or not rest or rest in ("load", "unload"):
            await self.app(scope, receive, send)
            return
        models = self.server.models
        model = models.by_id.get(models.aliases.get(model_id, model_id))
        if model is None or model.controller is None:
            why = (f"no model {model_id!r}; models: {', '.join(sorted(models.by_id))}"
                   if model is None else f"model {model.id!r} is {model.shown.value}: "
                   f"POST /v1/models/{model.id}/load first")
            response = JSONResponse({"error": why}, 404 if model is None else 409)
            await response(scope, receive, send)
            return
        sub = self._subs.get(id(model.controller))
        if sub is None:
            self._subs = {id(model.controller): create_app(model.controller, self.tokens),
                          **{k: v for k, v in self._subs.items()
                             if k in {id(m.controller) for m in models.by_id.values()}}}
            sub = self._subs[id(model.controller)]
        await sub({**scope, "path": f"/{rest}", "raw_path": f"/{rest}".encode(),
                   "root_path": ""}, receive, send)


def exposition(server: ModelServer) -> str:
    """Prometheus text format (small enough to write without a registry)."""
    lines = []

    def family(name: str, kind: str, doc: str) -> None:
        lines.extend([f"# HELP corral_serve_{name} {doc}", f"# TYPE corral_serve_{name} {kind}"])

    family("model_state", "gauge", "1 for the state each model is in")
    for m in server.models.by_id.values():
        for phase in Phase:
            lines.append(f'corral_serve_model_state{{model="{m.id}",state="{phase.value}"}} '
                         f"{int(m.shown is phase)}")
    family("loads_total", "counter", "loads started")
    for m in server.models.by_id.values():
        lines.append(f'corral_serve_loads_total{{model="{m.id}"}} {m.loads}')
    family("load_seconds_sum", "counter", "seconds from load start to ready, summed")
    for m in server.models.by_id.values():
        lines.append(f'corral_serve_load_seconds_sum{{model="{m.id}"}} {sum(m.load_seconds):.3f}')
    family("evictions_total", "counter", "unloads by reason (ttl, memory, count, fairness, admin)")
    for (model_id, reason), n in sorted(server.scheduler.evictions.items()):
        lines.append(f'corral_serve_evictions_total{{model="{model_id}",reason="{reason}"}} {n}')
    family("held", "gauge", "requests held now (waiting for their model)")
    for m in server.models.by_id.values():
        lines.append(f'corral_serve_held{{model="{m.id}"}} {m.door.stats().held_now}')
    family("held_seconds_sum", "counter", "seconds requests waited, summed (counted when "
           "they leave the wait)")
    for m in server.models.by_id.values():
        lines.append(f'corral_serve_held_seconds_sum{{model="{m.id}"}} '
                     f"{m.door.timing.held_time.sum:.3f}")
    return "\n".join(lines) + "\n"
