"""The narrow view of one supervisor that everything outside its package reads, and the
commands it may send it (the API, metrics, the fleet, the page, the CLI's server side).

Nothing outside :mod:`corral.supervisor` writes a supervisor's fields: it reads them
through :class:`Supervisor` and asks for changes with ``submit``/``restart``; the fleet
reports what it knows with ``report_fleet``. :class:`~corral.supervisor.controller.Controller`
is the one implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from corral.core.args import Change, LlamaConfig
from corral.core.decide import State
from corral.core.steps import Strategy
from corral.observe.events import EventBus
from corral.store.base import ConfigStore
from corral.supervisor.changes import ChangeRecord
from corral.supervisor.seams import Checks, Clock, Front, Server

if TYPE_CHECKING:
    from corral.supervisor.status import Status

__all__ = ["Supervisor"]


class Supervisor(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def state(self) -> State: ...

    @property
    def last_good(self) -> LlamaConfig:
        """The config in effect: the last one that became ready."""
        ...

    @property
    def ready_since(self) -> float | None:
        """``clock.monotonic()`` when the active server last became ready."""
        ...

    @property
    def clock(self) -> Clock: ...

    @property
    def events(self) -> EventBus: ...

    @property
    def store(self) -> ConfigStore: ...

    @property
    def store_connected(self) -> bool: ...

    @property
    def checks(self) -> Checks: ...

    @property
    def front(self) -> Front: ...

    @property
    def pinned(self) -> dict[str, str]:
        """flag -> why the API may not change it."""
        ...

    @property
    def pending_changes(self) -> int: ...

    def status(self) -> Status: ...

    def submit(self, change: Change, source: str = "api",
               client: str | None = None) -> ChangeRecord: ...

    def restart(self, client: str | None = None) -> ChangeRecord: ...

    def record(self, change_id: str) -> ChangeRecord | None: ...

    async def check(self, config: LlamaConfig, *, fit: bool = True) -> None: ...

    def active_server(self) -> Server | None:
        """The llama-server clients are routed to, if one is up."""
        ...

    def strategy_for(self, desired: LlamaConfig,
                     restart: bool = False) -> tuple[Strategy, str]: ...

    def report_fleet(self, view: dict[str, Any] | None) -> None:
        """The fleet's facts about this instance, shown in its status."""
        ...

    async def kill_now(self) -> None: ...
