"""The etcd driver against a real etcd: contract, hand-written values, watch, outages, leases.

Every wait has a deadline; the only sleeps are the scenario itself (letting a lease expire
while etcd is frozen).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from corral.core.args import LlamaConfig
from corral.errors import StoreCorrupt, StoreUnavailable
from corral.store.base import ConfigStore, StoredConfig, WatchableStore
from corral.store.etcd import EtcdStore, decode_config
from tests.etcd_helpers import next_of, opened, watching
from tests.fixtures_etcd import EtcdServer
from tests.harness import free_port
from tests.store_contract import StoreContract
from tests.waiting import until

pytestmark = pytest.mark.etcd

A = StoredConfig(
    LlamaConfig("/usr/bin/llama-server", (("--model", "/m.gguf"), ("--port", "8081"))),
    "2026-11-28T22:00:00+00:00",
    "host-a:1",
)
B = StoredConfig(
    LlamaConfig("/usr/bin/llama-server", (("--model", "/m.gguf"), ("--cont-batching", True))),
    "2026-11-28T22:01:00+00:00",
    "host-b:2",
)
C = StoredConfig(LlamaConfig("/opt/llama-server", (("--port", "9000"),)), "t3", "host-c:3")


class TestEtcdContract(StoreContract):
    @pytest.fixture
    async def store(self, etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
        store = EtcdStore.connect(etcd_server.addr)
        yield store
        await store.close()

    @pytest.fixture
    def reopen(self, etcd_server: EtcdServer) -> Callable[[], ConfigStore]:
        return lambda: EtcdStore.connect(etcd_server.addr)


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = EtcdStore.connect(etcd_server.addr)
    yield store
    await store.close()


def config_key(name: str) -> str:
    return f"/corral/configs/{name}"


# -- storage format -----------------------------------------------------------------------


async def test_etcd_store_is_watchable() -> None:
    """The etcd store is a WatchableStore and names every endpoint in its description."""
    async with opened("127.0.0.1:1,127.0.0.1:2") as store:
        assert isinstance(store, WatchableStore)
        assert "127.0.0.1:1" in store.description and "127.0.0.1:2" in store.description


async def test_value_is_readable_json_in_etcdctl(store: EtcdStore, etcd_server: EtcdServer) -> None:
    """A saved config is plain JSON in etcd, one flag per line, readable with etcdctl."""
    await store.save("m", B)
    text = etcd_server.etcdctl("get", config_key("m"), "--print-value-only")
    assert '["--model", "/m.gguf"]' in text  # one flag per line
    assert json.loads(text) == {
        "binary": "/usr/bin/llama-server",
        "args": [["--model", "/m.gguf"], ["--cont-batching", True]],
        "applied_at": B.applied_at,
        "applied_by": B.applied_by,
    }


async def test_hand_written_value_is_read(store: EtcdStore, etcd_server: EtcdServer) -> None:
    """A value written by hand (args as an object, numbers, booleans) loads as flags."""
    value = {
        "binary": "/usr/bin/llama-server",
        "args": {"--model": "/m.gguf", "port": 8081, "--cont-batching": True, "--mlock": False},
    }
    etcd_server.etcdctl("put", config_key("hand"), json.dumps(value))
    loaded = await store.load("hand")
    assert loaded == StoredConfig(
        LlamaConfig(
            "/usr/bin/llama-server",
            (("--model", "/m.gguf"), ("--port", "8081"), ("--cont-batching", True)),
        )
    )


@pytest.mark.parametrize(
    "garbage",
    [
        "not json",
        "[1, 2]",
        '{"args": []}',
        '{"binary": 3}',
        '{"binary": "x", "args": [["--a"]]}',
        '{"binary": "x", "args": {"--a": [1]}}',
        '{"binary": "x", "args": "--a"}',
    ],
)
async def test_garbage_value_is_corrupt(
    store: EtcdStore, etcd_server: EtcdServer, garbage: str
) -> None:
    """A value that is not a config is StoreCorrupt, naming its key."""
    etcd_server.etcdctl("put", config_key("bad"), garbage)
    with pytest.raises(StoreCorrupt, match="/corral/configs/bad"):
        await store.load("bad")


def test_decode_accepts_numbers_and_drops_false() -> None:
    """Numbers become flag text and null drops the flag."""
    raw = b'{"binary": "b", "args": [["-c", 4096], ["--temp", 0.5], ["--x", null], ["-ngl", 99.0]]}'
    assert decode_config(raw, "k").config.args == (
        ("-c", "4096"),
        ("--temp", "0.5"),
        ("-ngl", "99"),
    )


async def test_prefixes_are_separate(etcd_server: EtcdServer) -> None:
    """Stores with different prefixes do not see each other's configs."""
    async with (
        opened(etcd_server.addr, prefix="/one") as one,
        opened(etcd_server.addr, prefix="/two/") as two,
    ):
        await one.save("m", A)
        assert await two.load("m") is None
        assert etcd_server.etcdctl("get", "/one/configs/m", "--keys-only").strip()


