"""What ``GET /v1/status`` reports, as typed data (the API schema serialises it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.core.args import ArgValue, LlamaConfig, port_of
from corral.core.backoff import StartHistory
from corral.core.decide import State
from corral.core.steps import Slot
from corral.store.base import ConfigStore
from corral.supervisor.seams import Checks, Clock, Front, Server
from corral.supervisor.slots import Slots


@dataclass(frozen=True)
class ConfigSnapshot:
    binary: str
    args: dict[str, ArgValue]
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def of(config: LlamaConfig) -> ConfigSnapshot:
        return ConfigSnapshot(config.binary, config.as_dict(), config.argv(), dict(config.env))


@dataclass(frozen=True)
class ServerStatus:
    """A llama-server that is not (yet) the one clients are routed to."""

    pid: int
    port: int
    generation: int
    uptime_s: float


@dataclass(frozen=True)
class Status:
    name: str
    state: str
    pid: int | None
    port: int
    restarts: int
    generation: int
    uptime_s: float | None
    last_error: str | None
    pending_changes: int
    consecutive_failures: int
    retry_in_s: float | None
    config: ConfigSnapshot
    store: str
    store_connected: bool
    last_strategy: str | None
    candidate: ServerStatus | None
    fleet: dict[str, Any] | None
    front: dict[str, Any] | None
    memory: dict[str, Any] | None = None  # estimate of the running config, memory available


class Reported(Protocol):
    """What a status is made of: the controller's own fields, read (never written) here."""

    name: str
    state: State
    last_good: LlamaConfig
    restarts: int
    ready_since: float | None
    retry_at: float | None
    last_error: str | None
    last_strategy: str | None
    fleet: dict[str, Any] | None

    @property
    def clock(self) -> Clock: ...

    @property
    def slots(self) -> Slots: ...

    @property
    def history(self) -> StartHistory: ...

    @property
    def store(self) -> ConfigStore: ...

    @property
    def store_connected(self) -> bool: ...

    @property
    def pending_changes(self) -> int: ...

    @property
    def front(self) -> Front: ...

    @property
    def checks(self) -> Checks: ...


def status_of(c: Reported) -> Status:
    now = c.clock.monotonic()
    active = c.slots.live(Slot.ACTIVE)
    return Status(
        name=c.name,
        state=c.state.value,
        pid=active.pid if active else None,
        port=port_of(active.config if active else c.last_good),
        restarts=c.restarts,
        generation=c.slots.generation,
        uptime_s=round(now - c.ready_since, 3) if c.ready_since is not None else None,
        last_error=c.last_error,
        pending_changes=c.pending_changes,
        consecutive_failures=c.history.consecutive_failures,
        retry_in_s=round(max(0.0, c.retry_at - now), 3) if c.retry_at is not None else None,
        config=ConfigSnapshot.of(c.last_good),
        store=c.store.description,
        store_connected=c.store_connected,
        last_strategy=c.last_strategy,
        candidate=_server_status(c, c.slots.live(Slot.CANDIDATE)),
        fleet=c.fleet,
        front=c.front.view(),
        memory=_memory(c),
    )


def _memory(c: Reported) -> dict[str, Any] | None:
    """The checks' view of memory for the running config (cached: cheap)."""
    return c.checks.memory_view(c.last_good)


def _server_status(c: Reported, server: Server | None) -> ServerStatus | None:
    if server is None:
        return None
    return ServerStatus(server.pid, port_of(server.config), server.generation,
                        round(c.slots.uptime(server), 3))
