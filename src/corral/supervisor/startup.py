"""Which config a supervisor starts with: the stored one wins, the command line's is the
fallback (the proposal: "even if you have --port, --binary and --model wrong")."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from corral.core.args import LlamaConfig
from corral.errors import StoreUnavailable
from corral.store.base import ConfigStore
from corral.supervisor.settings import Startup

log = logging.getLogger("corral")


async def choose_startup(store: ConfigStore, name: str, from_cli: LlamaConfig,
                         fleet: bool = False) -> Startup:
    """The stored config of ``name`` wins; the command line is the fallback.

    In a fleet nothing is stored from here: the rollout agent stores what runs if the key
    is still empty once this instance runs (so two first starts cannot both write).
    """
    try:
        stored = await store.load(name)
    except StoreUnavailable as exc:
        log.warning("config store unreachable (%s): running the command-line config", exc)
        return Startup(from_cli, None, persist_when_ready=False)
    if stored is None:
        log.info("nothing stored under %r yet: running the command-line config, stored once "
                 "ready", name)
        return Startup(from_cli, None, persist_when_ready=not fleet)
    if stored.config != from_cli:
        log.warning("the stored config %r (applied %s) wins over the command line; it differs "
                    "in: %s", name, stored.applied_at or "at an unknown time",
                    ", ".join(differences(stored.config, from_cli)))
    return Startup(stored.config, from_cli)


def differences(a: LlamaConfig, b: LlamaConfig) -> Iterator[str]:
    if a.binary != b.binary:
        yield f"binary ({a.binary} vs {b.binary})"
    da, db = a.as_dict(), b.as_dict()
    for key in dict.fromkeys([*da, *db]):
        if da.get(key) != db.get(key):
            yield f"{key} ({da.get(key, '-')} vs {db.get(key, '-')})"
