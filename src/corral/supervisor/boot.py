"""The first start: the stored config, and the command line's if that one fails."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from corral.core.args import LlamaConfig
from corral.errors import PreflightFailed, StartFailed
from corral.observe.events import EventBus
from corral.supervisor.changes import config_json
from corral.supervisor.seams import Clock

log = logging.getLogger("corral")


async def boot(candidates: list[LlamaConfig], start: Callable[[LlamaConfig], Awaitable[None]],
               clock: Clock, events: EventBus) -> tuple[LlamaConfig | None, str | None]:
    """Start the first of ``candidates`` that starts; returns it (None if none did) and the
    errors of those that failed. A ``start-up`` event says what ran, for the audit log."""
    errors: list[str] = []
    began = clock.monotonic()
    ran: LlamaConfig | None = None
    for config in candidates:
        try:
            await start(config)
        except (StartFailed, PreflightFailed) as exc:
            errors.append(str(exc))
            if config is not candidates[-1]:
                log.error("stored config failed to start (%s); FALLING BACK to the "
                          "command-line config", exc)
            continue
        ran = config
        break
    error = "; ".join(errors) or None
    fell_back = ran is not None and ran is not candidates[0]
    events.emit(
        "start-up", source="start-up", outcome="applied" if ran else "failed",
        error=error, restarted=ran is not None, strategy=None,
        duration_s=round(clock.monotonic() - began, 3), fell_back=fell_back,
        before=config_json(candidates[0]) if fell_back else None,
        after=config_json(ran) if ran is not None else None)
    return ran, error
