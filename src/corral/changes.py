"""Submitted changes and their outcomes, as the API reports them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from corral.core.args import Change, LlamaConfig

MAX_CHANGE_RECORDS = 1000  # outcomes kept for GET /v1/changes/{id}


@dataclass
class ChangeRecord:
    """One submitted change and, once its batch ran, the outcome."""

    id: str
    change: Change
    received_at: float
    done: asyncio.Future[None]
    status: str = "pending"  # pending | applied | rejected | failed
    http_status: int = 202
    error: str | None = None
    log: list[str] = field(default_factory=list)
    config: LlamaConfig | None = None
    restarted: bool = False
    source: str = "api"  # "api", or "fleet" for a config another supervisor stored

    def finish(self, status: str, http_status: int, config: LlamaConfig | None,
               error: str | None = None, log_tail: list[str] | None = None,
               restarted: bool = False) -> None:
        if self.done.done():
            return  # an outcome is final
        self.status, self.http_status, self.config = status, http_status, config
        self.error, self.log, self.restarted = error, log_tail or [], restarted
        self.done.set_result(None)



def config_json(config: LlamaConfig) -> dict[str, Any]:
    return {"binary": config.binary, "args": config.as_dict(), "argv": config.argv()}
