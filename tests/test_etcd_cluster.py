"""A real 3-member etcd cluster: the client fails over when the member it uses dies, and rides
out a leader change, without losing or repeating a write (issue 12).

Members run on loopback ports with fast raft timings (10 ms heartbeat, 100 ms election), so
a new leader is elected within a few hundred milliseconds. A write a follower forwarded to
the leader that died is dropped by etcd and only ends with the client's timeout; the client
then sends it to the next endpoint. That retry is what "applied exactly once" checks: it is
safe here because etcd dropped the first attempt, and the key's version would show a
duplicate if it had not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from corral.core.args import LlamaConfig
from corral.store.base import StoredConfig
from corral.store.etcd import EtcdStore
from tests.fixtures_etcd import EtcdCluster, EtcdServer
from tests.waiting import until

pytestmark = pytest.mark.etcd

WRITES = 8  # configs written before the kill, then as many after


def config(n: int) -> StoredConfig:
    return StoredConfig(LlamaConfig("/usr/bin/llama-server", (("--parallel", str(n)),)),
                        f"2026-01-01T00:00:{n:02d}+00:00", "test")


def parallel(stored: StoredConfig) -> int:
    return int(dict(stored.config.args)["--parallel"])


@contextlib.asynccontextmanager
async def watching(store: EtcdStore, name: str) -> AsyncIterator[list[int]]:
    """``store.watch(name)`` in a task, appending each config's ``--parallel`` to a list."""
    seen: list[int] = []

    async def collect() -> None:
        async for stored in store.watch(name):
            seen.append(parallel(stored))

    task = asyncio.create_task(collect())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def key_version(cluster: EtcdCluster, key: str) -> int:
    """How many times ``key`` was written since it was created (etcd's ``version``)."""
    out = json.loads(cluster.etcdctl("get", key, "--write-out=json"))
    return int(out["kvs"][0]["version"])


def in_use(cluster: EtcdCluster, store: EtcdStore) -> EtcdServer:
    url = store.client.endpoints.split(",")[store.client.transport.current]
    return next(m for m in cluster.members if m.url == url)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["member in use", "leader", "leader in use"])
async def test_writes_and_watch_survive_a_killed_member(etcd_cluster: EtcdCluster,
                                                        victim: str) -> None:
    """With all three endpoints, SIGKILL of the member the client uses (a follower), of the
    leader while the client uses a follower, or of the leader the client uses: every later
    write succeeds, the watch delivers writes made after the kill, and each write is applied
    exactly once (the key's version counts them; the watch never sees one twice)."""
    leader = etcd_cluster.leader()
    followers = [m for m in etcd_cluster.members if m is not leader]
    first = leader if victim == "leader in use" else followers[0]
    order = [first, *(m for m in etcd_cluster.members if m is not first)]
    # A write sent to a follower just as the leader dies hangs until the client's timeout
    # (etcd drops the proposal), then goes to the next endpoint: keep the timeout short.
    store = EtcdStore.connect(",".join(m.addr for m in order), timeout=1.0)
    try:
        async with watching(store, "c") as seen:
            for n in range(1, WRITES + 1):
                await store.save("c", config(n))
            await until(lambda: WRITES in seen, 15.0, f"write {WRITES} seen")
            assert in_use(etcd_cluster, store) is first

            killed = leader if victim.startswith("leader") else first
            etcd_cluster.kill(killed)
            for n in range(WRITES + 1, 2 * WRITES + 1):
                await store.save("c", config(n))
            await until(lambda: 2 * WRITES in seen, 15.0, f"write {2 * WRITES} seen")

            assert await store.load("c") == config(2 * WRITES)
            assert key_version(etcd_cluster, "/corral/configs/c") == 2 * WRITES
            # Level-triggered: a reconnecting watch may skip values, never repeat one.
            assert seen == sorted(set(seen)), seen
            assert store.is_connected
            new_leader = etcd_cluster.leader()
            assert new_leader is not killed and new_leader.proc is not None
    finally:
        await store.close()


async def test_cluster_fixture_reports_members_and_leader(etcd_cluster: EtcdCluster) -> None:
    """The fixture: three members, their endpoints, one leader that can be asked again after
    it was killed."""
    assert len(etcd_cluster.members) == 3
    assert etcd_cluster.endpoints == ",".join(m.addr for m in etcd_cluster.members)
    leader = etcd_cluster.leader()
    out = json.loads(etcd_cluster.etcdctl("member", "list", "--write-out=json"))
    assert len(out["members"]) == 3
    etcd_cluster.kill(leader)
    async with asyncio.timeout(10):
        while True:
            try:
                if etcd_cluster.leader() is not leader:
                    break
            except RuntimeError:
                pass  # election in progress
            await asyncio.sleep(0.02)
