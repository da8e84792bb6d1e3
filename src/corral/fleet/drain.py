"""Drain before a change: the hand-shake between an instance and the balancers, in etcd.

``<prefix>/balancers/<name>/<id>``             live ``corral balance`` processes (lease)
``<prefix>/drains/<name>/<instance>``          "drain me": an instance about to apply a
                                               rollout revision (under its lease)
``<prefix>/drained/<name>/<instance>/<id>``    "drained": balancer ``id`` has set the
                                               instance to ``drain`` in its HAProxy and no
                                               request is in flight there (value: the
                                               request's create_revision; balancer's lease)

An instance holding its rollout slot writes its request and waits until every live balancer
acknowledged it, or ``--balancer-drain-timeout``; then it applies, and deletes its request
once the apply ended (the balancers set it ``ready`` again). With no balancer registered
nothing is written and nothing waits: a fleet without a balancer works as before.
Supervisors never talk to HAProxy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from corral.core.balance import all_acked
from corral.errors import StoreUnavailable
from corral.fleet.keys import FleetKeys
from corral.store.etcd.codec import _escape, _unescape
from corral.store.etcd.protocol import EtcdAPI
from corral.store.etcd.wire import KeyValue

__all__ = ["DrainKeys", "Facts", "drained", "end_drain", "request_drain"]

log = logging.getLogger("corral.fleet")


@dataclass(frozen=True)
class DrainKeys:
    fleet: FleetKeys

    def _base(self, kind: str) -> str:
        return f"{self.fleet.root}/{kind}/{_escape(self.fleet.name)}/"

    @property
    def balancers(self) -> str:
        return self._base("balancers")

    @property
    def drains(self) -> str:
        return self._base("drains")

    @property
    def acks(self) -> str:
        return self._base("drained")

    def balancer(self, balancer: str) -> str:
        return self.balancers + _escape(balancer)

    def drain(self, instance: str) -> str:
        return self.drains + _escape(instance)

    def ack(self, instance: str, balancer: str) -> str:
        return f"{self.acks}{_escape(instance)}/{_escape(balancer)}"

    def live_balancers(self, kvs: Mapping[str, KeyValue]) -> frozenset[str]:
        found = (self.fleet.member(k, self.balancers) for k in kvs)
        return frozenset(b for b in found if b is not None)

    def requests(self, kvs: Mapping[str, KeyValue]) -> dict[str, int]:
        """Instance -> the create_revision of its drain request."""
        return {m: kv.create_revision for k, kv in kvs.items()
                if (m := self.fleet.member(k, self.drains)) is not None}

    def acks_of(self, kvs: Mapping[str, KeyValue], instance: str) -> dict[str, str]:
        """Balancer -> the request revision it acknowledged for ``instance``."""
        base = f"{self.acks}{_escape(instance)}/"
        return {_unescape(k[len(base):]): kv.value.decode() for k, kv in kvs.items()
                if k.startswith(base) and "/" not in k[len(base):]}

    def all_acks(self, kvs: Mapping[str, KeyValue]) -> dict[tuple[str, str], str]:
        """(instance, balancer) -> acknowledged revision, for every acknowledgement."""
        found = {}
        for k, kv in kvs.items():
            if k.startswith(self.acks):
                instance, sep, balancer = k[len(self.acks):].partition("/")
                if sep and "/" not in balancer:
                    found[(_unescape(instance), _unescape(balancer))] = kv.value.decode()
        return found


class Facts(Protocol):
    """The etcd keys as a watcher keeps them (the rollout agent)."""

    @property
    def kvs(self) -> dict[str, KeyValue]: ...

    version: int

    async def changed_since(self, seen: int, timeout: float | None) -> None: ...


async def request_drain(client: EtcdAPI, keys: DrainKeys, me: str, lease: int | None,
                        facts: Facts, timeout: float) -> str:
    """Ask the balancers to drain this instance and wait until all of them did (or
    ``timeout``). Returns what happened: ``no balancer``, ``drained`` or ``timed out``."""
    if not keys.live_balancers(facts.kvs) or timeout <= 0 or lease is None:
        return "no balancer"
    started = time.monotonic()
    await client.delete(keys.drain(me))  # a stale request's acks name an older revision
    request = await client.put(keys.drain(me), str(started), lease=lease)
    log.info("asking the balancers to drain this instance before it applies")
    while True:
        seen = facts.version
        if all_acked(keys.live_balancers(facts.kvs), keys.acks_of(facts.kvs, me), request):
            log.info("drained by the balancers in %.2f s", time.monotonic() - started)
            return "drained"
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            log.warning("the balancers did not drain this instance within %.1f s "
                        "(--balancer-drain-timeout): applying anyway", timeout)
            return "timed out"
        await facts.changed_since(seen, left)


async def end_drain(client: EtcdAPI, keys: DrainKeys, me: str) -> None:
    """The apply ended: the balancers may send traffic here again."""
    with contextlib.suppress(StoreUnavailable):
        await client.delete(keys.drain(me))


@contextlib.asynccontextmanager
async def drained(client: EtcdAPI, keys: DrainKeys, me: str, lease: int | None, facts: Facts,
                  timeout: float) -> AsyncIterator[str]:
    """Drained by the balancers (if any) while the block runs; undrained after it."""
    outcome = await request_drain(client, keys, me, lease, facts, timeout)
    try:
        yield outcome
    finally:
        if outcome != "no balancer":
            await end_drain(client, keys, me)
