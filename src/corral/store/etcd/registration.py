"""Live instance registrations in etcd: one key kept alive under a lease.

Theory of operation
-------------------
:class:`Registration` keeps ``<prefix>/instances/<name>/<id>`` under a lease, renewed
0.4 TTL after its last renewal by this loop, or earlier by a quiet watch's
:meth:`~Registration.probe` (every TTL/3). When the lease is lost (expired while etcd was away, or
revoked) it grants a new one and puts the value again; after any failed round it re-puts
the value too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from corral.errors import StoreUnavailable
from corral.store.etcd.failures import LeaseNotFound
from corral.store.etcd.protocol import EtcdAPI
from corral.store.etcd.wire import JSON

__all__ = ["DEFAULT_TTL", "Registration"]

log = logging.getLogger("corral.store.etcd")  # one logger name for the whole driver

DEFAULT_TTL = 5
# Renew after TTL x this since the last renewal: a little later than a quiet watch's probe
# (TTL/3), so that when both could renew, the probe does it and this loop stays silent.
_RENEW_AFTER = 0.4


class Registration:
    """Keeps one key alive under a lease while :meth:`run` runs; :meth:`close` removes it.

    Use ``async with store.register(...) as reg:`` (runs in a task of its own), or run
    :meth:`run` in the caller's TaskGroup and call :meth:`close` after cancelling it.
    """

    def __init__(
        self, client: EtcdAPI, key: str, info: Mapping[str, Any], *, ttl: int = DEFAULT_TTL
    ) -> None:
        self._client = client
        self._key = key
        self._info = dict(info)
        self._ttl = max(1, int(ttl))
        self._lease: int | None = None
        self._version, self._written = 1, 0
        self._wake = asyncio.Event()
        self._renewed_at = 0.0  # event-loop time of the last renewal (0: never)
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return self._key

    @property
    def info(self) -> JSON:
        return dict(self._info)

    @property
    def ttl(self) -> int:
        return self._ttl

    @property
    def lease(self) -> int | None:
        return self._lease

    @property
    def is_registered(self) -> bool:
        """Whether the key is written under a live lease, as of the last round."""
        return self._lease is not None and self._written == self._version

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the value; written at once by the running loop."""
        self._info.update(fields)
        self._version += 1
        self._wake.set()

    async def run(self) -> None:
        """Renew the lease 0.4 TTL after its last renewal and write updates, until
        cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._round()
            except LeaseNotFound:
                self._lease = None
                self._wake.set()  # register again at once
            except StoreUnavailable as exc:
                log.debug("registration %s: %s", self._key, exc)
                self._written = 0  # re-put once etcd answers again
                self._renewed_at = loop.time()  # retry later, not at once
            # A watch that probes with this lease (see probe) renews it meanwhile: then this
            # loop sends nothing, and an idle supervisor costs etcd one request per TTL/3.
            while not self._wake.is_set():
                delay = self._renewed_at + self._ttl * _RENEW_AFTER - loop.time()
                if delay <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()

    async def probe(self, url: str) -> None:
        """A watch's quiet-stream probe at ``url`` that renews this lease on the way."""
        lease = self._lease
        if lease is None or self._written != self._version:
            await self._client.ping(url)
            return
        try:
            await self._client.lease_keepalive(lease, url=url)
        except LeaseNotFound:
            self._wake.set()  # etcd answered: the watch is fine; register again
            return
        self._renewed_at = asyncio.get_running_loop().time()

    async def _round(self) -> None:
        if self._lease is not None:
            try:
                await self._client.lease_keepalive(self._lease)
                self._renewed_at = asyncio.get_running_loop().time()
            except LeaseNotFound:
                log.info("registration %s: lease lost, registering again", self._key)
                self._lease = None
        if self._lease is None:
            self._written = 0
            self._lease = await self._client.lease_grant(self._ttl)
            self._renewed_at = asyncio.get_running_loop().time()
        if self._written != self._version:
            version = self._version
            await self._client.put(self._key, json.dumps(self._info), lease=self._lease)
            self._written = version

    async def close(self) -> None:
        """Stop the loop started by ``async with`` and revoke the lease (best effort)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        lease, self._lease = self._lease, None
        if lease is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._client.lease_revoke(lease)

    async def __aenter__(self) -> Registration:
        self._task = asyncio.create_task(self.run(), name=f"etcd registration {self._key}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
