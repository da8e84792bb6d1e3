"""The management API: handlers validate and record intent; the controller acts.

``POST /v1/params`` canonicalises the flags, pre-flights the result against what runs now
(so a change that cannot work is refused with no downtime and never joins a batch), then
submits it and waits for the outcome of the batch it joined. A posted ``binary`` is checked
against the allowed ones before anything runs it (reading its flag catalog runs
``--help``); the least-privilege rules then judge the merged config before any other check.
Every refused change is logged at WARNING with the reason (never with the token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.api.answers import (
    change_result,
    error,
    note_refusal,
    record_result,
    store_unreachable,
)
from corral.api.dry_run import dry_run
from corral.api.metrics_routes import metrics_router
from corral.api.observe_routes import observe_router
from corral.api.page_routes import page_router
from corral.api.schemas import (
    ChangeResult,
    DryRunResult,
    ErrorBody,
    HealthView,
    ParamsRequest,
    ParamsView,
    StatusView,
)
from corral.api.security import BodyLimit, TokenAuth, Tokens
from corral.child.preflight import resolve_binary
from corral.core.args import (
    BINARY_KEY,
    Change,
    apply_change,
    parse_change,
    parse_env,
)
from corral.errors import CorralError, InvalidArgs, StoreUnavailable
from corral.observe.audit import AuditLog
from corral.observe.events import LineBus
from corral.supervisor.changes import Outcome, config_json
from corral.supervisor.seams import FleetGate
from corral.supervisor.view import Supervisor

if TYPE_CHECKING:
    from corral.observe.metrics import Metrics

log = logging.getLogger("corral.api")

MAX_BODY_BYTES = 64 * 1024
WaitFor = Literal["true", "false", "1", "0", "rollout"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed body"},
    401: {"model": ErrorBody, "description": "Missing token"},
    403: {"model": ErrorBody, "description": "Wrong token"},
    413: {"model": ErrorBody, "description": "Body too large"},
}


# How ?wait=rollout ends, in HTTP's words.
ROLLOUT_STATUS = {"done": 200, "failed": 422, "timeout": 504}


def create_app(controller: Supervisor, token: Tokens | str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, fleet: FleetGate | None = None,
               lines: LineBus | None = None, audit: AuditLog | None = None,
               metrics: Callable[[], Metrics] | None = None) -> Any:
    app = FastAPI(title="Corral", version=__version__,
                  description="Supervise llama-server and change it at run time.",
                  docs_url="/docs", redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
                   for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return error(400, f"malformed request: {where}: {first['msg']}", details)

    @app.post("/v1/params", response_model=ChangeResult | DryRunResult,
              responses={**_ERRORS, 202: {"model": ChangeResult},
                         422: {"model": ChangeResult | DryRunResult,
                               "description": "Change rejected"},
                         500: {"model": ChangeResult}, 503: {"model": ChangeResult}})
    async def post_params(body: ParamsRequest, request: Request,
                          wait: Annotated[WaitFor, Query(description=(
                              "wait for this supervisor's outcome (true), answer 202 at once "
                              "(false), or in a fleet wait for the whole rollout (rollout)"))
                          ] = "true",
                          timeout: float = Query(600.0, gt=0, description=(
                              "with wait=rollout: answer 504 with the progress after this "
                              "many seconds")),
                          dry_run_: bool = Query(False, alias="dry_run",
                                                 description="only say what would happen")
                          ) -> JSONResponse:
        """Change llama-server's flags, model, port or binary.

        Merged with other changes arriving within the debounce window; answered when
        the batch is applied (200), rejected (422) or could not be stored (500/503).
        With ``dry_run=1``: the merged config, pre-flight and memory verdict with its
        numbers, and the swap strategy, without changing anything (200, or 422 when the
        pre-flight would refuse it).
        """
        client = request.client.host if request.client else "?"
        if dry_run_:
            try:
                change = await _parsed_change(controller, body)
            except CorralError as exc:
                return _refused(controller, client, exc)
            result = await dry_run(controller, change)
            return JSONResponse(result.model_dump(), 422 if result.status == "rejected" else 200)
        if not controller.store_connected:
            return store_unreachable(controller, "change")
        try:
            change = await _validated_change(controller, body)
        except CorralError as exc:
            note_refusal(controller, audit, "api", client, exc,
                         body.model_dump(exclude_none=True))
            return _refused(controller, client, exc)
        try:
            record = await fleet.begin(change) if fleet else controller.submit(change)
        except StoreUnavailable:  # etcd went away while a slot was being taken
            return store_unreachable(controller, "change")
        record.client = client  # for the audit log
        if wait in ("false", "0"):
            response = record_result(record)
            response.headers["location"] = f"/v1/changes/{record.id}"
            return response
        await asyncio.shield(record.done)  # a client hanging up must not cancel the batch
        if fleet is None:
            return record_result(record)
        if wait != "rollout" or record.outcome is not Outcome.APPLIED:
            return record_result(record, fleet.rollout_of(record))
        ended = await fleet.wait_rollout(record, timeout)
        return record_result(record, ended.view, ROLLOUT_STATUS[ended.outcome])

    @app.get("/v1/params", response_model=ParamsView, responses=_ERRORS)
    async def get_params() -> dict[str, Any]:
        """The config in effect (the last one that became ready)."""
        return {"name": controller.name, "config": config_json(controller.last_good)}

    @app.get("/v1/changes/{change_id}", response_model=ChangeResult,
             responses={**_ERRORS, 404: {"model": ErrorBody}})
    async def get_change(change_id: str) -> JSONResponse:
        """The outcome of a change submitted with ``?wait=false``."""
        record = controller.record(change_id)
        if record is None:
            return error(404, f"no change {change_id!r} (the last 1000 are kept)")
        response = record_result(record)
        response.status_code = 200
        return response

    @app.get("/v1/status", response_model=StatusView, responses=_ERRORS)
    async def get_status() -> StatusView:
        """State of the supervised llama-server."""
        return controller.status()

    @app.get("/health", response_model=HealthView)
    async def health() -> dict[str, Any]:
        """The supervisor is up (needs no token). ``state`` is llama-server's."""
        return {"status": "ok", "state": controller.state.value}

    if lines is not None:
        app.include_router(observe_router(controller, lines, audit, fleet=fleet))
    app.include_router(page_router())
    if metrics is not None:
        app.include_router(metrics_router(metrics))
    return TokenAuth(BodyLimit(app, max_body_bytes), token)


