"""Where a fleet keeps its facts in etcd, and how a config is recognised across hosts.

``<prefix>/configs/<name>``            the fleet config (each write is a revision)
``<prefix>/rollouts/<name>``           the rollout record of the newest revision
``<prefix>/slots/<name>/<instance>``   who may apply now (under the holder's lease)
``<prefix>/instances/<name>/<id>``     live supervisors (under their lease)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from corral.core.args import LlamaConfig
from corral.store.etcd import EtcdStore
from corral.store.etcd.codec import _escape, _unescape

__all__ = ["FleetKeys", "digest_of", "same_config"]


@dataclass(frozen=True)
class FleetKeys:
    root: str  # "/corral"
    name: str

    @staticmethod
    def of(etcd: EtcdStore, name: str) -> FleetKeys:
        return FleetKeys(etcd.config_key(name).rsplit("/configs/", 1)[0], name)

    @property
    def watched(self) -> str:
        """One prefix covers every key of every fleet: one watch per supervisor."""
        return f"{self.root}/"

    @property
    def config(self) -> str:
        return f"{self.root}/configs/{_escape(self.name)}"

    @property
    def rollout(self) -> str:
        return f"{self.root}/rollouts/{_escape(self.name)}"

    @property
    def slots(self) -> str:
        return f"{self.root}/slots/{_escape(self.name)}/"

    @property
    def instances(self) -> str:
        return f"{self.root}/instances/{_escape(self.name)}/"

    def slot(self, instance: str) -> str:
        return f"{self.slots}{_escape(instance)}"

    def member(self, key: str, prefix: str) -> str | None:
        """The instance id of ``key`` if it lies directly under ``prefix``."""
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        return None if not rest or "/" in rest else _unescape(rest)


def digest_of(config: LlamaConfig) -> str:
    """The same on every host for the same shared config (stamps and order of keys aside)."""
    canonical = json.dumps([config.binary, sorted(map(list, config.args)),
                            sorted(map(list, config.env))], default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def same_config(a: LlamaConfig, b: LlamaConfig) -> bool:
    """Whether ``a`` and ``b`` run the same (flag order aside: a host's own port may be
    placed elsewhere than in the stored config)."""
    return a.binary == b.binary and dict(a.args) == dict(b.args) and dict(a.env) == dict(b.env)
