"""Waiting until an upstream (or the whole front door) has no request in flight: drains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from corral.front.model import Upstream

__all__ = ["IdleWaiters"]


class IdleWaiters:
    """Who waits for which upstream (None: every upstream) to go idle; ``in_flight`` counts."""

    def __init__(self, in_flight: Callable[[Upstream | None], int]) -> None:
        self._in_flight = in_flight
        # who waits for which upstream; empty while nobody drains (nearly always)
        self.waiters: dict[Upstream | None, list[asyncio.Future[None]]] = {}

    async def wait(self, upstream: Upstream | None, timeout_s: float) -> int:
        """Until ``upstream`` is idle or ``timeout_s`` passed; how many are still in flight."""
        if self._in_flight(upstream) == 0:
            return 0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self.waiters.setdefault(upstream, [])
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            pass
        finally:
            waiters.remove(fut)
            if not waiters:
                del self.waiters[upstream]
        return self._in_flight(upstream)

    def finished(self, upstream: Upstream, left: int) -> None:
        """An attempt on ``upstream`` ended, ``left`` still run there: wake who waits."""
        if not self.waiters:
            return  # nobody drains: the case of nearly every request
        if left == 0:
            self._wake(upstream)
        if None in self.waiters and self._in_flight(None) == 0:
            self._wake(None)

    def _wake(self, upstream: Upstream | None) -> None:
        for fut in self.waiters.get(upstream, ()):
            if not fut.done():
                fut.set_result(None)
