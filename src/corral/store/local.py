"""Per-instance flags in a fleet: what one host keeps to itself when the config is shared.

Supervisors that share a name through etcd share one config, but each listens on its own
port (three on one machine, say). So ``--port`` and ``--host`` given on the command line are
*local*. :class:`LocalStore` is the one place that knows: it strips them from what is
stored and puts this host's values back into what is loaded or watched. Everything above it
sees only configs as this host runs them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

from corral.core.args import ArgValue, LlamaConfig
from corral.store.base import ConfigStore, StoredConfig, WatchableStore

log = logging.getLogger("corral")

LOCAL_KEYS = frozenset({"--port", "--host"})


@dataclasses.dataclass(frozen=True)
class LocalOverrides:
    """This host's values of its local flags; ``private`` flags are neither stored nor read
    (with ``--listen`` Corral picks llama-server's port and host itself)."""

    args: tuple[tuple[str, ArgValue], ...] = ()
    private: frozenset[str] = frozenset()
    fallback: tuple[tuple[str, ArgValue], ...] = ()
    """Used only where the stored config does not say (configs stored without a port by
    earlier versions keep running on the command line's port)."""

    @staticmethod
    def from_config(config: LlamaConfig) -> LocalOverrides:
        return LocalOverrides(tuple((k, v) for k, v in config.args if k in LOCAL_KEYS))

    @staticmethod
    def shared_port(config: LlamaConfig) -> LocalOverrides:
        """The port is the fleet's; the command line's only fills a gap."""
        return LocalOverrides(fallback=tuple((k, v) for k, v in config.args if k in LOCAL_KEYS))

    def keys(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.args) | self.private

    def apply(self, shared: LlamaConfig) -> LlamaConfig:
        """The shared config as this host runs it."""
        args = {k: v for k, v in shared.args if k not in self.keys()}
        for key, value in self.fallback:
            args.setdefault(key, value)
        args.update(self.args)
        return dataclasses.replace(shared, args=tuple(args.items()))

    def strip(self, config: LlamaConfig) -> LlamaConfig:
        """What this host stores for everyone."""
        return dataclasses.replace(
            config, args=tuple((k, v) for k, v in config.args if k not in self.keys()))


class LocalStore:
    """A shared store seen through this host's local flags."""

    def __init__(self, inner: ConfigStore | WatchableStore, overrides: LocalOverrides) -> None:
        self.inner = inner
        self.overrides = overrides

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def is_connected(self) -> bool:
        return bool(getattr(self.inner, "is_connected", True))

    @property
    def pinned_keys(self) -> frozenset[str]:
        """Flags only a restart of this supervisor may change."""
        return self.overrides.keys()

    def shared(self, config: LlamaConfig) -> LlamaConfig:
        return self.overrides.strip(config)

    def _local(self, stored: StoredConfig) -> StoredConfig:
        dropped = sorted(self.overrides.private & {k for k, _ in stored.config.args})
        if dropped:
            log.warning("the stored config sets %s, which Corral now chooses itself "
                        "(--listen): ignored, and dropped at the next save", ", ".join(dropped))
        return dataclasses.replace(stored, config=self.overrides.apply(stored.config))

    async def load(self, name: str) -> StoredConfig | None:
        stored = await self.inner.load(name)
        return self._local(stored) if stored is not None else None

    async def save(self, name: str, stored: StoredConfig) -> None:
        shared = self.overrides.strip(stored.config)
        await self.inner.save(name, dataclasses.replace(stored, config=shared))

    async def watch(self, name: str) -> AsyncIterator[StoredConfig]:
        assert isinstance(self.inner, WatchableStore), "only a shared store can be watched"
        async for stored in self.inner.watch(name):
            yield self._local(stored)

    async def close(self) -> None:
        await self.inner.close()
