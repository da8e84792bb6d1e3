"""Hang detection: a /health probe every ``interval`` while RUNNING; N misses in a row = hung.

The probe runs beside the controller loop (a hung server must not delay applies or
revivals): the loop waits on :attr:`Liveness.probe` like on any other future, and on
:attr:`Liveness.due` like on any other deadline.
"""

from __future__ import annotations

import asyncio

from corral.supervisor.seams import Clock, Launcher, Server


class Liveness:
    def __init__(self, launcher: Launcher, clock: Clock, interval_s: float,
                 failures: int) -> None:
        self._launcher = launcher
        self._clock = clock
        self._interval = interval_s
        self._failures = failures
        self.misses = 0
        self.due: float | None = None  # when the next probe starts
        self.probe: asyncio.Future[bool] | None = None  # the probe running now

    def restart(self) -> None:
        """A server became active: forget old misses, probe after one interval."""
        self.misses = 0
        self.cancel()
        self._schedule()

    def cancel(self) -> None:
        self.due = None
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None

    def start(self, server: Server) -> None:
        self.due = None
        self.probe = asyncio.ensure_future(self._launcher.probe(server))

    def take_result(self) -> bool:
        """The finished probe's verdict: True when the server now counts as hung."""
        assert self.probe is not None and self.probe.done()
        healthy, self.probe = self.probe.result(), None
        self._schedule()
        self.misses = 0 if healthy else self.misses + 1
        return self.misses >= self._failures

    def _schedule(self) -> None:
        self.due = self._clock.monotonic() + self._interval if self._interval > 0 else None
