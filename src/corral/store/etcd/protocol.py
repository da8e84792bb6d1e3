"""What Corral asks of etcd, as a protocol: the calls :class:`~.client.EtcdClient` answers.

The store, the registration and the fleet's rollout agent are written against this and
nothing else, so the fleet simulation (``tests/memory_etcd.py``) runs the shipped code on an
in-memory etcd with revisions, transactions, leases and lagging watches.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from corral.store.etcd.wire import Compare, KeyValue, Op, Range, TxnResult, WatchEvent

__all__ = ["EtcdAPI"]


class EtcdAPI(Protocol):
    @property
    def endpoints(self) -> str: ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    async def range(self, key: str, *, prefix: bool = False) -> Range: ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int: ...

    async def delete(self, key: str, *, prefix: bool = False) -> int: ...

    async def txn(self, compare: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResult: ...

    async def lease_grant(self, ttl: int) -> int: ...

    async def lease_keepalive(self, lease: int, *, url: str | None = None) -> int: ...

    async def lease_revoke(self, lease: int) -> None: ...

    async def ping(self, url: str, key: str = "/") -> None: ...

    def watch(self, key: str, start_revision: int, *, prefix: bool = False,
              probe: Callable[[str], Awaitable[object]] | None = None,
              probe_interval: float | None = None) -> AsyncGenerator[WatchEvent, None]: ...

    async def aclose(self) -> None: ...