async def test_name_with_slash_is_one_segment(store: EtcdStore, etcd_server: EtcdServer) -> None:
    """A name with a slash is one escaped key segment, not a directory."""
    await store.save("a/b", A)
    assert await store.load("a/b") == A
    assert await store.load("a") is None
    assert "/corral/configs/a%2Fb" in etcd_server.etcdctl(
        "get", "/corral", "--prefix", "--keys-only"
    )


# -- endpoints and outages ----------------------------------------------------------------


async def test_unreachable_endpoint_raises_unavailable_with_address() -> None:
    """An unreachable endpoint is StoreUnavailable naming the address, and marks the store down."""
    dead = f"127.0.0.1:{free_port()}"
    async with opened(dead) as store:
        with pytest.raises(StoreUnavailable, match=dead):
            await store.load("m")
        assert not store.is_connected
        assert store.last_error is not None and dead in store.last_error


async def test_next_endpoint_is_tried(etcd_server: EtcdServer) -> None:
    """A dead first endpoint is skipped for the next one."""
    dead = f"127.0.0.1:{free_port()}"
    async with opened(f"{dead},{etcd_server.addr}") as store:
        await store.save("m", A)
        assert await store.load("m") == A
        assert store.is_connected


async def test_stopped_etcd_then_back(store: EtcdStore, etcd_server: EtcdServer) -> None:
    """A stopped etcd is StoreUnavailable; once back, the store works again."""
    await store.save("m", A)
    etcd_server.stop()
    with pytest.raises(StoreUnavailable, match=etcd_server.addr):
        await store.load("m")
    assert not store.is_connected
    etcd_server.start()
    assert await store.load("m") == A
    assert store.is_connected


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_paused_etcd_fails_fast_and_watch_recovers(etcd_server: EtcdServer) -> None:
    """A frozen etcd fails calls after 2 s, the watch notices, and recovers once it thaws."""
    async with (
        opened(etcd_server.addr) as watcher,
        opened(etcd_server.addr) as writer,
        watching(watcher, "m") as queue,
    ):
        await writer.save("m", A)
        assert await next_of(queue) == A
        # Another name: a timed-out save may still be applied once etcd runs again.
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: writer.load("m"),
            lambda: writer.save("other", B),
        ]
        etcd_server.pause()
        try:
            for call in calls:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable, match="no answer within 2 s"):
                    await call()
                assert time.monotonic() - start < 3.0
            # The quiet watch stream is probed: the frozen etcd is noticed.
            await until(lambda: not watcher.is_connected, 5.0, "watcher notices the pause")
        finally:
            etcd_server.resume()
        await writer.save("m", C)
        assert await next_of(queue, deadline=10.0) == C
        assert watcher.is_connected


