"""Starting one llama-server into a slot and waiting until it is ready.

Both the controller (boot, revival) and an apply's plan start servers this way. The
:class:`Starter` owns no state of the supervisor's: when the active server becomes ready it
calls ``on_active`` (the controller notes the moment), and the servers live in
:class:`~corral.supervisor.slots.Slots`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from corral.core.args import LlamaConfig
from corral.core.steps import Slot
from corral.observe.events import EventBus
from corral.supervisor.seams import Checks, Front, Launcher, Server
from corral.supervisor.settings import Settings
from corral.supervisor.slots import Slots

log = logging.getLogger("corral")


class Starter:
    def __init__(self, slots: Slots, launcher: Launcher, checks: Checks, front: Front,
                 settings: Settings, events: EventBus,
                 place: Callable[[LlamaConfig], LlamaConfig],
                 on_active: Callable[[], None]) -> None:
        self.slots = slots
        self._launcher = launcher
        self._checks = checks
        self._front = front
        self._settings = settings
        self._events = events
        self._place = place  # --listen: a loopback port per start
        self._on_active = on_active

    async def start_in(self, slot: Slot, config: LlamaConfig) -> Server:
        """Spawn ``config`` into ``slot``; raise StartFailed/PreflightFailed."""
        config = self._place(config)
        await self._checks.check_port(config)  # stage 3: free only once the old one stopped
        server = await self.slots.start(slot, config)
        log.info("started llama-server (pid %d, generation %d): %s", server.pid,
                 server.generation, " ".join(config.argv()))
        return server

    async def await_ready(self, slot: Slot) -> None:
        """Wait until the server in ``slot`` is ready; on failure nothing is left of it."""
        server = self.slots[slot]
        assert server is not None
        # Held requests go to an active server at its first /health 200, before min-healthy.
        front = self._front
        on_healthy = (lambda: front.route_to(server)) if slot is Slot.ACTIVE else None
        settings = self._settings
        try:
            took = await self._launcher.wait_ready(server, settings.ready_timeout_s,
                                                   settings.min_healthy_s, on_healthy)
        except BaseException:
            if slot is Slot.ACTIVE:
                front.hold()
            await asyncio.shield(self.slots.stop(slot, settings.stop_timeout_s))
            raise
        if slot is Slot.ACTIVE:
            self._on_active()
        log.info("llama-server (pid %d) is ready after %.1f s", server.pid, took)
        self._events.emit("ready", pid=server.pid, generation=server.generation,
                          load_s=round(took, 3), slot=slot.value)
