"""The shipped :class:`corral.fleet.balance.Balancer` in process: the in-memory etcd of the
fleet simulation on virtual time, and a fake HAProxy Runtime API that keeps a backend and
applies the commands as HAProxy 2.6 does (added servers start in maintenance; only servers
in maintenance can be deleted)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

from corral.core.balance import Server
from corral.fleet.balance import Balancer, BalanceSettings
from corral.fleet.drain import DrainKeys, request_drain
from corral.fleet.haproxy import HAProxyError, HAProxyUnreachable
from corral.fleet.keys import FleetKeys
from corral.store.etcd import EtcdStore, KeyValue
from tests.memory_etcd import MemoryClient, MemoryEtcd, run_virtual
from tests.waiting import until

BK = "bk"
STATE = {"ready": 0, "drain": 8, "maint": 1}


class FakeHAProxy:
    """A backend as the Runtime API changes it; ``down`` makes the socket unreachable."""

    def __init__(self) -> None:
        self.socket_path = "fake.sock"
        self.servers_by_name: dict[str, Server] = {}
        self.sessions: dict[str, int] = {}
        self.down = False
        self.journal: list[str] = []

    async def run(self, command: str) -> None:
        if self.down:
            raise HAProxyUnreachable("HAProxy's admin socket fake.sock: refused")
        self.journal.append(command)
        words = command.split()
        name = words[2].split("/", 1)[1]
        s = self.servers_by_name.get(name)
        if words[0] == "add":
            if s is not None:
                raise HAProxyError(f"{command!r}: Already exists a server with the same name")
            addr, port = words[3].rsplit(":", 1)
            self.servers_by_name[name] = Server(name, addr, int(port), STATE["maint"])
        elif s is None:
            raise HAProxyError(f"{command!r}: No such server.")
        elif words[:2] == ["set", "server"] and words[3] == "state":
            self.servers_by_name[name] = Server(name, s.address, s.port, STATE[words[4]])
        elif words[0] == "del":
            if s.admin != STATE["maint"]:
                raise HAProxyError("Only servers in maintenance mode can be deleted.")
            del self.servers_by_name[name]

    async def servers(self, backend: str) -> list[Server]:
        if self.down:
            raise HAProxyUnreachable("HAProxy's admin socket fake.sock: refused")
        return [Server(s.name, s.address, s.port, s.admin, self.sessions.get(s.name, 0))
                for s in self.servers_by_name.values()]

    def mode(self, instance: str) -> str | None:
        s = self.servers_by_name.get(f"corral-{instance}")
        return s.mode.value if s else None


class Facts:
    """An instance's view of etcd for the hand-shake: re-read at every wait."""

    def __init__(self, client: MemoryClient) -> None:
        self.client, self.kvs, self.version = client, dict[str, KeyValue](), 0

    async def changed_since(self, seen: int, timeout: float | None) -> None:
        await asyncio.sleep(min(timeout or 0.05, 0.05))
        found = await self.client.range("/corral/", prefix=True)
        self.kvs, self.version = {kv.key: kv for kv in found.kvs}, self.version + 1


async def rig(main: Callable[[MemoryEtcd, FakeHAProxy, Balancer], Awaitable[None]]) -> None:
    etcd = MemoryEtcd()
    h = FakeHAProxy()
    balancer = Balancer(EtcdStore(MemoryClient(etcd, "balancer", random.Random(1))), "fleet",
                        h, BalanceSettings(BK, check=""), me="b1")
    task = asyncio.create_task(balancer.run())
    try:
        await main(etcd, h, balancer)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def register(etcd: MemoryEtcd, instance: str, **info: Any) -> int:
    client = MemoryClient(etcd, instance, random.Random(2))
    lease = await client.lease_grant(30)
    value = {"supervisor": "10.0.0.1:8084", "listen": f"10.0.0.1:{8000 + len(instance)}",
             "state": "RUNNING", **info}
    await client.put(f"/corral/instances/fleet/{instance}", json.dumps(value), lease=lease)
    return lease


