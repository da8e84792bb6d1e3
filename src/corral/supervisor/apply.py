"""Carries out an apply's plan of steps and says what happened; the controller decides.

The executor knows how to do each step (:mod:`corral.core.steps`) and nothing about
strategies, and it writes none of the supervisor's state: it gets what it acts on (the
slots, the front door, the store, the :class:`~corral.supervisor.start.Starter`) and
*returns* an :class:`Applied`. When a step fails it kills whatever the plan started, and
reports the facts a failure is judged by (is the old server still serving? was there one?);
what that means is the decision table's call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

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
from corral.store.base import ConfigStore, StoredConfig
from corral.supervisor.changes import Outcome
from corral.supervisor.failpoints import failpoint
from corral.supervisor.seams import Front
from corral.supervisor.settings import Settings
from corral.supervisor.slots import Slots
from corral.supervisor.start import Starter

log = logging.getLogger("corral")


@dataclass
class Verdict:
    """How the batch being applied ends, once known."""

    outcome: Outcome = Outcome.APPLIED
    error: str | None = None
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Applied:
    """What an apply did: ``verdict`` is APPLIED, or the failure with the facts it is judged
    by (the old server still serving; an old server there was at all)."""

    verdict: Verdict
    old_serving: bool = False
    had_old: bool = False

    @property
    def ok(self) -> bool:
        return self.verdict.outcome is Outcome.APPLIED


class PlanExecutor:
    def __init__(self, name: str, slots: Slots, front: Front, store: ConfigStore,
                 settings: Settings, starter: Starter,
                 on_switched: Callable[[], None], on_active_stopped: Callable[[], None]) -> None:
        self.name = name
        self.slots = slots
        self.front = front
        self.store = store
        self.settings = settings
        self.starter = starter
        self._on_switched = on_switched  # the candidate became the active server
        self._on_active_stopped = on_active_stopped

    async def run(self, plan: Plan, batch_size: int) -> Applied:
        old = self.slots.live(Slot.ACTIVE)
        log.info("applying a batch of %d change(s) %s: %s", batch_size, plan.strategy.value,
                 " ".join(plan.desired.argv()))
        try:
            for step in plan.steps:
                await self._do(step)
        except (StartFailed, PreflightFailed, StoreError) as exc:
            await self._kill_new(old)
            still_serving = old is not None and self.slots.live(Slot.ACTIVE) is old
            if still_serving:
                log.error("new config failed (%s); the old one kept serving", exc)
            elif old is not None:
                log.error("new config failed (%s); rolling back to the last good config", exc)
            return Applied(_verdict_of(exc), still_serving, old is not None)
        return Applied(Verdict())

    async def _do(self, step: Step) -> None:
        name = type(step).__name__.lower()
        failpoint(f"before_{name}")
        match step:
            case Hold():
                self.front.hold()
            case Drain(slot):
                server = self.slots.live(slot)
                if server is not None:
                    timeout = self.settings.drain_timeout_s
                    left = await self.front.drain(server, timeout)
                    if left:
                        log.warning("%d request(s) still in flight on pid %d after %.0f s of "
                                    "draining: cut, and the server stopped", left, server.pid,
                                    timeout)
            case Stop(slot):
                if slot is Slot.ACTIVE:
                    self._on_active_stopped()
                await self.slots.stop(slot, self.settings.stop_timeout_s)
            case Start(config, slot):
                await self.starter.start_in(slot, config)
            case AwaitReady(slot):
                await self.starter.await_ready(slot)
            case Switch():
                self.slots.switch()
                active = self.slots[Slot.ACTIVE]
                assert active is not None
                self.front.route_to(active)
                self._on_switched()
            case Persist(config):
                await self.store.save(self.name, StoredConfig.now(config))
        failpoint(f"after_{name}")

    async def _kill_new(self, old: object) -> None:
        """Stop every server this plan started; the old one, if it still runs, stays."""
        for slot in (Slot.CANDIDATE, Slot.ACTIVE):
            server = self.slots[slot]
            if server is not None and server is not old:
                await asyncio.shield(self.slots.stop(slot, self.settings.stop_timeout_s))


def _verdict_of(exc: Exception) -> Verdict:
    tail = exc.log if isinstance(exc, StartFailed) else []
    if isinstance(exc, StoreUnavailable):
        return Verdict(Outcome.UNAVAILABLE, str(exc), tail)
    if isinstance(exc, StoreConflict):
        return Verdict(Outcome.SUPERSEDED, str(exc), tail)
    if isinstance(exc, StoreError):
        return Verdict(Outcome.NOT_STORED, str(exc), tail)
    return Verdict(Outcome.REJECTED, str(exc), tail)
