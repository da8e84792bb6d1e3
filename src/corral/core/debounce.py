"""The batch window that merges bursts of changes into one restart.

A batch opens with its first change and closes when no change arrived for ``window_s``
(the debounce) or when it is ``max_age_s`` old, whichever comes first, so a steady stream
cannot starve it. The applier takes a batch only when it is idle: changes that arrive
during an apply keep joining the pending batch, so values superseded meanwhile are never
started (the proposal's second example: bar is skipped, baz follows foo).

Pure: the caller passes ``now`` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Debouncer(Generic[T]):
    window_s: float = 0.2
    max_age_s: float = 2.0
    _items: list[T] = field(default_factory=list)
    _first_at: float = 0.0
    _last_at: float = 0.0

    def add(self, item: T, now: float) -> None:
        if not self._items:
            self._first_at = now
        self._items.append(item)
        self._last_at = now

    @property
    def pending(self) -> int:
        return len(self._items)

    def deadline(self) -> float | None:
        """When the open batch closes, or None if there is none."""
        if not self._items:
            return None
        return min(self._last_at + self.window_s, self._first_at + self.max_age_s)

    def is_due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self, now: float) -> list[T]:
        """The closed batch (empty if none is due); the window starts afresh."""
        if not self.is_due(now):
            return []
        items, self._items = self._items, []
        return items
