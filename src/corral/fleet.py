"""Fleets: supervisors that share a config name through etcd.

Every supervisor of a name watches ``/corral/configs/<name>``. A config written there by
anyone (a peer's successful apply, an operator's ``etcdctl put``) is submitted to this
supervisor's controller as a whole-config change, so it goes through the same merge,
pre-flight and transaction as an API change; a config equal to what runs (our own write
coming back, say) is ignored. If it fails here, this host keeps its last good config and
reports the divergence in ``/v1/status`` and in its registration.

Each supervisor also keeps ``/corral/instances/<name>/<instance-id>`` alive under a lease,
with what it runs, so ``corral fleet`` can show who runs what.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from corral.changes import ChangeRecord, Outcome, config_json
from corral.controller import Controller
from corral.core.args import Change, LlamaConfig
from corral.defaults import instance_id
from corral.store.etcd import EtcdStore
from corral.store.local import LocalStore

log = logging.getLogger("corral.fleet")

REGISTRATION_REFRESH_S = 0.5


class FleetSync:
    def __init__(self, controller: Controller, store: LocalStore, etcd: EtcdStore, name: str,
                 api_addr: str) -> None:
        self.controller = controller
        self.store = store  # watched through this host's local flags
        self.etcd = etcd  # registrations
        self.name = name
        self.api_addr = api_addr
        self.instance_id = instance_id()
        self.fleet_config: LlamaConfig | None = None  # as this host runs it
        self.divergence: str | None = None
        self._publish()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow(tg), name="fleet watch")
            tg.create_task(self._register(), name="fleet registration")

    async def _follow(self, tg: asyncio.TaskGroup) -> None:
        async for stored in self.store.watch(self.name):
            wanted = self.fleet_config = stored.config
            if wanted == self.controller.last_good:
                self._settle(None)
                continue
            log.info("fleet config %r changed (by %s at %s): applying it here",
                     self.name, stored.applied_by or "?", stored.applied_at or "?")
            record = self.controller.submit(Change.whole(wanted), source="fleet")
            tg.create_task(self._await_outcome(record), name="fleet apply outcome")

    async def _await_outcome(self, record: ChangeRecord) -> None:
        await asyncio.shield(record.done)
        if record.outcome is Outcome.APPLIED:
            self._settle(None)
        else:
            self._settle(f"fleet config not applied here: {record.error}")
            log.error("this host keeps its last good config; %s", self.divergence)

    def _settle(self, divergence: str | None) -> None:
        self.divergence = divergence
        self._publish()

    def in_sync(self) -> bool:
        if self.fleet_config is None:
            return True
        return self.controller.last_good == self.fleet_config

    def _publish(self) -> None:
        self.controller.fleet = {
            "instance_id": self.instance_id,
            "in_sync": self.in_sync(),
            "divergence": self.divergence,
            "fleet_config": config_json(self.store.shared(self.fleet_config))
            if self.fleet_config else None,
        }

    def info(self) -> dict[str, Any]:
        status = self.controller.status()
        return {
            "host": socket.gethostname(), "supervisor": self.api_addr, "port": status.port,
            "state": status.state, "pid": status.pid, "in_sync": self.in_sync(),
            "divergence": self.divergence,
            "config": config_json(self.store.shared(self.controller.last_good)),
        }

    async def _register(self) -> None:
        registration = self.etcd.register(self.name, self.info(), instance_id=self.instance_id)
        async with registration:
            last = registration.info
            while True:
                await asyncio.sleep(REGISTRATION_REFRESH_S)
                self._publish()
                current = self.info()
                if current != last:
                    registration.update(**current)
                    last = current
