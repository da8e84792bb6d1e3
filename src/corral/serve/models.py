"""The models of ``corral serve`` at run time: the catalog made live, one supervisor each.

:class:`Models` owns the :class:`~corral.serve.model.ServedModel` of every id, builds each
model's :class:`~corral.supervisor.controller.Controller` when the scheduler loads it (the
same parts ``supervise --listen`` builds: store view, pre-flight with least privilege,
launcher, a door that picks loopback ports), and re-reads the catalog on SIGHUP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral.child.launcher import ProcessLauncher
from corral.child.pidfile import PidFile
from corral.child.preflight import CatalogCache, Preflight
from corral.child.privilege import build_policy
from corral.core.args import Flag, LlamaConfig
from corral.core.fit import Estimate
from corral.errors import StoreError, UsageError
from corral.front import FrontSettings
from corral.front.steer import place_on_loopback
from corral.sense.estimate import Estimator
from corral.serve.catalog import Entry, read_catalog
from corral.serve.model import ModelFront, ServedModel
from corral.store.base import ConfigStore
from corral.store.local import LocalOverrides, LocalStore
from corral.supervisor.controller import Controller
from corral.supervisor.operate import reload_from_store
from corral.supervisor.settings import Settings
from corral.supervisor.startup import choose_startup

log = logging.getLogger("corral.serve")

CORRAL_PICKS = ("--port", "--host")
WHY_PINNED = "with corral serve, Corral picks llama-server's port and host itself"


Tables = Callable[[], Awaitable[Mapping[str, Mapping[str, object]]]]


@dataclass
class CatalogSource:
    """Where the catalog comes from (re-read on SIGHUP, and on etcd writes)."""

    tables: Tables  # the store's named configs: name -> its table (``serve`` is read)
    where: str  # the store, for messages
    models_dir: Path | None
    binary: str
    dir_args: list[str] = field(default_factory=list)


@dataclass
class Models:
    """Every model of the catalog, and the parts each one's supervisor is built from."""

    source: CatalogSource
    store: ConfigStore
    settings: Settings
    front: FrontSettings
    state_dir: Path
    catalogs: CatalogCache
    estimator: Estimator
    echo_output: bool = True
    entries: dict[str, Entry] = field(default_factory=dict, init=False)
    by_id: dict[str, ServedModel] = field(default_factory=dict, init=False)
    aliases: dict[str, str] = field(default_factory=dict, init=False)
    # each model's door, accepting
    _doors: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)

    async def read(self) -> tuple[list[str], list[str]]:
        """(Re-)read the catalog: (ids added, ids removed). UsageError if it is malformed."""
        flags = await self.catalogs.get(self.source.binary)
        entries = read_catalog(await self.source.tables(), self.source.where,
                               self.source.models_dir, self.source.binary,
                               self.source.dir_args, flags)
        added = [i for i in entries if i not in self.by_id]
        removed = [i for i in self.by_id if i not in entries]
        self.entries = entries
        for model_id in added:
            model = ServedModel.on_loopback(model_id, self.front)
            self.by_id[model_id] = model
            self._doors[model_id] = asyncio.get_running_loop().create_task(
                model.door.serve(), name=f"door {model_id}")
        for model_id, entry in entries.items():
            self.by_id[model_id].serve = entry.serve
        self.aliases.clear()  # in place: the edge holds this dict
        self.aliases.update({a: e.id for e in entries.values() for a in e.serve.aliases})
        return added, removed

    async def config_of(self, model_id: str) -> LlamaConfig:
        """What ``model_id`` runs: its stored config, else the one from --models-dir."""
        stored = await self.store.load(model_id)
        if stored is not None:
            return stored.config
        fallback = self.entries[model_id].fallback
        if fallback is None:
            raise UsageError(f"model {model_id!r}: nothing stored under that name any more")
        return fallback

    async def estimate(self, model: ServedModel) -> Estimate | None:
        return await self.estimator.estimate(await self.config_of(model.id))

    async def controller_for(self, model: ServedModel) -> Controller:
        """A new supervisor for ``model`` (each load gets a fresh one)."""
        entry = self.entries[model.id]
        fallback = entry.fallback or await self.config_of(model.id)
        store = LocalStore(self.store, LocalOverrides((), frozenset(CORRAL_PICKS)))
        startup = await choose_startup(store, model.id, fallback)
        config = startup.preferred
        flags = await self.catalogs.get(config.binary)
        judge = build_policy(config, flags, model_dirs=self._model_dirs(config))
        alias = flags.lookup("--alias")
        return Controller(
            model.id, store, startup, self.settings,
            pinned=dict.fromkeys(store.pinned_keys, WHY_PINNED),
            pidfile=PidFile(self.state_dir / f"model-{_safe(model.id)}.pid"),
            launcher=ProcessLauncher(self.echo_output,
                                     allow_degraded=self.settings.allow_degraded),
            checks=Preflight(self.catalogs, picks_ports=True, fit_margin=self.settings.fit_margin,
                             estimator=self.estimator, judge=judge),
            front=ModelFront(model.door),
            place=lambda c: named(place_on_loopback(c), model.id, alias))

    def _model_dirs(self, config: LlamaConfig) -> list[str]:
        dirs = [str(self.source.models_dir)] if self.source.models_dir else []
        model = config.get("--model")
        if isinstance(model, str):
            dirs.append(os.path.dirname(os.path.realpath(model)) or ".")
        return dirs

    async def close(self) -> None:
        """Every door closed (the models are unloaded already)."""
        for model in self.by_id.values():
            await model.door.close(0.0)
        await asyncio.gather(*self._doors.values(), return_exceptions=True)

    async def reload(self, unload: Callable[[ServedModel], Awaitable[None]]) -> None:
        """SIGHUP: new models join; removed ones are drained and unloaded; a loaded model
        whose stored config changed is restarted with it (the others are left alone)."""
        try:
            added, removed = await self.read()
        except (UsageError, StoreError) as exc:
            log.error("catalog re-read: %s; nothing changed", exc)
            return
        for model_id in removed:
            model = self.by_id.pop(model_id)
            await unload(model)
            await model.door.close(0.0)
            await asyncio.gather(self._doors.pop(model_id), return_exceptions=True)
        for model in self.by_id.values():
            if model.refused:  # its config or the limits may have changed: judged again
                model.refused = None
                model.door.hold()
            if model.controller is not None and model.id not in added:
                await reload_from_store(model.controller)
        log.info("catalog re-read: %d model(s)%s%s", len(self.by_id),
                 f", added {', '.join(added)}" if added else "",
                 f", removed {', '.join(removed)}" if removed else "")


def named(config: LlamaConfig, model_id: str, alias: Flag | None) -> LlamaConfig:
    """``config`` answering to ``model_id`` (``--alias``, as llama.cpp's router gives its
    children): a client then reads back the id it asked for in an answer's ``model``, not a
    file path. A config that sets its own alias keeps it; not stored, like the port."""
    if alias is None or any(alias.canonical == k or k in alias.aliases for k, _ in config.args):
        return config
    return dataclasses.replace(config, args=(*config.args, (alias.canonical, model_id)))


def _safe(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in model_id)
