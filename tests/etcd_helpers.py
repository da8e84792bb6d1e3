"""Opening an etcd store and following its watch, for the tests on a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from corral.store.base import StoredConfig
from corral.store.etcd import EtcdStore


@contextlib.asynccontextmanager
async def opened(addr: str, **kwargs: Any) -> AsyncIterator[EtcdStore]:
    """An :class:`EtcdStore` on ``addr``, closed at the end of the block."""
    store = EtcdStore.connect(addr, **kwargs)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def watching(store: EtcdStore, name: str) -> AsyncIterator[asyncio.Queue[StoredConfig]]:
    """Runs ``store.watch(name)`` in a task that feeds a queue."""
    queue: asyncio.Queue[StoredConfig] = asyncio.Queue()

    async def collect() -> None:
        async for stored in store.watch(name):
            queue.put_nowait(stored)

    task = asyncio.create_task(collect())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_of(queue: asyncio.Queue[StoredConfig], deadline: float = 10.0) -> StoredConfig:
    """The next config the watch delivered, within ``deadline`` seconds."""
    return await asyncio.wait_for(queue.get(), deadline)