def _refused(controller: Supervisor, client: str, exc: CorralError) -> JSONResponse:
    log.warning("change from %s refused: %s", client, exc)
    return change_result(Outcome.REJECTED, None, controller.last_good, str(exc))


async def _validated_change(controller: Supervisor, body: ParamsRequest) -> Change:
    change = await _parsed_change(controller, body)
    # Stage 1 (see Preflight). The memory fit waits for the merged batch (stage 2): it can take
    # seconds, which would spread a burst of POSTs over several debounce windows.
    await controller.check(apply_change(controller.last_good, change), fit=False)
    return change


async def _parsed_change(controller: Supervisor, body: ParamsRequest) -> Change:
    raw: dict[str, Any] = dict(body.args)
    binary = controller.last_good.binary
    if isinstance(raw.get(BINARY_KEY), str) and raw[BINARY_KEY].strip():
        binary = resolve_binary(raw[BINARY_KEY].strip())
        raw[BINARY_KEY] = binary
    # Before its --help runs for the catalog: a binary swapped behind an allowed symlink, too.
    controller.checks.admit_binary(binary)
    change = parse_change(raw, await controller.checks.catalog(binary))
    if body.env:
        change = dataclasses.replace(change, env=parse_env(body.env))
    for key, _ in change.args:
        if key in controller.pinned:
            raise InvalidArgs(f"{key} cannot be changed through the API: {controller.pinned[key]}")
    await controller.checks.admit(apply_change(controller.last_good, change))
    return change
