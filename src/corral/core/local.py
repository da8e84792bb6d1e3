"""Per-instance flags in a fleet: what one host keeps to itself when the config is shared.

Supervisors that share a name through etcd share one config, but each listens on its own
port (three on one machine, say). So ``--port`` and ``--host`` given on the command line are
*local*: they are stripped from what is stored and put back into what is run.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.core.args import ArgValue, LlamaConfig

LOCAL_KEYS = frozenset({"--port", "--host"})


@dataclass(frozen=True)
class LocalOverrides:
    args: tuple[tuple[str, ArgValue], ...] = ()

    @staticmethod
    def from_config(config: LlamaConfig) -> LocalOverrides:
        return LocalOverrides(tuple((k, v) for k, v in config.args if k in LOCAL_KEYS))

    def keys(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.args)

    def apply(self, shared: LlamaConfig) -> LlamaConfig:
        """The shared config as this host runs it."""
        args = {k: v for k, v in shared.args if k not in self.keys()}
        args.update(self.args)
        return LlamaConfig(shared.binary, tuple(args.items()))

    def strip(self, config: LlamaConfig) -> LlamaConfig:
        """What this host stores for everyone."""
        return LlamaConfig(config.binary,
                           tuple((k, v) for k, v in config.args if k not in self.keys()))
