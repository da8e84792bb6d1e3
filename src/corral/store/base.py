"""The ConfigStore interface: named configs that survive the supervisor.

A store maps a config *name* to the last config that became ready under that name.
Drivers: :mod:`memory` (tests), :mod:`toml_file` (the default), :mod:`etcd` (fleets).
Every driver passes the same contract tests (``tests/test_store_contract.py``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from corral.core.args import LlamaConfig
from corral.defaults import instance_id


@dataclass(frozen=True)
class StoredConfig:
    config: LlamaConfig
    applied_at: str = ""
    applied_by: str = ""

    @staticmethod
    def now(config: LlamaConfig) -> StoredConfig:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return StoredConfig(config, stamp, instance_id())


@runtime_checkable
class ConfigStore(Protocol):
    """Where the last good config of each name lives."""

    @property
    def description(self) -> str:
        """Human-readable location, for logs (``file /etc/corral/config.toml``)."""
        ...

    async def load(self, name: str) -> StoredConfig | None:
        """The stored config of ``name``, or None if nothing is stored.

        Raises StoreCorrupt if what is stored cannot be parsed, StoreUnavailable if the
        store cannot be reached.
        """
        ...

    async def save(self, name: str, stored: StoredConfig) -> None:
        """Durably store ``stored`` under ``name`` before returning. Other names are kept."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class WatchableStore(ConfigStore, Protocol):
    """A store others can write to (etcd): yields every config written under ``name``."""

    def watch(self, name: str) -> AsyncIterator[StoredConfig]: ...
