"""How long the front door's requests take and wait, as histograms for ``/metrics``.

Time comes from a clock object (``monotonic()``), the system's by default, so a test can
move it by hand instead of sleeping.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Hashable
from typing import Protocol

__all__ = ["HELD_BOUNDS", "REQUEST_BOUNDS", "Durations", "MonotonicClock", "SystemClock",
           "Timings"]

# Histogram buckets (upper bounds, seconds) for /metrics: a request (head received to its
# response's end, streams included), and the wait of a held request.
REQUEST_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)
HELD_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class MonotonicClock(Protocol):
    def monotonic(self) -> float: ...


class SystemClock:
    # time.monotonic itself, not a method calling it: read a few times per request.
    monotonic = staticmethod(time.monotonic)


class Durations:
    """Per-bucket counts and the sum of observed seconds (read by corral.observe.metrics)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class Timings:
    """Each request from its head to its end, and each wait (held or parked for a retry).

    A request's start is kept by the caller (on the request: no lookup per request), and
    its end is ``durations.observe(now - start)``; the waits are kept here, since
    ``longest_wait`` looks at all of them.
    """

    def __init__(self, clock: MonotonicClock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.waiting: dict[Hashable, float] = {}  # waiting (held or parked) since
        self.durations = Durations(REQUEST_BOUNDS)
        self.held_time = Durations(HELD_BOUNDS)

    def waits(self, request: Hashable) -> None:
        """The request waits (again): from now, unless it already was waiting."""
        self.waiting.setdefault(request, self.clock.monotonic())

    def waited(self, request: Hashable) -> None:
        """The request's wait ended: its time counts."""
        since = self.waiting.pop(request, None)
        if since is not None:
            self.held_time.observe(self.clock.monotonic() - since)

    def longest_wait(self) -> float:
        """Seconds the request waiting longest has waited so far (0: none waits)."""
        if not self.waiting:
            return 0.0
        return self.clock.monotonic() - min(self.waiting.values())

    @property
    def pending(self) -> int:
        """Waits not yet counted."""
        return len(self.waiting)

    def histograms(self) -> dict[str, tuple[str, tuple[float, ...], list[int], float]]:
        """Histograms for /metrics: name -> (help, upper bounds, per-bucket counts with
        +Inf last, sum of seconds)."""
        return {name: (doc, d.bounds, list(d.counts), d.sum) for name, doc, d in (
            ("request_duration_seconds", "client requests, head received to response end "
             "(the front door's own answers included)", self.durations),
            ("held_seconds", "time requests waited for a ready llama-server (held or parked "
             "for a retry), counted when they leave the wait", self.held_time))}