# -- watch ----------------------------------------------------------------------------------


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_watch_sees_puts_quickly(etcd_server: EtcdServer) -> None:
    """A watch sees each save, in order, within 1 s, and nothing else."""
    async with opened(etcd_server.addr) as watcher, opened(etcd_server.addr) as writer:
        await watcher.load("m")  # nothing stored yet: watch starts from here
        async with watching(watcher, "m") as queue:
            latencies = []
            for i in range(5):
                stored = StoredConfig(LlamaConfig("b", (("--seq", str(i)),)))
                start = time.monotonic()
                await writer.save("m", stored)
                assert await next_of(queue, deadline=2.0) == stored
                latencies.append(time.monotonic() - start)
            assert max(latencies) < 1.0
            assert queue.empty()


async def test_watch_starts_after_own_save(store: EtcdStore) -> None:
    """A watch opened after a save yields the next change, not the save."""
    await store.save("m", A)
    async with watching(store, "m") as queue:
        await store.save("m", B)
        assert await next_of(queue) == B


async def test_watch_without_history_yields_current_value_first(
    etcd_server: EtcdServer,
) -> None:
    """A fresh watcher gets the current value first, then the changes."""
    async with opened(etcd_server.addr) as writer, opened(etcd_server.addr) as watcher:
        await writer.save("m", A)
        async with watching(watcher, "m") as queue:
            assert await next_of(queue) == A
            await writer.save("m", B)
            assert await next_of(queue) == B


async def test_watch_ignores_other_names(etcd_server: EtcdServer) -> None:
    """A watch sees only its own name, not names that share its prefix."""
    async with opened(etcd_server.addr) as writer, opened(etcd_server.addr) as watcher:
        await watcher.load("m")
        async with watching(watcher, "m") as queue:
            await writer.save("mm", A)  # shares the prefix "m"
            await writer.save("other", A)
            await writer.save("m", B)
            assert await next_of(queue) == B
            assert queue.empty()


