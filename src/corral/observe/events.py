"""What happened, in order: one bounded buffer of events that streams, metrics and the
audit log all read.

Theory of operation
-------------------
The controller (and the fleet) call :meth:`EventBus.emit` at the moment something happens:
a state change, a change's outcome, a crash or hang, a server becoming ready, a rollout
step. ``emit`` never blocks and never fails the caller: it numbers the event, keeps it in a
bounded ring (so ``/v1/events`` can replay what a reconnecting client missed, by
``Last-Event-ID``), calls the synchronous listeners (metrics counters, the audit log), and
wakes the streams.

:class:`LineBus` is the same for log lines (llama-server's output and the supervisor's own
log), for ``/v1/logs``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Event", "EventBus", "Line", "LineBus", "LineHandler"]

log = logging.getLogger("corral.observe")

DEFAULT_EVENTS = 1000
DEFAULT_LINES = 2000


@dataclass(frozen=True)
class Event:
    id: int
    time: float  # wall clock, seconds since the epoch
    kind: str  # "state", "change", "crash", "ready", "rollout", ...
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind, **self.data}


@dataclass(frozen=True)
class Line:
    id: int
    time: float
    source: str  # "llama-server" or "corral"
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "source": self.source, "text": self.text}


T = TypeVar("T", Event, Line)


class _Ring(Generic[T]):
    """Numbered items in a bounded ring, with waiters woken at each new one."""

    def __init__(self, size: int) -> None:
        self._items: deque[T] = deque(maxlen=size)
        self._ids = itertools.count(1)
        self._waiters: set[asyncio.Future[None]] = set()

    def _next_id(self) -> int:
        return next(self._ids)

    def _push(self, item: T) -> None:
        self._items.append(item)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    @property
    def last_id(self) -> int:
        return self._items[-1].id if self._items else 0

    def since(self, last_id: int) -> list[T]:
        """What came after ``last_id`` and is still kept (the oldest may be gone)."""
        return [item for item in self._items if item.id > last_id]

    def tail(self, n: int) -> list[T]:
        return list(self._items)[-n:] if n > 0 else []

    async def follow(self, last_id: int) -> AsyncIterator[T]:
        """Everything after ``last_id``, then each new item as it comes; never ends."""
        while True:
            items = self.since(last_id)
            if items:  # look again after yielding: more may have come meanwhile
                for item in items:
                    last_id = item.id
                    yield item
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            await waiter


class EventBus(_Ring[Event]):
    def __init__(self, size: int = DEFAULT_EVENTS) -> None:
        super().__init__(size)
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, **data: Any) -> Event:
        event = Event(self._next_id(), time.time(), kind, data)
        self._push(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - an observer must never break the controller
                log.exception("event listener %r failed on %s", listener, kind)
        return event


class LineBus(_Ring[Line]):
    def __init__(self, size: int = DEFAULT_LINES) -> None:
        super().__init__(size)

    def add(self, source: str, text: str) -> None:
        self._push(Line(self._next_id(), time.time(), source, text))


class LineHandler(logging.Handler):
    """The supervisor's own log records, as lines of ``source`` "corral"."""

    def __init__(self, lines: LineBus) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "corral.llama":
            return  # llama-server's own lines arrive through the output pipe already
        try:
            self.lines.add("corral", self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
