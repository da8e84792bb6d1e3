"""Submitted changes and their outcomes, in the controller's words (the API maps them)."""

from __future__ import annotations

import asyncio
import enum
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.core.args import Change, LlamaConfig

MAX_CHANGE_RECORDS = 1000  # outcomes kept for GET /v1/changes/{id}
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class ChangeIds:
    """Change ids unique across supervisor runs: ``c<n>-<run>``, ``n`` counting from 1 in
    this run, ``run`` this run's tag (:func:`run_tag`). The audit log outlives a run, so a
    revert of an old id must find that change, not a later run's with the same number."""

    def __init__(self, run: str | None = None) -> None:
        self.run = run if run is not None else run_tag()
        self._n = itertools.count(1)

    def next(self) -> str:
        return f"c{next(self._n)}-{self.run}"


def run_tag(now_ms: int | None = None, rand: int | None = None) -> str:
    """The start time in ms, base 36 (8 characters until 2059), and 2 random characters in
    case two runs start in the same millisecond (or the clock was set back)."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = secrets.randbelow(36 ** 2) if rand is None else rand
    return _base36(now_ms) + _base36(rand).rjust(2, "0")


def _base36(n: int) -> str:
    out = ""
    while True:
        n, digit = divmod(n, 36)
        out = _DIGITS[digit] + out
        if n == 0:
            return out


class Outcome(enum.StrEnum):
    PENDING = "pending"  # waiting for its batch
    APPLIED = "applied"  # running, and stored
    REJECTED = "rejected"  # cannot work here; the last good config runs
    NOT_STORED = "not stored"  # worked, but the store refused it; rolled back
    UNAVAILABLE = "unavailable"  # the store is unreachable, or the supervisor is stopping
    SUPERSEDED = "superseded"  # worked, but a newer fleet config was written meanwhile


@dataclass
class ChangeRecord:
    """One submitted change and, once its batch ran, the outcome."""

    id: str
    change: Change
    received_at: float  # wall clock, like finished_at
    done: asyncio.Future[None]
    wall: Callable[[], float] = field(repr=False, compare=False)  # the supervisor's clock
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
        self.finished_at = self.wall()
        self.done.set_result(None)


def config_json(config: LlamaConfig) -> dict[str, Any]:
    return {"binary": config.binary, "args": config.as_dict(), "argv": config.argv(),
            "env": dict(config.env)}
