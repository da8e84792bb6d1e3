"""The in-memory driver against the store contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from corral.store.memory import MemoryStore
from tests.store_contract import StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStore]:
        store = MemoryStore()
        yield store
        await store.close()
