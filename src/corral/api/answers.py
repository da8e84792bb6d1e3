"""The controller's outcomes in HTTP's words: the one place that knows them.

Every route that answers a change (``POST /v1/params``, restart, revert) words it here, so
the status codes and bodies are the same whichever route answered.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from corral.api.schemas import ChangeResult, ChangeStatus, ConfigView, ErrorBody
from corral.core.args import LlamaConfig
from corral.observe.audit import AuditLog
from corral.supervisor.changes import ChangeRecord, Outcome, config_json
from corral.supervisor.view import Supervisor


def error(status: int, message: str, details: list[Any] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, details=details).model_dump(exclude_none=True),
                        status_code=status)


HTTP_STATUS: dict[Outcome, int] = {
    Outcome.PENDING: 202, Outcome.APPLIED: 200, Outcome.REJECTED: 422,
    Outcome.NOT_STORED: 500, Outcome.UNAVAILABLE: 503, Outcome.SUPERSEDED: 409,
}
BODY_STATUS: dict[Outcome, ChangeStatus] = {
    Outcome.PENDING: "pending", Outcome.APPLIED: "applied", Outcome.REJECTED: "rejected",
    Outcome.NOT_STORED: "failed", Outcome.UNAVAILABLE: "failed", Outcome.SUPERSEDED: "failed",
}


def config_view(config: LlamaConfig) -> ConfigView:
    return ConfigView.model_validate(config_json(config))


def change_result(outcome: Outcome, change_id: str | None, config: LlamaConfig | None,
                  error: str | None = None, log: list[str] | None = None,
                  restarted: bool = False, strategy: str | None = None) -> JSONResponse:
    body = ChangeResult(status=BODY_STATUS[outcome], change_id=change_id, error=error,
                        log=log or [], restarted=restarted, strategy=strategy,
                        config=config_view(config) if config else None)
    return JSONResponse(body.model_dump(), HTTP_STATUS[outcome])


def record_result(record: ChangeRecord, rollout: dict[str, Any] | None = None,
                  status: int | None = None) -> JSONResponse:
    response = change_result(record.outcome, record.id, record.config, record.error,
                             record.log, record.restarted, record.strategy)
    if rollout is None and status is None:
        return response
    body = json.loads(bytes(response.body))
    body["rollout"] = rollout
    return JSONResponse(body, status or response.status_code)


def store_unreachable(controller: Supervisor, what: str) -> JSONResponse:
    """503: a change that cannot be made durable is not made."""
    return change_result(
        Outcome.UNAVAILABLE, None, controller.last_good,
        f"the config store is unreachable ({controller.store.description}); the {what} "
        "could not be made durable, so nothing was changed")


def note_refusal(controller: Supervisor, audit: AuditLog | None, source: str, client: str,
                 exc: Exception, request: dict[str, Any]) -> None:
    """A change refused before it joined a batch: an event (metrics) and an audit line."""
    controller.events.emit("refused", source=source, client=client, error=str(exc))
    if audit is not None:
        audit.refused(client, str(exc), request)
