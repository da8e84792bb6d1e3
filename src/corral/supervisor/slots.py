"""The llama-servers the controller owns: an active one, and a candidate warming up.

Every server started goes into a slot and into the pid file, and leaves both only once it
has been reaped, so a restarted supervisor can kill whatever its predecessor left behind,
and a second signal can kill everything at once, including a server that is stopping.
"""

from __future__ import annotations

import contextlib
import logging

from corral.child.pidfile import PidFile
from corral.core.args import LlamaConfig
from corral.core.steps import Slot
from corral.supervisor.seams import Clock, Launcher, Server

log = logging.getLogger("corral")


class Slots:
    def __init__(self, launcher: Launcher, clock: Clock, pidfile: PidFile | None) -> None:
        self._launcher = launcher
        self._clock = clock
        self._pidfile = pidfile
        self._servers: dict[Slot, Server | None] = dict.fromkeys(Slot)
        self._started_at: dict[int, float] = {}
        self._stopping: list[Server] = []
        self.generation = 0

    def __getitem__(self, slot: Slot) -> Server | None:
        return self._servers[slot]

    def live(self, slot: Slot) -> Server | None:
        """The server in ``slot`` if it has not exited."""
        server = self._servers[slot]
        return server if server is not None and not server.exited.done() else None

    def uptime(self, server: Server) -> float:
        return self._clock.monotonic() - self._started_at.get(server.pid, self._clock.monotonic())

    async def start(self, slot: Slot, config: LlamaConfig) -> Server:
        """Spawn ``config`` into the empty ``slot``; raise StartFailed."""
        assert self._servers[slot] is None, f"{slot} slot is taken"
        self.generation += 1
        server = await self._launcher.spawn(config, self.generation)
        self._servers[slot] = server
        self._started_at[server.pid] = self._clock.monotonic()
        if self._pidfile is not None:
            self._pidfile.add(server.pid)
        return server

    def switch(self) -> None:
        """The candidate becomes active; the old active one waits in the candidate slot."""
        active, candidate = self._servers[Slot.ACTIVE], self._servers[Slot.CANDIDATE]
        self._servers[Slot.ACTIVE], self._servers[Slot.CANDIDATE] = candidate, active

    async def stop(self, slot: Slot, timeout: float) -> int | None:
        """Stop the server in ``slot`` (SIGTERM, SIGKILL after ``timeout``), reap, forget."""
        server, self._servers[slot] = self._servers[slot], None
        if server is None:
            return None
        return await self._stop(server, timeout)

    async def _stop(self, server: Server, timeout: float) -> int:
        if server not in self._stopping:
            self._stopping.append(server)
        # Cancelled here (shutdown mid-apply), the server stays listed as stopping, so
        # stop_all still finishes the job.
        code = await server.stop(timeout)
        self._stopping.remove(server)
        self._forget(server)
        log.info("llama-server (pid %d) stopped (code %d)", server.pid, code)
        return code

    async def stop_all(self, timeout: float) -> None:
        """Stop every server: the candidate, the active one, any whose stop was cut short."""
        for slot in (Slot.CANDIDATE, Slot.ACTIVE):
            await self.stop(slot, timeout)
        for server in list(self._stopping):
            await self._stop(server, timeout)

    async def reap(self, slot: Slot) -> tuple[Server, int, float] | None:
        """Take an exited server out of ``slot``, kill what is left of its group; return it,
        its exit code and how long it ran."""
        server = self._servers[slot]
        if server is None or not server.exited.done():
            return None
        self._servers[slot] = None
        ran = self.uptime(server)
        code = await server.kill()
        self._forget(server)
        return server, code, ran

    async def kill_all(self) -> None:
        """A second signal: SIGKILL every server, stopping or not, without waiting."""
        for server in [*self._servers.values(), *self._stopping]:
            if server is not None:
                await server.kill()

    def _forget(self, server: Server) -> None:
        self._started_at.pop(server.pid, None)
        if self._pidfile is not None:
            with contextlib.suppress(OSError):
                self._pidfile.remove(server.pid)
