"""A due batch of changes: answered at once, or turned into the plan of an apply.

A batch that leaves the config as it is while a server serves is answered ``applied`` with
no restart; one whose merged config fails pre-flight is answered ``rejected`` with nothing
stopped. Neither reaches the decision table: nothing happens to the servers. Otherwise the
batch becomes a :class:`~corral.core.steps.Plan` (stop-first or start-first, stored or not).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from corral.core.args import LlamaConfig
from corral.core.fit import SwapMode, choose_strategy
from corral.core.steps import Plan, Strategy, batch_kind, desired_config, plan_batch
from corral.errors import PreflightFailed
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.seams import Checks, Server

log = logging.getLogger("corral")


async def plan_of(batch: list[ChangeRecord], last_good: LlamaConfig, serving: bool,
                  check: Callable[[LlamaConfig], Awaitable[None]],
                  strategy_for: Callable[[LlamaConfig, bool], tuple[Strategy, str]],
                  swap: SwapMode) -> Plan | None:
    """The plan of ``batch``, or None once every change of it has been answered."""
    for r in batch:
        r.before = last_good
    persist, restart = batch_kind([r.source for r in batch])
    changes = [r.change for r in batch]
    desired = desired_config(last_good, changes)
    if desired is last_good and serving and not restart:
        log.info("batch of %d change(s) leaves the config as it is: no restart", len(batch))
        for r in batch:
            r.finish(Outcome.APPLIED, last_good)
        return None
    try:
        # Stage 2: the merged batch (see Preflight); it also caches the memory estimate
        # that --swap auto then weighs.
        await check(desired)
    except PreflightFailed as exc:
        log.warning("batch of %d change(s) rejected before any restart: %s", len(batch), exc)
        for r in batch:
            r.finish(Outcome.REJECTED, last_good, str(exc))
        return None
    strategy, why = strategy_for(desired, restart)
    if swap is SwapMode.AUTO:
        log.info("--swap auto chose %s: %s", strategy.value, why)
    return plan_batch(last_good, serving, changes, strategy, persist)


def swap_for(mode: SwapMode, active: Server | None, last_good: LlamaConfig,
             desired: LlamaConfig, restart: bool, checks: Checks) -> tuple[Strategy, str]:
    """How an apply of ``desired`` (or a restart) would swap servers now, and why."""
    if mode is not SwapMode.AUTO:
        return choose_strategy(mode, None), f"--swap {mode.value}"
    if active is None or (desired == last_good and not restart):
        return choose_strategy(mode, None), "no server is running"
    verdict = checks.side_by_side(active.config, desired)
    return choose_strategy(mode, verdict), f"--swap auto: {verdict.reason}"
