"""The etcd config store: configs at ``<prefix>/configs/<name>``, watched for writes by anyone.

Theory of operation
-------------------
:class:`EtcdStore` keeps each config as human-readable JSON at ``<prefix>/configs/<name>``.
Its watch is level-triggered and heals itself: read the key, yield it if its mod_revision
is newer than the last one seen, then watch from the read's revision + 1; on any failure,
back off (0.1 s doubling to 2 s) and start over, so a write made while disconnected is
never missed. A frozen etcd (SIGSTOP) keeps its TCP connections open and a silent watch
stream would never notice, so whenever the stream is quiet for ``probe_interval`` the
client makes a cheap range call to the same endpoint; if that fails, the watch restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from corral import defaults
from corral.errors import StoreCorrupt, StoreUnavailable
from corral.store.base import StoredConfig
from corral.store.etcd.client import DEFAULT_PROBE_INTERVAL, DEFAULT_TIMEOUT, EtcdClient
from corral.store.etcd.codec import _escape, _unescape, decode_config, encode_config
from corral.store.etcd.protocol import EtcdAPI
from corral.store.etcd.registration import DEFAULT_TTL, Registration
from corral.store.etcd.tls import EtcdTLS
from corral.store.etcd.wire import JSON, KeyValue

__all__ = ["EtcdStore"]

log = logging.getLogger("corral.store.etcd")  # one logger name for the whole driver

_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 2.0


class EtcdStore:
    """Configs in etcd at ``<prefix>/configs/<name>``, watched for writes by anyone."""

    def __init__(self, client: EtcdAPI, prefix: str = "/corral") -> None:
        """A store on ``client`` (an :class:`EtcdClient`, or anything that speaks its API:
        the fleet simulation passes an in-memory etcd)."""
        self._client = client
        self._prefix = prefix.rstrip("/")
        self._seen: dict[str, int] = {}  # name -> revision as of which we know its value

    @staticmethod
    def connect(
        addr: str,
        prefix: str = "/corral",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        tls: EtcdTLS | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> EtcdStore:
        """A store on a new :class:`EtcdClient` for ``addr`` (``tls``, ``user`` and
        ``password`` as there: TLS and etcd auth; without ``password`` a ``user``'s comes
        from ``$CORRAL_ETCD_PASSWORD``)."""
        return EtcdStore(EtcdClient(addr, timeout=timeout, probe_interval=probe_interval,
                                    tls=tls, user=user, password=password), prefix)

    @property
    def description(self) -> str:
        return f"etcd {self._client.endpoints} {self._prefix}/configs/"

    @property
    def client(self) -> EtcdAPI:
        return self._client

    @property
    def is_connected(self) -> bool:
        """Whether the last call to etcd worked; for the supervisor's status."""
        return self._client.is_connected

    @property
    def last_error(self) -> str | None:
        return self._client.last_error

    def config_key(self, name: str) -> str:
        return f"{self._prefix}/configs/{_escape(name)}"

    def instance_key(self, name: str, instance_id: str) -> str:
        return f"{self._prefix}/instances/{_escape(name)}/{_escape(instance_id)}"

    async def load(self, name: str) -> StoredConfig | None:
        key = self.config_key(name)
        found = await self._client.range(key)
        self._seen[name] = max(self._seen.get(name, 0), found.revision)
        return decode_config(found.kvs[0].value, key) if found.kvs else None

    async def save(self, name: str, stored: StoredConfig) -> None:
        revision = await self._client.put(self.config_key(name), encode_config(stored))
        self._seen[name] = max(self._seen.get(name, 0), revision)

    async def watch(self, name: str) -> AsyncIterator[StoredConfig]:
        """Every config written under ``name`` from now on, by anyone; never ends by itself.

        Starts after what this store last loaded or saved for ``name``; if it did neither,
        the current value (if any) comes first. Values that are not a config are skipped
        with a warning; outages are ridden out (see ``is_connected``).
        """
        key = self.config_key(name)
        seen = self._seen.get(name, 0)

        def newer(kv: KeyValue) -> StoredConfig | None:
            nonlocal seen
            if kv.mod_revision <= seen:
                return None
            seen = kv.mod_revision
            return _decode_or_warn(kv)

        delay = _BACKOFF_FIRST
        while True:
            try:
                found = await self._client.range(key)
                delay = _BACKOFF_FIRST
                for kv in found.kvs:
                    if (stored := newer(kv)) is not None:
                        yield stored
                changes = self._client.watch(key, found.revision + 1)
                async with contextlib.aclosing(changes):
                    async for event in changes:
                        if event.kind == "PUT" and (stored := newer(event.kv)) is not None:
                            yield stored
            except StoreUnavailable as exc:
                log.info("watch on %s interrupted (%s); retrying in %.1f s", key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def register(
        self,
        name: str,
        info: Mapping[str, Any],
        *,
        instance_id: str | None = None,
        ttl: int = DEFAULT_TTL,
    ) -> Registration:
        """A (not yet started) registration of this instance under ``name``."""
        instance_id = instance_id or defaults.instance_id()
        return Registration(self._client, self.instance_key(name, instance_id), info, ttl=ttl)

    async def list_instances(self, name: str) -> dict[str, JSON]:
        """Live instances of ``name``: instance id -> the value it registered."""
        base = self.instance_key(name, "")
        found = await self._client.range(base, prefix=True)
        out: dict[str, JSON] = {}
        for kv in found.kvs:
            try:
                value = json.loads(kv.value)
            except ValueError:
                value = None
            if isinstance(value, dict):
                out[_unescape(kv.key[len(base) :])] = value
            else:
                log.warning("ignoring etcd key %s: not a JSON object", kv.key)
        return out

    def serve_key(self, name: str) -> str:
        """``corral serve``'s options of model ``name`` (aliases, ttl, pin), as JSON."""
        return f"{self._prefix}/serve/{_escape(name)}"

    async def catalog(self) -> tuple[dict[str, dict[str, Any]], int]:
        """Every config name with its ``corral serve`` table (``{"serve": {...}}``, or {}),
        and the revision this was read at (watch from the next one)."""
        configs = await self._client.range(f"{self._prefix}/configs/", prefix=True)
        serves = await self._client.range(f"{self._prefix}/serve/", prefix=True)
        tables: dict[str, dict[str, Any]] = {
            _unescape(kv.key.rpartition("/")[2]): {} for kv in configs.kvs}
        for kv in serves.kvs:
            name = _unescape(kv.key.rpartition("/")[2])
            try:
                options = json.loads(kv.value)
            except ValueError:
                options = kv.value.decode(errors="replace")  # the catalog names the fault
            if name in tables:
                tables[name] = {"serve": options}
        return tables, min(configs.revision, serves.revision)

    async def catalog_changes(self) -> AsyncIterator[None]:
        """Once after every write of a config or a serve table (by anyone); rides out
        outages like :meth:`watch`, and yields once it is back (writes may have been missed)."""
        delay, missed = _BACKOFF_FIRST, False
        watched = (f"{self._prefix}/configs/", f"{self._prefix}/serve/")
        while True:
            try:
                _, revision = await self.catalog()
                delay = _BACKOFF_FIRST
                if missed:  # writes may have happened while the watch was down
                    missed = False
                    yield None
                changes = self._client.watch(f"{self._prefix}/", revision + 1, prefix=True)
                async with contextlib.aclosing(changes):
                    async for event in changes:
                        if event.kv.key.startswith(watched):
                            yield None
            except StoreUnavailable as exc:
                log.info("catalog watch interrupted (%s); retrying in %.1f s", exc, delay)
                missed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def close(self) -> None:
        await self._client.aclose()


def _decode_or_warn(kv: KeyValue) -> StoredConfig | None:
    try:
        return decode_config(kv.value, kv.key)
    except StoreCorrupt as exc:
        log.warning("ignoring a write that is not a config: %s", exc)
        return None
