"""``POST /v1/params?dry_run=1``: what an apply would do, with nothing changed.

The merged config (what runs now + the change) goes through the same pre-flight as a real
change; the answer adds the fit verdict with its numbers, the warnings, and the swap
strategy ``--swap`` would choose now, with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.api.schemas import ConfigView, DryRunResult, FitView
from corral.core.args import Change, LlamaConfig, apply_change
from corral.errors import CorralError
from corral.supervisor.changes import config_json

if TYPE_CHECKING:
    from corral.supervisor.view import Supervisor


async def dry_run(controller: Supervisor, change: Change) -> DryRunResult:
    merged = apply_change(controller.last_good, change)  # admitted by the route already
    active = controller.active_server()
    running = active.config if active else None
    fit = await _fit(controller, merged, running)
    view = ConfigView.model_validate(config_json(merged))
    try:
        await controller.check(merged)
    except CorralError as exc:
        return DryRunResult(status="rejected", error=str(exc), config=view, fit=fit,
                            strategy=None)
    warnings = controller.checks.warnings(merged)
    if merged == controller.last_good:
        return DryRunResult(status="no-change", config=view, fit=fit, warnings=warnings,
                            strategy=None)
    strategy, why = controller.strategy_for(merged)
    return DryRunResult(status="would-apply", config=view, fit=fit, warnings=warnings,
                        strategy=strategy.value, strategy_reason=why)


async def _fit(controller: Supervisor, config: LlamaConfig,
               running: LlamaConfig | None) -> FitView:
    verdict = await controller.checks.fit(config, running)
    return FitView.model_validate(verdict, from_attributes=True)
