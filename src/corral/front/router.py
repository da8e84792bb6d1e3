"""Where a request goes: the active upstream, the held queue, the parked retries, in-flight
counts. Pure: no asyncio, no sockets; the proxy feeds it requests and acts on the answers.

Modes (the controller switches them; every switch is cheap and synchronous):

    HOLDING   nothing is ready: requests wait in the held queue, FIFO, at most ``max_held``
    ROUTING   requests go to the active upstream; the held ones were released at the switch
    REFUSING  FATAL or shutting down: every request is refused at once, with the reason

A retry (the upstream failed before answering a byte) goes to the front of the held queue.
If the upstream that failed is still the active one, the controller has not noticed the
crash yet: the retry is *parked* until the next switch (or until the proxy's grace timer
calls ``unpark``), so it is not sent straight back to a dead server.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

from corral.front.model import Upstream

T = TypeVar("T", bound=Hashable)


class Mode(Enum):
    HOLDING = "holding"
    ROUTING = "routing"
    REFUSING = "refusing"


class Held(Enum):
    """The answer "it waits": in the held queue, or parked for the next switch."""

    QUEUED = "queued"
    PARKED = "parked"


@dataclass(frozen=True, slots=True)
class Rejected:
    """The answer "refuse it now": ``cause`` is ``held_overflow`` or ``refused``."""

    cause: str
    reason: str


Decision = Upstream | Held | Rejected


class Switched(NamedTuple, Generic[T]):
    """What a switch lets go: ``release`` to forward (FIFO), ``reject`` to refuse."""

    release: list[T]
    reject: list[T]


class Router(Generic[T]):
    """The routing state of one front door."""

    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.mode = Mode.HOLDING
        self.active: Upstream | None = None
        self.reason = ""
        self._held: deque[T] = deque()
        self._parked: list[T] = []
        self._in_flight: dict[Upstream, int] = {}
        self.held_total = 0
        self.released_total = 0

    # ---- the controller's switches ----------------------------------------------------------

    def route_to(self, upstream: Upstream) -> Switched[T]:
        """Send new requests to ``upstream``; release parked then held requests to it."""
        self.mode, self.active, self.reason = Mode.ROUTING, upstream, ""
        released = self._parked + list(self._held)
        self._parked.clear()
        self._held.clear()
        self.released_total += len(released)
        return Switched(released, [])

    def hold(self) -> list[T]:
        """Hold new requests; parked retries go to the front of the held queue (returned)."""
        self.mode, self.active, self.reason = Mode.HOLDING, None, ""
        moved = self._parked
        self._held.extendleft(reversed(moved))
        self.held_total += len(moved)
        self._parked = []
        return moved

    def refuse(self, reason: str) -> Switched[T]:
        """Refuse everything from now on; what waited is to be refused too."""
        self.mode, self.active, self.reason = Mode.REFUSING, None, reason
        waiting = self._parked + list(self._held)
        self._parked.clear()
        self._held.clear()
        return Switched([], waiting)

    # ---- requests ---------------------------------------------------------------------------

    def admit(self, item: T) -> Decision:
        """A new request: where it goes now."""
        if self.mode is Mode.ROUTING:
            assert self.active is not None
            return self.active
        if self.mode is Mode.REFUSING:
            return Rejected("refused", self.reason)
        if len(self._held) >= self.max_held:
            return Rejected("held_overflow",
                            f"{len(self._held)} requests are already waiting for llama-server")
        self._held.append(item)
        self.held_total += 1
        return Held.QUEUED

    def readmit(self, item: T, failed: Upstream) -> Decision:
        """A retry of a request that ``failed`` before its first response byte."""
        if self.mode is Mode.ROUTING and self.active == failed:
            self._parked.append(item)
            return Held.PARKED
        if self.mode is Mode.HOLDING:
            self._held.appendleft(item)  # it arrived before anything queued now
            self.held_total += 1
            return Held.QUEUED
        return self.admit(item)

    def unpark(self, item: T) -> Decision | None:
        """The grace for a parked retry is over: where it goes now (None: not parked)."""
        if item not in self._parked:
            return None
        self._parked.remove(item)
        return self.admit(item)

    def withdraw(self, item: T) -> bool:
        """The request left (client gone, timed out): forget it. True if it was waiting."""
        for queue in (self._held, self._parked):
            if item in queue:
                queue.remove(item)
                return True
        return False

    def is_waiting(self, item: T) -> bool:
        return item in self._held or item in self._parked

    def waiting(self) -> list[T]:
        return self._parked + list(self._held)

    @property
    def held_now(self) -> int:
        return len(self._held) + len(self._parked)

    # ---- in-flight counts -------------------------------------------------------------------

    def started(self, upstream: Upstream) -> None:
        self._in_flight[upstream] = self._in_flight.get(upstream, 0) + 1

    def finished(self, upstream: Upstream) -> int:
        """One request on ``upstream`` ended; how many remain there."""
        left = self._in_flight[upstream] - 1
        if left:
            self._in_flight[upstream] = left
        else:
            del self._in_flight[upstream]
        return left

    def in_flight(self, upstream: Upstream | None = None) -> int:
        if upstream is None:
            return sum(self._in_flight.values())
        return self._in_flight.get(upstream, 0)
