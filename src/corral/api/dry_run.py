"""``POST /v1/params?dry_run=1``: what an apply would do, with nothing changed.

The merged config (what runs now + the change) goes through the same pre-flight as a real
change; the answer adds the fit verdict with its numbers, the warnings, and the swap
strategy ``--swap`` would choose now, with its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.api.schemas import ConfigView, DryRunResult, FitView
from corral.changes import config_json
from corral.core.args import Change, LlamaConfig, apply_change
from corral.core.fit import FitVerdict, SwapMode, choose_strategy
from corral.core.steps import Slot
from corral.errors import CorralError

if TYPE_CHECKING:
    from corral.controller import Controller


async def dry_run(controller: Controller, change: Change) -> DryRunResult:
    merged = apply_change(controller.last_good, change)
    active = controller.slots.live(Slot.ACTIVE)
    running = active.config if active else None
    fit = await _fit(controller, merged, running)
    view = ConfigView.model_validate(config_json(merged))
    try:
        await controller.check(merged)
    except CorralError as exc:
        return DryRunResult(status="rejected", error=str(exc), config=view, fit=fit,
                            strategy=None)
    warnings = _warnings(controller, merged)
    if merged == controller.last_good:
        return DryRunResult(status="no-change", config=view, fit=fit, warnings=warnings,
                            strategy=None)
    strategy, why = _strategy(controller, running, merged)
    return DryRunResult(status="would-apply", config=view, fit=fit, warnings=warnings,
                        strategy=strategy, strategy_reason=why)


async def _fit(controller: Controller, config: LlamaConfig,
               running: LlamaConfig | None) -> FitView | None:
    fit = getattr(controller.checks, "fit", None)
    if not callable(fit):
        return None
    verdict: FitVerdict = await fit(config, running)
    return FitView.model_validate(verdict, from_attributes=True)


def _warnings(controller: Controller, config: LlamaConfig) -> list[str]:
    warnings = getattr(controller.checks, "warnings", None)
    found: Any = warnings(config) if callable(warnings) else []
    return list(found)


def _strategy(controller: Controller, running: LlamaConfig | None,
              merged: LlamaConfig) -> tuple[str, str]:
    mode = controller.settings.swap
    if mode is not SwapMode.AUTO:
        return choose_strategy(mode, None).value, f"--swap {mode.value}"
    if running is None:
        return choose_strategy(mode, None).value, "no server is running"
    verdict = controller.checks.side_by_side(running, merged)
    return choose_strategy(mode, verdict).value, f"--swap auto: {verdict.reason}"