def test_an_instance_is_drained_only_once_nothing_is_in_flight() -> None:
    """The drain request is acknowledged only after HAProxy shows no session on the
    server, and the instance is ready again once its request is gone."""

    async def main(etcd: MemoryEtcd, h: FakeHAProxy, b: Balancer) -> None:
        lease = await register(etcd, "a")
        await register(etcd, "bb")
        await until(lambda: h.mode("a") == h.mode("bb") == "ready", 10, "both ready")
        h.sessions["corral-a"] = 2
        client = MemoryClient(etcd, "a-drain", random.Random(3))
        facts = Facts(client)
        await facts.changed_since(0, 0)
        keys = DrainKeys(FleetKeys("/corral", "fleet"))
        waiting = asyncio.create_task(request_drain(client, keys, "a", lease, facts, 60))
        await until(lambda: h.mode("a") == "drain", 10, "set to drain")
        await asyncio.sleep(5)
        assert not waiting.done(), "acknowledged with requests in flight"
        h.sessions["corral-a"] = 0
        assert await asyncio.wait_for(waiting, 5) == "drained"
        await client.delete(keys.drain("a"))
        await until(lambda: h.mode("a") == "ready", 10, "ready again")
        await until(lambda: not b.drains.all_acks(b.kvs), 10, "the acknowledgement taken back")

    run_virtual(rig(main))


def test_nothing_is_removed_while_etcd_is_out_of_reach_and_haproxy_is_rebuilt() -> None:
    """Cut off from etcd the balancer deletes nothing (an etcd outage must not empty the
    backend) and catches up once it reads again; an HAProxy that lost its servers gets them
    back."""

    async def main(etcd: MemoryEtcd, h: FakeHAProxy, b: Balancer) -> None:
        await register(etcd, "a")
        lease = await register(etcd, "bb")
        await until(lambda: h.mode("a") == h.mode("bb") == "ready", 10, "both ready")
        client = b.client
        assert isinstance(client, MemoryClient)
        client.partition()
        etcd.revoke(lease)
        await asyncio.sleep(10)
        assert h.mode("bb") == "ready", "removed on facts it could not read"
        client.heal()
        await until(lambda: h.mode("bb") is None, 20, "bb deleted once etcd answers")
        h.down = True
        await asyncio.sleep(3)
        h.down, h.servers_by_name = False, {}  # restarted: the runtime changes are gone
        await until(lambda: h.mode("a") == "ready", 10, "rebuilt")
        assert h.journal.count("add server bk/corral-a 10.0.0.1:8001") == 2

    run_virtual(rig(main))


def test_an_ha_pair_both_drain_before_the_instance_applies() -> None:
    """With two balancers (one per HAProxy of an HA pair), the drain completes only when
    both HAProxies carry nothing to the instance."""

    async def main(etcd: MemoryEtcd, h: FakeHAProxy, b: Balancer) -> None:
        h2 = FakeHAProxy()
        other = Balancer(EtcdStore(MemoryClient(etcd, "balancer2", random.Random(4))),
                         "fleet", h2, BalanceSettings(BK, check=""), me="b2")
        task = asyncio.create_task(other.run())
        try:
            lease = await register(etcd, "a")
            await register(etcd, "bb")
            await until(lambda: h2.mode("a") == h.mode("a") == "ready", 10, "both added")
            h2.sessions["corral-a"] = 1
            client = MemoryClient(etcd, "a-drain", random.Random(3))
            facts = Facts(client)
            await facts.changed_since(0, 0)
            keys = DrainKeys(FleetKeys("/corral", "fleet"))
            waiting = asyncio.create_task(request_drain(client, keys, "a", lease, facts, 60))
            await until(lambda: h.mode("a") == h2.mode("a") == "drain", 10, "both draining")
            await asyncio.sleep(5)
            assert not waiting.done(), "acknowledged while the second HAProxy has a request"
            h2.sessions["corral-a"] = 0
            assert await asyncio.wait_for(waiting, 5) == "drained"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run_virtual(rig(main))
