"""A due batch of changes, judged: the event for the decision table, and the plan or answer.

What a batch is comes from :func:`~corral.core.decide.batch_event` (a no-op while a server
serves, or a batch to apply); a batch to apply is pre-flighted first, and one whose merged
config fails arrives as ``PREFLIGHT_FAILED`` with the answer ``rejected``. The table then
answers the no-op and the rejection (nothing stopped) or runs the batch's
:class:`~corral.core.steps.Plan` (stop-first or start-first, stored or not).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from corral.core.args import LlamaConfig
from corral.core.decide import Event, State, batch_event, is_serving
from corral.core.fit import SwapMode, auto_strategy, choose_strategy
from corral.core.steps import Plan, Strategy, batch_kind, desired_config, plan_batch
from corral.errors import PreflightFailed
from corral.supervisor.apply import Verdict
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.seams import Checks, Server

log = logging.getLogger("corral")


@dataclass(frozen=True)
class Taken:
    """A due batch, judged: its event, its plan if it is applied, its answer if not."""

    event: Event
    plan: Plan | None = None
    verdict: Verdict = field(default_factory=Verdict)


async def take(batch: list[ChangeRecord], last_good: LlamaConfig, state: State,
               check: Callable[[LlamaConfig], Awaitable[None]],
               strategy_for: Callable[[LlamaConfig, bool], tuple[Strategy, str]],
               swap: SwapMode) -> Taken:
    """What ``batch`` is for the table, found in ``state`` with ``last_good`` in effect."""
    for r in batch:
        r.before = last_good
    persist, restart = batch_kind([r.source for r in batch])
    changes = [r.change for r in batch]
    desired = desired_config(last_good, changes)
    event = batch_event(desired is not last_good, restart, state)
    if event is Event.UNCHANGED:
        log.info("batch of %d change(s) leaves the config as it is: no restart", len(batch))
        return Taken(event)
    try:
        # Stage 2: the merged batch (see Preflight); it also caches the memory estimate
        # that --swap auto then weighs.
        await check(desired)
    except PreflightFailed as exc:
        log.warning("batch of %d change(s) rejected before any restart: %s", len(batch), exc)
        return Taken(Event.PREFLIGHT_FAILED, verdict=Verdict(Outcome.REJECTED, str(exc)))
    strategy, why = strategy_for(desired, restart)
    if swap is SwapMode.AUTO:
        log.info("--swap auto chose %s: %s", strategy.value, why)
    return Taken(event, plan_batch(last_good, is_serving(state), changes, strategy,
                                   persist))


def swap_for(mode: SwapMode, active: Server | None, last_good: LlamaConfig,
             desired: LlamaConfig, restart: bool, checks: Checks) -> tuple[Strategy, str]:
    """How an apply of ``desired`` (or a restart) would swap servers now, and why."""
    if mode is not SwapMode.AUTO:
        return choose_strategy(mode, None), f"--swap {mode.value}"
    if active is None or (desired == last_good and not restart):
        return choose_strategy(mode, None), "no server is running"
    strategy, why = auto_strategy(checks.side_by_side(active.config, desired))
    return strategy, f"--swap auto: {why}"