async def test_watch_sees_etcdctl_writes_and_skips_garbage(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    """A watch yields hand-written values, skips garbage and deletions."""
    await store.load("m")
    async with watching(store, "m") as queue:
        hand = {"binary": "/bin/ls", "args": {"--port": 1}}
        etcd_server.etcdctl("put", config_key("m"), "garbage")
        etcd_server.etcdctl("put", config_key("m"), json.dumps(hand))
        stored = await next_of(queue)
        assert stored.config == LlamaConfig("/bin/ls", (("--port", "1"),))
        etcd_server.etcdctl("del", config_key("m"))
        await store.save("m", A)
        assert await next_of(queue) == A


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_watch_survives_restart_and_sees_change_made_meanwhile(
    etcd_server: EtcdServer,
) -> None:
    """A watch outlives an etcd restart and yields the change made while it reconnected."""
    async with opened(etcd_server.addr) as watcher:
        await watcher.save("m", A)
        async with watching(watcher, "m") as queue:
            await asyncio.to_thread(etcd_server.stop)
            await asyncio.to_thread(etcd_server.start)
            async with opened(etcd_server.addr) as fresh:
                await fresh.save("m", B)
            start = time.monotonic()
            assert await next_of(queue, deadline=10.0) == B
            assert time.monotonic() - start < 5.0
            async with opened(etcd_server.addr) as fresh:
                await fresh.save("m", C)
            assert await next_of(queue) == C


async def test_watch_can_be_closed_while_streaming(store: EtcdStore) -> None:
    """A watch that has yielded a change can be closed (aclose) while it streams."""
    await store.save("m", A)
    watch = cast(AsyncGenerator[StoredConfig, None], store.watch("m"))
    waiter = asyncio.ensure_future(anext(watch))
    await store.save("m", B)
    assert await asyncio.wait_for(waiter, 5.0) == B
    await watch.aclose()


# -- registration ---------------------------------------------------------------------------


async def test_registration_lists_updates_and_closes(store: EtcdStore) -> None:
    """Registrations are listed with their updates and removed when closed."""
    async with store.register("m", {"port": 8081}, instance_id="one", ttl=2) as one:
        async with store.register("m", {"port": 8082}, instance_id="two", ttl=2):
            await until(lambda: one.is_registered, 5.0, "registered")
            one.update(state="RUNNING")
            await until(
                lambda: _instances_are(
                    store, {"one": {"port": 8081, "state": "RUNNING"}, "two": {"port": 8082}}
                ),
                5.0,
                "both instances listed with the update",
            )
        await until(
            lambda: _instances_are(store, {"one": {"port": 8081, "state": "RUNNING"}}),
            1.0,
            "closed registration removed at once",
        )
    assert await store.list_instances("m") == {}


async def _instances_are(store: EtcdStore, expected: dict[str, Any]) -> bool:
    found: dict[str, Any] = await store.list_instances("m")
    return found == expected


CHILD = """
import asyncio, os, sys
from corral.store.etcd import EtcdStore

async def main():
    store = EtcdStore.connect(sys.argv[1])
    async with store.register("m", {"pid": os.getpid()}, instance_id="child", ttl=2) as reg:
        while not reg.is_registered:
            await asyncio.sleep(0.01)
        print("registered", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_registration_vanishes_within_ttl_when_holder_is_killed(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    """A SIGKILLed holder's registration disappears within its TTL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, etcd_server.addr, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 15.0) == b"registered\n"
        assert list(await store.list_instances("m")) == ["child"]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed_at = time.monotonic()
        await until(lambda: _instances_are(store, {}), 2 + 1.5,
                    "registration expires within the TTL")
        assert time.monotonic() - killed_at <= 3.5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_registration_is_recreated_after_restart(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    """After an etcd restart the registration comes back with the update made meanwhile."""
    async with store.register("m", {"state": "RUNNING"}, instance_id="me", ttl=2) as reg:
        await until(lambda: reg.is_registered, 5.0, "registered")
        await asyncio.to_thread(etcd_server.stop)
        reg.update(state="APPLYING")  # made while etcd is away
        await until(lambda: not store.is_connected, 5.0, "registration notices the outage")
        await asyncio.to_thread(etcd_server.start)
        await until(
            lambda: _instances_are(store, {"me": {"state": "APPLYING"}}), 10.0, "re-registered"
        )


async def _revoke(store: EtcdStore, etcd_server: EtcdServer, lease: int) -> None:
    etcd_server.etcdctl("lease", "revoke", format(lease, "x"))
    assert await store.list_instances("m") == {}


async def _freeze_past_the_ttl(store: EtcdStore, etcd_server: EtcdServer, lease: int) -> None:
    etcd_server.pause()
    try:
        await asyncio.sleep(1.5)  # the scenario: longer than the 1 s TTL
    finally:
        etcd_server.resume()


@pytest.mark.parametrize(("ttl", "lose_lease"), [(2, _revoke), (1, _freeze_past_the_ttl)],
                         ids=["revoked", "expired-while-etcd-is-frozen"])
async def test_registration_survives_losing_its_lease(
    store: EtcdStore, etcd_server: EtcdServer, ttl: int,
    lose_lease: Callable[[EtcdStore, EtcdServer, int], Awaitable[None]],
) -> None:
    """A registration whose lease is gone gets a new lease and is listed again."""
    async with store.register("m", {"n": 1}, instance_id="me", ttl=ttl) as reg:
        await until(lambda: reg.is_registered, 5.0, "registered")
        first = reg.lease
        assert first is not None
        await lose_lease(store, etcd_server, first)
        await until(lambda: reg.lease not in (None, first), 5.0, "a new lease is granted")
        await until(lambda: _instances_are(store, {"me": {"n": 1}}), 5.0, "re-registered")
