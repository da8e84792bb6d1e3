"""One model of ``corral serve``: a full Corral supervisor behind a door of its own.

Each model has a :class:`~corral.front.FrontDoor` on a private loopback port, steered by
its own :class:`~corral.supervisor.controller.Controller` exactly as with ``supervise
--listen`` (held requests, drains, crash retries, refusals when FATAL). The public edge
(:mod:`corral.serve.edge`) forwards each request to the door of the model it names.

Loading a model is starting its controller; unloading is cancelling it. The door outlives
both: while a model is unloaded its door holds requests, and the scheduler sees them and
loads it. Unloading therefore closes nothing: :class:`ModelFront` turns the controller's
"close the front door" into "hold new requests, drain the ones in flight".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.core.args import LlamaConfig
from corral.core.decide import State
from corral.core.placement import Phase
from corral.front import FrontDoor, FrontSettings, Upstream
from corral.front.steer import LOOPBACK, SteeredFront
from corral.supervisor.seams import Server
from corral.supervisor.view import Supervisor

log = logging.getLogger("corral.serve")


class RunnableSupervisor(Supervisor, Protocol):
    """A supervisor that can be run (a :class:`~corral.supervisor.controller.Controller`)."""

    @property
    def last_error(self) -> str | None: ...

    async def run(self) -> None: ...


@dataclass
class ServeOptions:
    """How the front door treats one model: the ``[name.serve]`` table."""

    aliases: tuple[str, ...] = ()
    ttl_s: float = 0.0
    pin: bool = False


class ModelFront:
    """The controller's view of a model's door: the same steering, but a close (unload or
    shutdown) holds new requests for the next load instead of refusing them."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self._steered = SteeredFront(door)

    def route_to(self, server: Server) -> None:
        self._steered.route_to(server)

    def hold(self) -> None:
        self._steered.hold()

    def refuse(self, reason: str) -> None:
        self._steered.refuse(reason)

    async def drain(self, server: Server, timeout_s: float) -> int:
        return await self._steered.drain(server, timeout_s)

    async def close(self, drain_timeout_s: float) -> None:
        stats = self.door.stats()
        self.door.hold()
        if stats.active_port is None or stats.active_generation is None:
            return
        upstream = Upstream(LOOPBACK, stats.active_port, stats.active_generation)
        if await self.door.drain(upstream, drain_timeout_s):
            self.door.cut(upstream)

    def view(self) -> dict[str, Any] | None:
        return self._steered.view()


@dataclass
class ServedModel:
    """A model id, its door, and (while loaded) its supervisor."""

    id: str
    door: FrontDoor
    serve: ServeOptions = field(default_factory=ServeOptions)
    config: LlamaConfig | None = None  # what it would load (for the estimate)
    controller: RunnableSupervisor | None = None
    task: asyncio.Task[None] | None = None
    unloading: bool = False
    refused: str | None = None  # it can never fit: why
    last_used: float | None = None  # monotonic, when its last request ended
    loads: int = 0
    room_made: bool = False  # this load evicted a model after running out of memory
    load_started: float | None = None
    load_seconds: list[float] = field(default_factory=list)

    @staticmethod
    def on_loopback(model_id: str, settings: FrontSettings) -> ServedModel:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind((LOOPBACK, 0))
        sock.listen(1024)
        sock.set_inheritable(False)
        return ServedModel(model_id, FrontDoor(sock, settings))

    @property
    def port(self) -> int:
        return int(self.door.stats().listen.rpartition(":")[2])

    @property
    def phase(self) -> Phase:
        if self.unloading:
            return Phase.UNLOADING
        if self.controller is None or self.task is None or self.task.done():
            return Phase.UNLOADED  # refused included: its next request is judged again
        state = self.controller.state
        if state is State.FATAL:
            return Phase.FAILED
        if state in (State.RUNNING, State.APPLYING, State.ROLLING_BACK):
            return Phase.LOADED
        # Ready, and its door routes to it, while the supervisor still watches it for
        # --min-healthy: it serves, so it is loaded.
        return Phase.LOADED if self.door.stats().mode == "routing" else Phase.LOADING

    @property
    def shown(self) -> Phase:
        """The state people see: a refused model is ``failed`` (with its reason) although
        the scheduler judges its next request again."""
        phase = self.phase
        return Phase.FAILED if self.refused and phase is Phase.UNLOADED else phase

    @property
    def reason(self) -> str | None:
        if self.refused:
            return self.refused
        if self.controller is not None and self.controller.state is State.FATAL:
            return self.controller.last_error
        return None

    def start(self, controller: RunnableSupervisor, now: float,
              on_done: Callable[[ServedModel], None]) -> None:
        """Load: run ``controller`` (it starts llama-server and routes the door to it)."""
        self.refused = None
        self.controller = controller
        self.loads += 1
        self.load_started = now
        self.task = asyncio.get_running_loop().create_task(controller.run(),
                                                           name=f"model {self.id}")
        self.task.add_done_callback(lambda _: on_done(self))

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Unload: hold new requests, drain, stop llama-server (the controller's shutdown).

        The drain comes first, here: cancelled while it still watches a new server for
        --min-healthy, a supervisor stops that server at once, requests and all."""
        task = self.task
        if task is None or task.done():
            return
        self.unloading = True
        try:
            await ModelFront(self.door).close(drain_timeout_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self.unloading = False
            self.controller = None
            self.task = None
