"""A prefix of etcd kept in memory: read it, then watch it; read again after any break.

The rollout agent (the fleet's keys) and ``corral balance`` (registrations and drains) both
keep one. A watch that breaks (etcd restarted, partitioned, frozen: the probe notices) is
not resumed but replaced by a fresh read, so nothing written meanwhile is missed; until
that read succeeds ``synced`` is False and the owner acts on nothing it would have to trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

from corral.errors import StoreUnavailable
from corral.store.etcd.protocol import EtcdAPI
from corral.store.etcd.wire import KeyValue

log = logging.getLogger("corral.fleet")

FIRST_DELAY_S, MAX_DELAY_S = 0.1, 2.0


class PrefixMirror:
    def __init__(self, client: EtcdAPI, prefix: str, on_change: Callable[[], None], *,
                 keep: Callable[[str], bool] | None = None,
                 probe: Callable[[str], Awaitable[object]] | None = None,
                 probe_interval: float | None = None, what: str = "etcd watch") -> None:
        """``keep``: which keys under ``prefix`` to hold (all by default); ``on_change``: called
        after every read and every event; ``probe``/``probe_interval``: see EtcdClient.watch."""
        self.client = client
        self.prefix = prefix
        self.kvs: dict[str, KeyValue] = {}
        self.synced = False  # kvs reflect etcd as of the last read or event
        self._on_change = on_change
        self._keep = keep or (lambda _: True)
        self._probe, self._probe_interval = probe, probe_interval
        self._what = what

    async def run(self) -> NoReturn:
        delay = FIRST_DELAY_S
        while True:
            try:
                found = await self.client.range(self.prefix, prefix=True)
                self.kvs = {kv.key: kv for kv in found.kvs if self._keep(kv.key)}
                self.synced = True
                self._on_change()
                delay = FIRST_DELAY_S
                events = self.client.watch(self.prefix, found.revision + 1, prefix=True,
                                           probe=self._probe,
                                           probe_interval=self._probe_interval)
                async with contextlib.aclosing(events):
                    async for event in events:
                        if not self._keep(event.kv.key):
                            continue
                        if event.kind == "PUT":
                            self.kvs[event.kv.key] = event.kv
                        else:
                            self.kvs.pop(event.kv.key, None)
                        self._on_change()
            except StoreUnavailable as exc:
                self.synced = False
                log.info("%s interrupted (%s); reading again in %.1f s", self._what, exc,
                         delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)


class Mirrored:
    """For a class that keeps one :class:`PrefixMirror` as ``_mirror``: its keys and
    whether they are in sync, read through, and ``follow`` to run it."""

    _mirror: PrefixMirror

    @property
    def kvs(self) -> dict[str, KeyValue]:
        """The watched keys as etcd has them (as of the last read or event)."""
        return self._mirror.kvs

    @property
    def synced(self) -> bool:
        return self._mirror.synced

    async def follow(self) -> None:
        """Keep ``kvs`` equal to etcd: read, then watch; again after any break."""
        await self._mirror.run()
