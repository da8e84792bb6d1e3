"""What the controller needs from the world, as protocols: time, processes, checks, routing.

The controller is written against these and nothing else, so it runs in-process in tests
with a fake clock, fake servers and a fake front door (``tests/fakes.py``), in
microseconds and without a subprocess; the real implementations are
:class:`SystemClock`, :class:`corral.child.launcher.ProcessLauncher`,
:class:`corral.child.preflight.Preflight` and the front door (or :class:`NoFront`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from corral.core.args import Change, FlagCatalog, LlamaConfig
from corral.core.fit import FitVerdict
from corral.supervisor.changes import ChangeRecord


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Output(Protocol):
    def tail(self, n: int = 20) -> list[str]: ...


class RunningServer(Protocol):
    """Which llama-server it is and what it runs: all a reader outside needs (metrics)."""

    @property
    def config(self) -> LlamaConfig: ...

    @property
    def pid(self) -> int: ...

    @property
    def generation(self) -> int: ...


class Server(RunningServer, Protocol):
    """One started llama-server, as the controller sees it."""

    @property
    def output(self) -> Output: ...

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code (negative: killed by that signal) once reaped."""
        ...

    async def stop(self, timeout: float) -> int:
        """SIGTERM, SIGKILL after ``timeout``, reap; safe to call twice."""
        ...

    async def kill(self) -> int: ...


class Launcher(Protocol):
    async def spawn(self, config: LlamaConfig, generation: int) -> Server:
        """Start ``config``; raise StartFailed if it cannot even be executed."""
        ...

    async def wait_ready(self, server: Server, timeout_s: float, min_healthy_s: float,
                         on_healthy: Callable[[], None] | None = None) -> float:
        """Seconds until ready; ``on_healthy`` runs at the first /health 200. Raise
        StartFailed if it exits or is not ready in time."""
        ...

    async def probe(self, server: Server) -> bool:
        """One liveness probe: does /health answer 200?"""
        ...

    async def aclose(self) -> None: ...


class Checks(Protocol):
    """Pre-flight: what can be known about a config without starting it."""

    async def catalog(self, binary: str) -> FlagCatalog: ...

    def admit_binary(self, binary: str) -> None:
        """Raise NotAllowed if ``binary`` may not run; it is not run to find out."""
        ...

    async def admit(self, config: LlamaConfig) -> None:
        """The least-privilege rules alone (binary, files, flags, env, --user); raise
        NotAllowed. Part of :meth:`check`; asked first where other work would read files."""
        ...

    async def check(self, config: LlamaConfig, running: LlamaConfig | None, *,
                    fit: bool = True) -> None:
        """Every check (:meth:`admit` first); the port only if it differs from ``running``'s;
        the memory fit unless ``fit`` is False (it can take seconds). Raise PreflightFailed."""
        ...

    async def check_port(self, config: LlamaConfig) -> None:
        """The port alone: it is free only once the server that held it has stopped."""
        ...

    async def fit(self, config: LlamaConfig, running: LlamaConfig | None) -> FitVerdict:
        """Would ``config`` fit once ``running`` (if any) has stopped? A verdict with numbers,
        or ``known=False`` when nothing could estimate it."""
        ...

    def warnings(self, config: LlamaConfig) -> list[str]:
        """What is allowed but probably not meant (more context than trained, ...)."""
        ...

    def memory_view(self, config: LlamaConfig) -> dict[str, Any] | None:
        """For ``/v1/status``: the cached estimate of ``config`` and what is available."""
        ...

    def side_by_side(self, running: LlamaConfig, new: LlamaConfig) -> FitVerdict:
        """Would ``new`` fit in memory while ``running`` keeps serving?"""
        ...


class Front(Protocol):
    """Where client requests go (the front door), as the controller steers it."""

    def route_to(self, server: Server) -> None: ...

    def hold(self) -> None: ...

    def refuse(self, reason: str) -> None: ...

    async def drain(self, server: Server, timeout_s: float) -> int:
        """Wait until ``server`` has no request in flight; return how many still were."""
        ...

    async def close(self, drain_timeout_s: float) -> None: ...

    def view(self) -> dict[str, Any] | None:
        """The front door's figures for ``/v1/status``."""
        ...


class NoFront:
    """No ``--listen``: clients talk to llama-server directly; nothing to steer."""

    def route_to(self, server: Server) -> None:
        pass

    def hold(self) -> None:
        pass

    def refuse(self, reason: str) -> None:
        pass

    async def drain(self, server: Server, timeout_s: float) -> int:
        return 0

    async def close(self, drain_timeout_s: float) -> None:
        pass

    def view(self) -> dict[str, Any] | None:
        return None


class RolloutEnd(Protocol):
    outcome: str  # "done", "failed", "timeout"
    view: dict[str, Any] | None


class FleetGate(Protocol):
    """How the API submits a change in a fleet (corral.fleet.FleetSync): a slot first."""

    async def begin(self, change: Change) -> ChangeRecord: ...

    def rollout_of(self, record: ChangeRecord) -> dict[str, Any] | None: ...

    async def wait_rollout(self, record: ChangeRecord, timeout: float) -> RolloutEnd: ...
