"""``corral balance``: keeps an HAProxy backend equal to a fleet's live instances.

Theory of operation
-------------------
:class:`Balancer` keeps a copy of the fleet's keys in etcd (one range read, then one prefix
watch; read again after any break, so a change made while etcd was away is never missed)
and registers itself under a lease (``<prefix>/balancers/<name>/<id>``, so that instances
know whose acknowledgement to wait for before they apply; see :mod:`corral.fleet.drain`).

One task converges: it reads the backend from HAProxy's admin socket, asks
:func:`corral.core.balance.plan` what to change, runs those commands, and acknowledges the
drain requests whose server carries nothing any more. It runs again at every change in
etcd, every ``resync`` seconds (so a restarted HAProxy gets its servers back), and every
``busy`` seconds while something is draining. While etcd cannot be read it changes
nothing: an outage of etcd must not empty the backend.

Several balancers may run at once, one beside each HAProxy (or even two on one): every
command is idempotent or fails harmlessly, and the next round starts from fresh facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.core.balance import (
    DEFAULT_PREFIX,
    Member,
    Plan,
    endpoint_of,
    member_mode,
    plan,
    server_states,
)
from corral.defaults import instance_id
from corral.errors import StoreUnavailable
from corral.fleet.drain import DrainKeys
from corral.fleet.haproxy import HAProxyError, HAProxyUnreachable, Runtime
from corral.fleet.keys import FleetKeys
from corral.fleet.mirror import Mirrored, PrefixMirror
from corral.store.etcd import EtcdStore
from corral.store.etcd.registration import Registration

__all__ = ["BalanceSettings", "Balancer"]

log = logging.getLogger("corral.balance")


@dataclass(frozen=True)
class BalanceSettings:
    backend: str
    prefix: str = DEFAULT_PREFIX
    check: str = "check inter 1s fastinter 250ms downinter 500ms rise 1 fall 2"
    grace: float = 30.0  # a gone server's sessions may last this long before it is cut
    resync: float = 1.0  # read HAProxy again this often even when etcd is quiet
    busy: float = 0.05  # ... and this often while a server drains
    ttl: int = 5  # the balancer's own registration


class Balancer(Mirrored):
    def __init__(self, etcd: EtcdStore, name: str, haproxy: Runtime,
                 settings: BalanceSettings, me: str | None = None) -> None:
        self.client = etcd.client
        self.keys = FleetKeys.of(etcd, name)
        self.drains = DrainKeys(self.keys)
        self.haproxy = haproxy
        self.settings = settings
        self.me = me or instance_id()
        self.version = 0
        self._changed = asyncio.Event()
        self._retiring: Mapping[str, float] = {}
        self._addresses: dict[str, str] = {}  # host name -> address (resolved once)
        self._haproxy_ok: bool | None = None
        self.registration = Registration(
            self.client, self.drains.balancer(self.me),
            {"host": socket.gethostname(), "backend": settings.backend,
             "haproxy": haproxy.socket_path}, ttl=settings.ttl)
        self._mirror = PrefixMirror(self.client, self.keys.watched, self._touch,
                                    keep=self._ours, probe=self.registration.probe,
                                    probe_interval=self.registration.ttl / 3,
                                    what="etcd watch")
        self.rounds = 0  # converging rounds done (tests wait on it)

    async def run(self) -> None:
        log.info("balancing fleet %r into HAProxy backend %r (%s) as %s", self.keys.name,
                 self.settings.backend, self.haproxy.socket_path, self.me)
        async with self.registration, asyncio.TaskGroup() as tg:
            tg.create_task(self.follow(), name="balance watch")
            tg.create_task(self.converge(), name="balance converge")

    # ---- the facts ----------------------------------------------------------------------

    def _ours(self, key: str) -> bool:
        d = self.drains
        return key.startswith((self.keys.instances, d.drains, d.acks, d.balancers))

    def _touch(self) -> None:
        self.version += 1
        self._changed.set()

    def registrations(self) -> dict[str, dict[str, Any]]:
        found = {}
        for key, kv in self.kvs.items():
            instance = self.keys.member(key, self.keys.instances)
            if instance is None:
                continue
            try:
                info = json.loads(kv.value)
            except ValueError:
                continue
            if isinstance(info, dict):
                found[instance] = info
        return found

    async def members(self) -> dict[str, Member]:
        requests = self.drains.requests(self.kvs)
        found = {}
        for instance, info in self.registrations().items():
            endpoint = endpoint_of(info)
            if endpoint is None:
                log.warning("instance %s registered no address clients can reach", instance)
                continue
            address = await self._resolve(endpoint[0])
            if address is not None:
                found[instance] = Member(instance, address, endpoint[1],
                                         member_mode(info, instance in requests))
        return found

    async def _resolve(self, host: str) -> str | None:
        """HAProxy's dynamic servers take addresses, not names."""
        if host in self._addresses:
            return self._addresses[host]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                                 type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", host, exc)
            return None
        address = str(infos[0][4][0])
        self._addresses[host] = address
        return address

    # ---- converging ---------------------------------------------------------------------

    async def converge(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            wait = self.settings.resync
            if self.synced:
                try:
                    done = await self.round(loop.time())
                    if self._haproxy_ok is False:
                        log.info("HAProxy answers again: backend %r synced",
                                 self.settings.backend)
                    self._haproxy_ok = True
                    if not done:
                        wait = self.settings.busy
                except HAProxyError as exc:
                    if self._haproxy_ok is not False:
                        log.warning("%s; trying again every %.1f s", exc, wait)
                    self._haproxy_ok = False
                except StoreUnavailable as exc:
                    log.info("acknowledging drains failed: %s", exc)
            self.rounds += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()

    async def round(self, now: float) -> bool:
        """One round; True when nothing is left in progress (no drain, no retiring)."""
        s = self.settings
        servers = await self.haproxy.servers(s.backend)
        members = await self.members()
        p: Plan = plan(members, servers, backend=s.backend, prefix=s.prefix,
                       retiring=self._retiring, now=now, grace=s.grace, check=s.check)
        self._retiring = p.retiring
        states = server_states(members, servers, s.prefix)
        if states != self.registration.info.get("servers"):
            self.registration.update(servers=states)  # what corral fleet shows
        failed = False
        for command in p.commands:
            try:
                await self.haproxy.run(command)
                log.info("haproxy: %s", command)
            except HAProxyUnreachable:
                raise
            except HAProxyError as exc:
                log.info("haproxy refused (planned again next round): %s", exc)
                failed = True
        await self.acknowledge(p.drained)
        waiting = set(self.drains.requests(self.kvs)) - p.drained
        return not (failed or p.retiring or p.commands or (waiting & set(members)))

    async def acknowledge(self, drained: frozenset[str]) -> None:
        """Say "drained" for each request whose server carries nothing; take back the
        acknowledgements of requests that are gone."""
        lease = self.registration.lease
        if lease is None:
            return
        requests = self.drains.requests(self.kvs)
        acks = self.drains.all_acks(self.kvs)
        for instance in sorted(drained & set(requests)):
            revision = str(requests[instance])
            if acks.get((instance, self.me)) != revision:
                await self.client.put(self.drains.ack(instance, self.me), revision, lease=lease)
                log.info("instance %s drained here", instance)
        for instance, balancer in acks:
            if balancer == self.me and instance not in requests:
                await self.client.delete(self.drains.ack(instance, balancer))
