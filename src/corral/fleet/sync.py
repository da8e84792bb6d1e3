"""Fleets: supervisors that share a config name through etcd, changed by rollouts.

Every supervisor of a name registers itself at ``/corral/instances/<name>/<id>`` under a
lease and takes part in rollouts (:mod:`corral.fleet.rollout`): a config written to
``/corral/configs/<name>`` (by ``etcdctl put``, say) reaches the fleet one slot at a time,
canary first. A change posted to one supervisor's API is tried there first, holding a slot,
and written to the key only once it runs (:class:`PublishingStore`): that supervisor is its
canary, and the rest of the fleet follows.

At start-up, while a rollout is under way, the last config that succeeded is started rather
than the one still being proved (:func:`load_for_start`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from corral.core.args import Change, merge_changes
from corral.core.rollout import Phase, Rollout, Target, revert_target
from corral.defaults import instance_id
from corral.errors import StoreConflict, StoreCorrupt, StoreError, StoreUnavailable
from corral.fleet.drain import DrainKeys, end_drain, request_drain
from corral.fleet.keys import FleetKeys, digest_of, same_config
from corral.fleet.records import dump_record, parse_record, split_slots
from corral.fleet.rollout import RolloutAgent, RolloutSettings, now_iso
from corral.store.base import StoredConfig
from corral.store.etcd import EtcdStore
from corral.store.etcd.codec import decode_config, encode_config
from corral.store.etcd.wire import Compare, Op
from corral.store.local import LocalStore
from corral.supervisor.changes import ChangeRecord, Outcome, config_json
from corral.supervisor.view import Supervisor

__all__ = ["FleetSync", "PublishingStore", "RolloutResult", "load_for_start"]

log = logging.getLogger("corral.fleet")

REGISTRATION_REFRESH_S = 0.5
_SAVE_ATTEMPTS = 10


@dataclass(frozen=True)
class Base:
    """What an API change is built on: the fleet config's revision when it began (0: none
    stored) and whether this instance ran that config then."""

    revision: int
    ran_it: bool


class PublishingStore:
    """The etcd store as the controller sees it in a fleet: a save (an API change that now
    runs here) writes the config and a rollout record naming this instance its canary, in
    one transaction that compares both keys with what the change was built on: a config
    written meanwhile by anyone wins, and the change is answered ``superseded``
    (:class:`StoreConflict`), never written over it."""

    def __init__(self, etcd: EtcdStore, name: str, me: str, settings: RolloutSettings) -> None:
        self.etcd = etcd
        self.keys = FleetKeys.of(etcd, name)
        self.me = me
        self.settings = settings
        self.base: Base | None = None  # set by FleetSync.begin for the change being applied
        self.last_published: int | None = None

    @property
    def description(self) -> str:
        return self.etcd.description

    @property
    def is_connected(self) -> bool:
        return self.etcd.is_connected

    async def load(self, name: str) -> StoredConfig | None:
        return await load_for_start(self.etcd, name)

    async def save(self, name: str, stored: StoredConfig) -> None:
        base = self.base
        if base is None:  # every change of a fleet member goes through FleetSync.begin
            raise StoreError(f"fleet {name!r}: a change not made through the API is not "
                             "stored")
        k, client = self.keys, self.etcd.client
        value = encode_config(stored).decode()
        for _ in range(_SAVE_ATTEMPTS):  # the record may change under us (others' progress)
            found = await client.txn([], [Op.get(k.config), Op.get(k.rollout),
                                          Op.get(k.instances, prefix=True)])
            config_kv, record_kv = (r.kvs[0] if r.kvs else None for r in found.ranges[:2])
            written = config_kv.mod_revision if config_kv else 0
            if written != base.revision:
                raise StoreConflict(
                    f"fleet {name!r}: the fleet config is at revision {written}, newer than the "
                    f"one this change was made on ({base.revision or 'none'}); the newer write "
                    f"wins and this change is not stored (this instance goes back to the fleet "
                    f"config; post the change again to make it on top of the newer one)")
            live = frozenset(m for kv in found.ranges[2].kvs
                             if (m := k.member(kv.key, k.instances)) is not None)
            previous = parse_record(record_kv.value if record_kv else None)
            if previous is not None:
                good, good_revision = revert_target(
                    previous, live if base.ran_it else live - {self.me})
            else:
                good = config_kv.value.decode() if config_kv else None
                good_revision = written or None
            canary = self.settings.canary_seconds > 0
            record = Rollout(0, digest_of(stored.config), value,
                             Phase.CANARY if canary else Phase.ROLLING,
                             canary=self.me if canary else None, progress={self.me: "done"},
                             good=good, good_revision=good_revision, started_at=now_iso())
            done = await client.txn(
                [Compare.unchanged(k.config, written),
                 Compare.unchanged(k.rollout, record_kv.mod_revision if record_kv else 0)],
                [Op.put(k.config, value),
                 Op.put(k.rollout, dump_record(record))])
            if done.succeeded:
                self.last_published = done.revision
                log.info("fleet %r: revision %d written; this instance is its canary", name,
                         done.revision)
                return
        raise StoreUnavailable(f"fleet {name!r}: the rollout record kept changing; the "
                               "change is not stored")

    async def close(self) -> None:
        await self.etcd.close()


async def load_for_start(etcd: EtcdStore, name: str) -> StoredConfig | None:
    """The config to start with: the fleet config, unless it is still being rolled out,
    then the last one that succeeded (a late joiner does not become an untried canary)."""
    keys = FleetKeys.of(etcd, name)
    found = await etcd.client.txn([], [Op.get(keys.config), Op.get(keys.rollout)])
    if not found.ranges[0].kvs:
        return None
    config_kv = found.ranges[0].kvs[0]
    stored = decode_config(config_kv.value, config_kv.key)
    record = parse_record(found.ranges[1].kvs[0].value if found.ranges[1].kvs else None)
    target = Target(config_kv.mod_revision, digest_of(stored.config))
    if (record is not None and record.matches(target)
            and record.phase in (Phase.CANARY, Phase.ROLLING) and record.good):
        try:
            good = decode_config(record.good.encode(), keys.rollout)
        except StoreCorrupt:
            return stored
        log.info("fleet %r: revision %d is still rolling out; starting the last config that "
                 "succeeded, then taking part", name, config_kv.mod_revision)
        return good
    return stored


class RolloutResult:
    """How ``?wait=rollout`` ends: done, failed (with the canary's reason), or timed out."""

    def __init__(self, outcome: str, view: dict[str, Any] | None) -> None:
        self.outcome = outcome  # "done", "failed", "timeout"
        self.view = view


class FleetSync:
    def __init__(self, controller: Supervisor, store: LocalStore, etcd: EtcdStore, name: str,
                 api_addr: str, settings: RolloutSettings | None = None,
                 me: str | None = None, listen: str | None = None) -> None:
        self.controller = controller
        self.store = store
        self.etcd = etcd
        self.name = name
        self.api_addr = api_addr
        self.listen = listen  # the front door: where a balancer sends this host's clients
        self.instance_id = me or instance_id()
        self.settings = settings or RolloutSettings()
        self._view: dict[str, Any] = {}  # what this instance reports of the fleet
        self.registration = etcd.register(name, self.info(), instance_id=self.instance_id)
        # The watch's quiet-stream probe renews the registration's lease: an idle
        # supervisor costs etcd one request per TTL/3.
        self.agent = RolloutAgent(controller, store, etcd, FleetKeys.of(etcd, name),
                                  self.instance_id, self.settings,
                                  lambda: self.registration.lease,
                                  probe=self.registration.probe,
                                  probe_interval=self.registration.ttl / 3)
        self.agent.on_change = self._publish
        inner = store.inner
        self.publisher = inner if isinstance(inner, PublishingStore) else None
        self._pending: set[asyncio.Task[None]] = set()  # API changes still applying
        self._drain = "no balancer"  # how the API change being applied was drained
        self._publish()

    async def run(self) -> None:
        try:
            async with self.registration, asyncio.TaskGroup() as tg:
                tg.create_task(self.agent.run(), name="fleet rollouts")
                tg.create_task(self._refresh(), name="fleet registration")
        finally:
            for task in self._pending:
                task.cancel()

    # ---- API changes --------------------------------------------------------------------

    async def begin(self, change: Change) -> ChangeRecord:
        """An API change: take a slot, then apply it here (its Persist step publishes it,
        naming this instance the canary). Returns once it is submitted.

        The change is made on top of the fleet config as this instance knows it (the one it
        runs, or if a rollout has not reached it yet, the newer one), and it is stored only
        if that is still the fleet config when it has proved itself here.
        """
        await self.agent.apply_lock.acquire()
        try:
            await self.agent.acquire()
            self._drain = await request_drain(  # the balancers take this host out first
                self.etcd.client, DrainKeys(self.agent.keys), self.instance_id,
                self.registration.lease, self.agent, self.settings.balancer_drain_timeout)
            found = self.agent.target()
            ran_it = self.in_sync()
            if found is not None and not ran_it:
                change = merge_changes([Change.whole(self.store.overrides.apply(found[1])),
                                        change])
            if self.publisher is not None:
                self.publisher.base = Base(found[0].revision if found else 0, ran_it)
            record = self.controller.submit(change, source="api")
        except BaseException:
            self.agent.apply_lock.release()
            if self._drain != "no balancer":
                await end_drain(self.etcd.client, DrainKeys(self.agent.keys), self.instance_id)
            raise
        task = asyncio.create_task(self._finish(record), name=f"fleet change {record.id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return record

    async def _finish(self, record: ChangeRecord) -> None:
        try:
            await asyncio.shield(record.done)
        finally:
            if self.publisher is not None:
                self.publisher.base = None
            if self._drain != "no balancer":
                await end_drain(self.etcd.client, DrainKeys(self.agent.keys), self.instance_id)
            self.agent.apply_lock.release()
        if record.outcome is not Outcome.APPLIED or not record.restarted:
            await self.agent.release()  # nothing was published: the slot is not needed

    def rollout_of(self, record: ChangeRecord) -> dict[str, Any] | None:
        """The rollout ``record`` started, if it published one."""
        if record.outcome is not Outcome.APPLIED or not record.restarted:
            return None
        return self.rollout_view()

    async def wait_rollout(self, record: ChangeRecord, timeout: float) -> RolloutResult:
        """Until the rollout of what ``record`` published ends, or ``timeout`` seconds."""
        digest = digest_of(self.store.shared(record.config)) if record.config else None

        def ended() -> bool:
            current, _ = self.agent.record()
            return (current is not None and current.digest == digest
                    and current.phase in (Phase.DONE, Phase.FAILED))

        try:
            async with asyncio.timeout(timeout):
                await self.agent.wait_for(ended)
        except TimeoutError:
            return RolloutResult("timeout", self.rollout_view())
        current, _ = self.agent.record()
        assert current is not None
        return RolloutResult(current.phase.value, self.rollout_view())

    # ---- what others see ----------------------------------------------------------------

    def rollout_view(self) -> dict[str, Any] | None:
        """The rollout record as status pages show it: progress, slots, who is live."""
        agent = self.agent
        record, _ = agent.record()
        if record is None:
            return None
        found = agent.target()
        return {**{k: v for k, v in record.to_json().items() if k not in ("config", "good")},
                "current": found is not None and record.matches(found[0]),
                **split_slots(list(agent.holders()), self.settings.max_unavailable,
                              len(agent.live())),
                "live": sorted(agent.live())}

    def in_sync(self) -> bool:
        found = self.agent.target()
        return found is None or same_config(self.store.overrides.apply(found[1]),
                                                   self.controller.last_good)

    def _publish(self) -> None:
        found = self.agent.target()
        record, _ = self.agent.record()
        current = record is not None and found is not None and record.matches(found[0])
        # A revision this host failed, while it is still the fleet's (not reverted).
        mine = record.reasons.get(self.instance_id) if record and current else None
        self._view = {
            "instance_id": self.instance_id,
            "in_sync": self.in_sync(),
            "divergence": f"fleet config not applied here: {mine}" if mine else None,
            "fleet_config": config_json(found[1]) if found else None,
            "revision": found[0].revision if found else None,
            "etcd_connected": self.etcd.is_connected,
            "max_unavailable": str(self.settings.max_unavailable),
            "canary_seconds": self.settings.canary_seconds,
            "rollout": self.rollout_view(),
        }
        self.controller.report_fleet(self._view)

    def info(self) -> dict[str, Any]:
        status = self.controller.status()
        fleet = self._view
        return {
            "host": socket.gethostname(), "supervisor": self.api_addr, "port": status.port,
            "listen": self.listen,
            "state": status.state, "pid": status.pid, "in_sync": fleet.get("in_sync", True),
            "max_unavailable": str(self.settings.max_unavailable),
            "divergence": fleet.get("divergence"),
            "config": config_json(self.store.shared(self.controller.last_good)),
        }

    async def _refresh(self) -> None:
        last = self.registration.info
        drain = DrainKeys(self.agent.keys).drain(self.instance_id)
        while True:
            await asyncio.sleep(REGISTRATION_REFRESH_S)
            self._publish()
            if drain in self.agent.kvs and not self.agent.apply_lock.locked():
                # A request whose delete failed (etcd away at that moment) while the lease
                # lived on: nothing applies here now, so this host must not stay drained.
                await end_drain(self.etcd.client, DrainKeys(self.agent.keys), self.instance_id)
            current = self.info()
            if current != last:
                self.registration.update(**current)
                last = current

