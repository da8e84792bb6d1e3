"""Submitted changes and their outcomes, in the controller's words (the API maps them)."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from corral.core.args import Change, LlamaConfig

MAX_CHANGE_RECORDS = 1000  # outcomes kept for GET /v1/changes/{id}


class Outcome(enum.StrEnum):
    PENDING = "pending"  # waiting for its batch
    APPLIED = "applied"  # running, and stored
    REJECTED = "rejected"  # cannot work here; the last good config runs
    NOT_STORED = "not stored"  # worked, but the store refused it; rolled back
    UNAVAILABLE = "unavailable"  # the store is unreachable, or the supervisor is stopping


@dataclass
class ChangeRecord:
    """One submitted change and, once its batch ran, the outcome."""

    id: str
    change: Change
    received_at: float
    done: asyncio.Future[None]
    outcome: Outcome = Outcome.PENDING
    error: str | None = None
    log: list[str] = field(default_factory=list)
    config: LlamaConfig | None = None
    restarted: bool = False
    source: str = "api"  # "api", or "fleet" for a config another supervisor stored
    strategy: str | None = None  # how its batch swapped servers (stop-first, start-first)
    client: str | None = None  # the API client's address, for the audit log
    before: LlamaConfig | None = None  # the config in effect when its batch was taken
    finished_at: float | None = None  # wall clock

    def finish(self, outcome: Outcome, config: LlamaConfig | None, error: str | None = None,
               log_tail: list[str] | None = None, restarted: bool = False,
               strategy: str | None = None) -> None:
        if self.done.done():
            return  # an outcome is final
        self.outcome, self.config = outcome, config
        self.error, self.log, self.restarted = error, log_tail or [], restarted
        self.strategy = strategy
        self.finished_at = time.time()
        self.done.set_result(None)


def config_json(config: LlamaConfig) -> dict[str, Any]:
    return {"binary": config.binary, "args": config.as_dict(), "argv": config.argv(),
            "env": dict(config.env)}
