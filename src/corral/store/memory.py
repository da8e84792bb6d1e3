"""An in-memory store: for tests, and for ``--config-driver '{"type": "memory"}'``."""

from __future__ import annotations

from corral.store.base import StoredConfig


class MemoryStore:
    def __init__(self) -> None:
        self._configs: dict[str, StoredConfig] = {}

    @property
    def description(self) -> str:
        return "memory (nothing survives a restart)"

    async def load(self, name: str) -> StoredConfig | None:
        return self._configs.get(name)

    async def save(self, name: str, stored: StoredConfig) -> None:
        self._configs[name] = stored

    async def close(self) -> None:
        return None
