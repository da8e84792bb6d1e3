"""Carries out an apply's plan of steps for the controller, and words its outcome.

The runner knows how to do each step (:mod:`corral.core.steps`) and nothing about
strategies. When a step fails it kills whatever the plan started, and reports what the
failure means as an event for the decision table: the old server still serves, the old
server was stopped (roll back), or nothing had been serving (a failed start).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.changes import ChangeRecord, Outcome
from corral.core.args import LlamaConfig
from corral.core.decide import Event, State, apply_failure_event
from corral.core.steps import (
    AwaitReady,
    Drain,
    Hold,
    Persist,
    Plan,
    Slot,
    Start,
    Step,
    Stop,
    Switch,
)
from corral.errors import (
    PreflightFailed,
    StartFailed,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from corral.failpoints import failpoint
from corral.store.base import StoredConfig

if TYPE_CHECKING:
    from corral.controller import Controller

log = logging.getLogger("corral")


@dataclass
class Verdict:
    """How the batch being applied ends, once known."""

    outcome: Outcome = Outcome.APPLIED
    error: str | None = None
    log: list[str] = field(default_factory=list)


class PlanRunner:
    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.verdict = Verdict()

    async def run(self, plan: Plan, batch: list[ChangeRecord], prior: State) -> Event:
        c = self.c
        old = c.slots.live(Slot.ACTIVE)
        c.last_strategy = plan.strategy.value
        log.info("applying a batch of %d change(s) %s: %s", len(batch), plan.strategy.value,
                 " ".join(plan.desired.argv()))
        try:
            for step in plan.steps:
                await self._do(step)
        except (StartFailed, PreflightFailed, StoreError) as exc:
            await self._kill_new(old)
            self.verdict = _verdict_of(exc)
            c.last_error = self.verdict.error
            still_serving = old is not None and c.slots.live(Slot.ACTIVE) is old
            if still_serving:
                log.error("new config failed (%s); the old one kept serving", exc)
            elif old is not None:
                log.error("new config failed (%s); rolling back to the last good config", exc)
            gives_up = prior is State.FATAL or c.settings.backoff.delay_after(
                c.history.consecutive_failures) is None
            return apply_failure_event(still_serving, old is not None, gives_up)
        c.last_good = c.proven = plan.desired
        c.last_error = None
        self.verdict = Verdict()
        return Event.APPLIED

    async def _do(self, step: Step) -> None:
        c, name = self.c, type(step).__name__.lower()
        failpoint(f"before_{name}")
        match step:
            case Hold():
                c.front.hold()
            case Drain(slot):
                server = c.slots.live(slot)
                if server is not None:
                    left = await c.front.drain(server, c.settings.drain_timeout_s)
                    if left:
                        log.warning("%d request(s) still in flight on pid %d after %.0f s of "
                                    "draining: cut, and the server stopped", left, server.pid,
                                    c.settings.drain_timeout_s)
            case Stop(slot):
                if slot is Slot.ACTIVE:
                    c.ready_since = None
                await c.slots.stop(slot, c.settings.stop_timeout_s)
            case Start(config, slot):
                await c.start_in(slot, config)
            case AwaitReady(slot):
                await c.await_ready(slot)
            case Switch():
                c.slots.switch()
                active = c.slots[Slot.ACTIVE]
                assert active is not None
                c.front.route_to(active)
                c.became_active()
            case Persist(config):
                await c.store.save(c.name, StoredConfig.now(config))
        failpoint(f"after_{name}")

    async def _kill_new(self, old: object) -> None:
        """Stop every server this plan started; the old one, if it still runs, stays."""
        for slot in (Slot.CANDIDATE, Slot.ACTIVE):
            server = self.c.slots[slot]
            if server is not None and server is not old:
                await asyncio.shield(self.c.slots.stop(slot, self.c.settings.stop_timeout_s))

    def rollback_failed(self, reason: str) -> str:
        self.verdict.error = f"{self.verdict.error}; and the rollback failed too: {reason}"
        return self.verdict.error

    def answer(self, batch: list[ChangeRecord]) -> None:
        v, c = self.verdict, self.c
        for record in batch:
            record.finish(v.outcome, c.last_good, v.error, v.log,
                          restarted=v.outcome is Outcome.APPLIED, strategy=c.last_strategy)
        self.verdict = Verdict()

    async def persist_quietly(self, config: LlamaConfig) -> None:
        try:
            await self.c.store.save(self.c.name, StoredConfig.now(config))
        except StoreError as exc:
            log.error("could not store the running config: %s", exc)


def _verdict_of(exc: Exception) -> Verdict:
    tail = exc.log if isinstance(exc, StartFailed) else []
    if isinstance(exc, StoreUnavailable):
        return Verdict(Outcome.UNAVAILABLE, str(exc), tail)
    if isinstance(exc, StoreConflict):
        return Verdict(Outcome.SUPERSEDED, str(exc), tail)
    if isinstance(exc, StoreError):
        return Verdict(Outcome.NOT_STORED, str(exc), tail)
    return Verdict(Outcome.REJECTED, str(exc), tail)
