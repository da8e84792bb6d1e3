"""Resident memory of a process tree: what llama-server and its children hold in RAM."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RssOf"]


class RssOf:
    """RSS of a process and all its descendants. Finding the descendants makes psutil read
    every process's stat (~10 ms): they are looked up again every ``refresh_s`` only."""

    def __init__(self, refresh_s: float = 10.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.refresh_s = refresh_s
        self.clock = clock or time.monotonic
        self._pid: int | None = None
        self._family: list[int] = []
        self._until = 0.0

    def __call__(self, pid: int) -> float | None:
        """Bytes; None if ``pid`` is gone."""
        import psutil

        now = self.clock()
        if pid != self._pid or now >= self._until:
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                return None
            self._pid, self._until = pid, now + self.refresh_s
            self._family = [pid, *(k.pid for k in kids)]
        total = 0
        for i, p in enumerate(self._family):
            try:
                total += psutil.Process(p).memory_info().rss
            except psutil.Error:
                if i == 0:
                    return None
        return float(total)
