"""Takes part in the fleet's rollouts: watches etcd, asks the core what to do, does it.

Theory of operation
-------------------
:class:`RolloutAgent` keeps a copy of every key under the fleet prefix, filled by one range
read and then one prefix watch (re-read after any break, so nothing written while this
host was cut off is missed). Whenever the facts change it builds a
:class:`~corral.core.rollout.View` and carries out the one step
:func:`~corral.core.rollout.next_step` names: a compare-and-swap on the rollout record, a
slot key put or deleted, an apply through the controller, or a wait. A write is followed by
waiting for its own echo on the watch, so the next decision sees it; a lost race (the CAS
failed) is just decided again on the newer facts.

Two guards keep a host that lost etcd from acting on stale facts: an apply starts only
after a fresh read shows this host still holds its slot (which also proves its lease is
alive), and every write of the record or the config key is a transaction that compares the
mod_revision of both with what the decision was made on: a decision taken on a config that
has been overwritten since, or on a record someone else changed, writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from corral.core.args import Change, LlamaConfig
from corral.core.decide import State
from corral.core.rollout import (
    Do,
    MaxUnavailable,
    Phase,
    Rollout,
    Step,
    Target,
    View,
    next_step,
    record_failure,
)
from corral.errors import StoreCorrupt, StoreUnavailable
from corral.fleet.drain import DrainKeys, drained
from corral.fleet.keys import FleetKeys, digest_of, same_config
from corral.fleet.mirror import Mirrored, PrefixMirror
from corral.fleet.records import dump_record, parse_record, step_words
from corral.store.base import StoredConfig
from corral.store.etcd import EtcdStore, KeyValue
from corral.store.etcd.codec import decode_config, encode_config
from corral.store.etcd.protocol import EtcdAPI
from corral.store.etcd.wire import Compare, Op
from corral.store.local import LocalStore
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.view import Supervisor

__all__ = ["RolloutAgent", "RolloutSettings"]

log = logging.getLogger("corral.fleet")

_RETRY_S = 0.5  # after etcd failed a step: decide again on fresh facts


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    max_unavailable: MaxUnavailable = MaxUnavailable()
    canary_seconds: float = 10.0
    balancer_drain_timeout: float = 30.0  # see corral.fleet.drain


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RolloutAgent(Mirrored):
    def __init__(self, controller: Supervisor, store: LocalStore, etcd: EtcdStore,
                 keys: FleetKeys, me: str, settings: RolloutSettings,
                 lease: Callable[[], int | None],
                 probe: Callable[[str], Awaitable[None]] | None = None,
                 probe_interval: float | None = None) -> None:
        self.controller = controller
        self.store = store
        self.client: EtcdAPI = etcd.client
        self.keys = keys
        self.me = me
        self.settings = settings
        self._lease = lease  # this instance's registration lease, once it has one
        self._mirror = PrefixMirror(self.client, keys.watched, self._touch, probe=probe,
                                    probe_interval=probe_interval, what="fleet watch")
        self._parsed: dict[str, tuple[int, Any]] = {}  # key -> (mod_revision, parsed value)
        self.apply_lock = asyncio.Lock()  # one apply at a time: ours or an API change's
        self.version = 0  # bumped at every change of the facts
        self._waiters: set[asyncio.Future[None]] = set()
        self.on_change: Callable[[], None] = lambda: None

    # ---- the facts ----------------------------------------------------------------------

    def _touch(self) -> None:
        self.version += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.on_change()

    async def changed_since(self, seen: int, timeout: float | None) -> None:
        """Return once the facts changed after version ``seen``, or after ``timeout``."""
        if self.version != seen or timeout == 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def record(self) -> tuple[Rollout | None, int]:
        """The rollout record and its mod_revision (0: none)."""
        kv = self.kvs.get(self.keys.rollout)
        if kv is None:
            return None, 0
        cached = self._parsed.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1], kv.mod_revision
        record = parse_record(kv.value)
        if record is None:
            log.warning("ignoring %s: not a rollout record", kv.key)
        self._parsed[kv.key] = (kv.mod_revision, record)
        return record, kv.mod_revision

    def target(self) -> tuple[Target, LlamaConfig] | None:
        kv = self.kvs.get(self.keys.config)
        if kv is None:
            return None
        cached = self._parsed.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            hit: tuple[Target, LlamaConfig] | None = cached[1]
            return hit
        try:
            stored = decode_config(kv.value, kv.key)
        except StoreCorrupt as exc:
            log.warning("ignoring the fleet config: %s", exc)
            found = None
        else:
            found = (Target(kv.mod_revision, digest_of(stored.config), kv.value.decode()),
                     stored.config)
        self._parsed[kv.key] = (kv.mod_revision, found)
        return found

    def live(self) -> frozenset[str]:
        members = (self.keys.member(k, self.keys.instances) for k in self.kvs)
        return frozenset(m for m in members if m is not None)

    def holders(self, kvs: dict[str, KeyValue] | None = None) -> tuple[str, ...]:
        kvs = self.kvs if kvs is None else kvs
        slots = sorted((kv.create_revision, self.keys.member(k, self.keys.slots))
                       for k, kv in kvs.items() if self.keys.member(k, self.keys.slots))
        return tuple(m for _, m in slots if m is not None)

    def view(self) -> tuple[View, str | None]:
        c = self.controller
        found = self.target()
        in_sync = found is not None and same_config(self.store.overrides.apply(found[1]),
                                                    c.last_good)
        running = c.state is State.RUNNING and c.ready_since is not None
        mine = None
        if running:
            mine = encode_config(StoredConfig.now(self.store.shared(c.last_good))).decode()
        record, _ = self.record()
        runs_record = running and record is not None and self._runs(record)
        view = View(
            me=self.me, target=found[0] if found else None, record=record,
            holders=self.holders(), live=self.live(), in_sync=in_sync,
            runs_record=runs_record,
            max_unavailable=self.settings.max_unavailable,
            canary_seconds=self.settings.canary_seconds,
            running_for=(c.clock.monotonic() - c.ready_since)
            if running and c.ready_since is not None else None)
        return view, mine

    def _runs(self, record: Rollout) -> bool:
        """Whether this instance runs ``record``'s config (parsed once per record)."""
        key = f"{self.keys.rollout}#config"
        cached = self._parsed.get(key)
        if cached is None or cached[1][0] != record.config:
            try:
                config: LlamaConfig | None = decode_config(record.config.encode(), key).config
            except StoreCorrupt:
                config = None
            cached = (0, (record.config, config))
            self._parsed[key] = cached
        parsed = cached[1][1]
        return parsed is not None and same_config(self.store.overrides.apply(parsed),
                                                  self.controller.last_good)

    def guards(self, view: View) -> list[Compare]:
        """What a write decided on ``view`` compares: the config key and the record as seen."""
        _, record_mod = self.record()
        config = view.target.revision if view.target is not None else 0
        return [Compare.unchanged(self.keys.config, config),
                Compare.unchanged(self.keys.rollout, record_mod)]

    # ---- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.follow(), name="fleet watch")
            tg.create_task(self.reconcile(), name="fleet rollout")

    async def reconcile(self) -> None:
        while True:
            wait_for: float | None = None
            seen = self.version
            if self.synced and not self.apply_lock.locked():
                view, mine = self.view()
                step = next_step(view, mine, now_iso())
                if step.do is not Do.NOTHING:
                    log.debug("rollout step: %s", step.do.value)
                try:
                    wait_for = await self._carry_out(step, view)
                except StoreUnavailable as exc:
                    log.warning("fleet rollout step %s failed: %s", step.do.value, exc)
                    wait_for = _RETRY_S
            await self.changed_since(seen, wait_for)

    async def _carry_out(self, step: Step, view: View) -> float | None:
        """Do ``step``; returns how long to wait for a change before deciding again
        (None: until something changes, 0: decide at once)."""
        k = self.keys
        match step.do:
            case Do.NOTHING:
                return None
            case Do.WAIT:
                return step.after
            case Do.SEED:
                _, mine = self.view()
                assert mine is not None
                config = self.store.shared(self.controller.last_good)
                seed = Rollout(0, digest_of(config), mine, Phase.DONE,
                               progress={self.me: "done"}, started_at=now_iso(),
                               ended_at=now_iso())
                done = await self.client.txn(self.guards(view), [
                    Op.put(k.config, mine), Op.put(k.rollout, dump_record(seed))])
                if done.succeeded:
                    log.info("nothing was stored for fleet %r: stored what runs here", k.name)
            case Do.ENQUEUE:
                lease = self._lease()
                if lease is None:
                    return _RETRY_S  # not registered yet
                await self.client.txn([Compare.absent(k.slot(self.me))],
                                      [Op.put(k.slot(self.me), self.me, lease)])
            case Do.RELEASE:
                await self.client.delete(k.slot(self.me))
            case Do.APPLY:
                return await self._apply(view)
            case Do.REVERT:
                record, _ = self.record()
                assert record is not None and record.good is not None and view.target
                done = await self.client.txn(self.guards(view), [Op.put(k.config, record.good)])
                if done.succeeded:
                    log.error("fleet %r: rollout of revision %d failed (%s); the config is "
                              "back to revision %s", k.name, record.revision, record.reason,
                              record.good_revision or "before it")
                    self.controller.events.emit(
                        "rollout", step="revert", revision=record.revision, phase="failed",
                        reason=record.reason, by=self.me)
            case Do.MARK_DONE if view.queued and step.record is not None and \
                    step.record.phase in (Phase.ROLLING, Phase.DONE):
                # Done, and the slot given back in the same transaction: one round trip
                # less before the next instance may start.
                await self.client.txn(self.guards(view), [
                    Op.put(k.rollout, dump_record(step.record)), Op.delete(k.slot(self.me))])
            case _:  # a compare-and-swap of the record
                assert step.record is not None
                done = await self.client.txn(self.guards(view),
                                             [Op.put(k.rollout, dump_record(step.record))])
                ok = done.succeeded
                if ok and step.do in (Do.PROMOTE, Do.FINISH, Do.START, Do.CLAIM_CANARY,
                                      Do.CLEAR_CANARY):
                    log.info("fleet %r: %s", k.name, step_words(step, self.me))
                if ok:
                    r = step.record
                    self.controller.events.emit(
                        "rollout", step=step.do.value, revision=r.revision, phase=r.phase.value,
                        canary=r.canary, by=self.me)
        return None

    async def holds_slot(self) -> bool:
        """A fresh read: does this instance hold a slot right now (its lease alive)?"""
        found = await self.client.txn([], [Op.get(self.keys.slots, prefix=True),
                                           Op.get(self.keys.instances, prefix=True)])
        kvs = {kv.key: kv for r in found.ranges for kv in r.kvs}
        live = sum(1 for key in kvs if self.keys.member(key, self.keys.instances))
        limit = self.settings.max_unavailable.slots(live)
        return self.me in self.holders(kvs)[:limit]

    async def acquire(self, unreachable_s: float = 5.0) -> None:
        """Queue for a slot and wait until this instance holds one (for an API change);
        StoreUnavailable once etcd has been out of reach for ``unreachable_s`` (a slot wait
        may be long while others apply, but not one that cannot end)."""
        loop = asyncio.get_running_loop()
        cut_off_since: float | None = None
        while True:
            seen = self.version
            if self.synced:
                cut_off_since = None
            elif cut_off_since is None:
                cut_off_since = loop.time()
            elif loop.time() - cut_off_since > unreachable_s:
                raise StoreUnavailable("etcd is out of reach: no rollout slot can be taken")
            if self.synced and self.me not in self.holders():
                lease = self._lease()
                if lease is not None:
                    await self.client.txn([Compare.absent(self.keys.slot(self.me))],
                                          [Op.put(self.keys.slot(self.me), self.me, lease)])
            if self.synced and await self.holds_slot():
                return
            await self.changed_since(seen, _RETRY_S)

    async def release(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.client.delete(self.keys.slot(self.me))

    async def _apply(self, view: View) -> float | None:
        found = self.target()
        assert found is not None and view.target is not None
        target, config = found
        async with self.apply_lock, drained(self.client, DrainKeys(self.keys), self.me,
                                            self._lease(), self,
                                            self.settings.balancer_drain_timeout):
            if not await self.holds_slot():
                return _RETRY_S  # stale facts (a long drain?): decide again on fresh ones
            wanted = self.store.overrides.apply(config)
            log.info("fleet %r: applying revision %d here", self.keys.name, target.revision)
            record = self.controller.submit(Change.whole(wanted), source="fleet")
            await asyncio.shield(record.done)
        await self._after_apply(record, target)
        return 0

    async def _after_apply(self, change: ChangeRecord, target: Target) -> None:
        if change.outcome is Outcome.APPLIED:
            return  # the next decision marks it done
        if change.outcome is Outcome.UNAVAILABLE:
            return  # shutting down, or etcd away: nothing to report
        reason = change.error or change.outcome.value
        log.error("fleet %r: revision %d failed here: %s", self.keys.name, target.revision,
                  reason)
        k = self.keys
        for _ in range(10):  # CAS against other progress writes; each retry reads afresh
            found = await self.client.txn([], [Op.get(k.config), Op.get(k.rollout)])
            config_kv, record_kv = (r.kvs[0] if r.kvs else None for r in found.ranges)
            if config_kv is None or config_kv.mod_revision != target.revision:
                break  # overwritten since: whoever starts its rollout sees this host as is
            if record_kv is None:
                break
            record = parse_record(record_kv.value)
            if record is None or not record.matches(target):
                break
            done = await self.client.txn(
                [Compare.unchanged(k.config, target.revision),
                 Compare.unchanged(k.rollout, record_kv.mod_revision)],
                [Op.put(k.rollout,
                        dump_record(record_failure(record, self.me, reason, now_iso())))])
            if done.succeeded:
                break
        await self.release()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate`` holds (re-checked at every change of the facts)."""
        while not predicate():
            await self.changed_since(self.version, None)
