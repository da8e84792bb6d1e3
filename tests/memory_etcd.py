"""An in-memory etcd for the fleet simulation, and an event loop whose time is virtual.

:class:`MemoryEtcd` keeps what the fleet relies on: one revision counter for the store, each
key's create/mod revision, transactions with compares, leases that expire (taking their
keys with them, as DELETE events), and a history that watches replay from any revision.
Each supervisor talks to it through its own :class:`MemoryClient`, which speaks
:class:`corral.store.etcd.protocol.EtcdAPI` (what :class:`~corral.store.etcd.EtcdClient`
speaks), so the shipped store, registration and rollout agent run on it unchanged. A client
adds latency to each call and lag to each watch event, drawn from a seeded random source,
and can be cut off (``partition``): then its calls fail, its watches end, and a write in
flight may or may not have landed (as over a real network).

:class:`VirtualTimeLoop` is an asyncio loop whose clock jumps to the next timer whenever
nothing is ready, so minutes of leases, canaries and backoff run in milliseconds and every
timeout (``asyncio.sleep``, ``asyncio.timeout``, ``loop.time()``) is exact.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import random
import selectors
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from corral.errors import StoreUnavailable
from corral.store.etcd.failures import LeaseNotFound
from corral.store.etcd.wire import Compare, KeyValue, Op, Range, TxnResult, WatchEvent

T = TypeVar("T")

__all__ = ["LoopClock", "MemoryClient", "MemoryEtcd", "VirtualTimeLoop", "run_virtual"]


# ---- virtual time -------------------------------------------------------------------------


class _JumpingSelector(selectors.SelectSelector):
    """Never blocks: instead of waiting ``timeout`` seconds it moves the loop's clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready:
            self._loop.now += 1e-6
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: nothing is scheduled and nothing can happen")
        # Every turn of the loop takes a microsecond, as a real one does: code that waits
        # "until a moment" by rounds of short timeouts gets there.
        self._loop.now += max(timeout, 1e-6)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop`."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class LoopClock:
    """The controller's clock (``corral.supervisor.seams.Clock``) on the running loop's time."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return 1.7e9 + self.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# ---- the store ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(eq=False)
class _Watch:
    key: str
    prefix: bool
    queue: asyncio.Queue[WatchEvent | None]
    client: MemoryClient
    last_delivery: float = 0.0

    def wants(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class MemoryEtcd:
    """The server: every client of one simulation shares it."""

    def __init__(self) -> None:
        self.revision = 1
        self.kvs: dict[str, KeyValue] = {}
        self.history: list[tuple[int, WatchEvent]] = []  # (revision, event), in order
        self.leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._watches: list[_Watch] = []
        self.writes: list[tuple[int, str, str, str]] = []  # (revision, who, key, value)
        # Keys that every write must guard: a transaction that writes one of them must
        # compare each of them (its mod or create revision). Writers named in ``exempt``
        # (an operator's etcdctl) are exempt. Offending transactions land in ``unguarded_writes``.
        self.guarded: frozenset[str] = frozenset()
        self.exempt: frozenset[str] = frozenset({"operator"})
        self.unguarded_writes: list[str] = []
        # Called with (revision, event) as each event happens, before any watch sees it: a
        # test-side observer with no lag that costs the loop no turns.
        self.listeners: list[Callable[[int, WatchEvent], None]] = []

    # ---- reading ----

    def _select(self, key: str, prefix: bool) -> tuple[KeyValue, ...]:
        if not prefix:
            return (self.kvs[key],) if key in self.kvs else ()
        return tuple(kv for k, kv in sorted(self.kvs.items()) if k.startswith(key))

    def value(self, key: str) -> str | None:
        kv = self.kvs.get(key)
        return kv.value.decode() if kv else None

    # ---- writing ----

    def _holds(self, c: Compare) -> bool:
        kv = self.kvs.get(c.key)
        actual: int | bytes
        if c.target == "MOD":
            actual = kv.mod_revision if kv else 0
        elif c.target == "CREATE":
            actual = kv.create_revision if kv else 0
        elif c.target == "VALUE":
            actual = kv.value if kv else b""
        else:
            raise NotImplementedError(c.target)
        if c.result == "EQUAL":
            return actual == c.value
        if c.result == "NOT_EQUAL":
            return actual != c.value
        assert isinstance(actual, int) and isinstance(c.value, int)
        return actual > c.value if c.result == "GREATER" else actual < c.value

    def txn(self, compare: list[Compare], success: list[Op], failure: list[Op],
            who: str = "?") -> TxnResult:
        self._audit(compare, success, who)
        ok = all(self._holds(c) for c in compare)
        ops = success if ok else failure
        for op in ops:
            if op.kind == "put" and op.lease and op.lease not in self.leases:
                raise LeaseNotFound(f"etcd lease {op.lease:x} not found")
        writes = [op for op in ops if op.kind != "range"]
        if writes and any(op.kind == "put" or op.key in self.kvs for op in writes):
            self.revision += 1
        ranges = []
        for op in ops:
            if op.kind == "range":
                ranges.append(Range(self._select(op.key, op.prefix), self.revision))
            elif op.kind == "put":
                self._put(op.key, op.value, op.lease, who)
            else:
                self._delete(op.key)
        return TxnResult(ok, self.revision, tuple(ranges))

    def _audit(self, compare: list[Compare], ops: list[Op], who: str) -> None:
        if who in self.exempt:
            return
        written = {op.key for op in ops if op.kind != "range"} & self.guarded
        compared = {c.key for c in compare if c.target in ("MOD", "CREATE")}
        if written and not self.guarded <= compared:
            self.unguarded_writes.append(
                f"{who} wrote {sorted(written)} at revision {self.revision + 1} comparing only "
                f"{sorted(compared)}")

    def _put(self, key: str, value: bytes, lease: int, who: str) -> None:
        old = self.kvs.get(key)
        if old is not None and old.lease and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        kv = KeyValue(key, value, self.revision, lease,
                      old.create_revision if old else self.revision)
        self.kvs[key] = kv
        if lease:
            self.leases[lease].keys.add(key)
        self.writes.append((self.revision, who, key, value.decode(errors="replace")))
        self._emit(WatchEvent("PUT", kv))

    def _delete(self, key: str) -> None:
        old = self.kvs.pop(key, None)
        if old is None:
            return
        if old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        self._emit(WatchEvent("DELETE", KeyValue(key, b"", self.revision)))

    def _emit(self, event: WatchEvent) -> None:
        self.history.append((self.revision, event))
        for listener in self.listeners:
            listener(self.revision, event)
        for watch in self._watches:
            if watch.wants(event.kv.key):
                watch.client.deliver(watch, event)

    def delete(self, key: str, prefix: bool = False, who: str = "?") -> int:
        keys = [kv.key for kv in self._select(key, prefix)]
        if who not in self.exempt and set(keys) & self.guarded:
            self.unguarded_writes.append(f"{who} deleted {key} without a transaction")
        if keys:
            self.revision += 1
            for k in keys:
                self._delete(k)
        return len(keys)

    # ---- leases ----

    def grant(self, ttl: int) -> int:
        lease = next(self._lease_ids)
        self.leases[lease] = _Lease(ttl, 0.0)
        self._renew(lease)
        return lease

    def _renew(self, lease: int) -> None:
        loop = asyncio.get_running_loop()
        entry = self.leases[lease]
        entry.expires_at = loop.time() + entry.ttl
        loop.call_at(entry.expires_at, self._maybe_expire, lease)

    def keepalive(self, lease: int) -> int:
        if lease not in self.leases:
            raise LeaseNotFound(f"etcd lease {lease:x} has expired")
        self._renew(lease)
        return self.leases[lease].ttl

    def _maybe_expire(self, lease: int) -> None:
        entry = self.leases.get(lease)
        if entry is not None and entry.expires_at <= asyncio.get_running_loop().time():
            self.revoke(lease)

    def revoke(self, lease: int) -> None:
        entry = self.leases.pop(lease, None)
        if entry is not None and entry.keys:
            self.revision += 1
            for key in sorted(entry.keys):
                self._delete(key)

    # ---- watches ----

    def open_watch(self, client: MemoryClient, key: str, start_revision: int,
                   prefix: bool) -> _Watch:
        watch = _Watch(key, prefix, asyncio.Queue(), client)
        start = bisect.bisect_left(self.history, start_revision, key=lambda h: h[0])
        for _, event in self.history[start:]:
            if watch.wants(event.kv.key):
                client.deliver(watch, event)
        self._watches.append(watch)
        return watch

    def close_watch(self, watch: _Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)


class MemoryClient:
    """One supervisor's connection to :class:`MemoryEtcd` (speaks ``EtcdAPI``)."""

    def __init__(self, server: MemoryEtcd, name: str, rng: random.Random,
                 latency: float = 0.005, lag: float = 0.05) -> None:
        self.server = server
        self.name = name
        self.rng = rng
        self.latency = latency  # each call takes up to this long (uniform)
        self.lag = lag  # each watch event arrives up to this late (uniform, in order)
        self.partitioned = False
        self.last_error: str | None = None
        self._watches: set[_Watch] = set()

    # ---- the network ----

    def partition(self) -> None:
        """Cut this client off: calls fail, watches end (their queues get a sentinel)."""
        self.partitioned = True
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    def heal(self) -> None:
        self.partitioned = False

    @property
    def endpoints(self) -> str:
        return f"memory://{self.name}"

    @property
    def is_connected(self) -> bool:
        return not self.partitioned

    async def _call(self, do: Callable[[], T]) -> T:
        await asyncio.sleep(self.rng.uniform(0.0, self.latency))
        if self.partitioned:
            # A request that left before the cut may still have landed.
            if self.rng.random() < 0.3:
                do()
            raise self._unavailable()
        try:
            return do()
        finally:
            await asyncio.sleep(self.rng.uniform(0.0, self.latency))

    def _unavailable(self) -> StoreUnavailable:
        self.last_error = f"{self.endpoints}: partitioned"
        return StoreUnavailable(f"etcd at {self.endpoints} is unreachable (partitioned)")

    def deliver(self, watch: _Watch, event: WatchEvent) -> None:
        """Queue ``event`` for ``watch`` after this client's lag, keeping the order."""
        loop = asyncio.get_running_loop()
        at = max(loop.time() + self.rng.uniform(0.0, self.lag), watch.last_delivery + 1e-6)
        watch.last_delivery = at
        loop.call_at(at, watch.queue.put_nowait, event)

    # ---- EtcdAPI ----

    async def range(self, key: str, *, prefix: bool = False) -> Range:
        return await self._call(lambda: Range(self.server._select(key, prefix),
                                              self.server.revision))

    async def get(self, key: str) -> KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        return (await self.txn([], [Op.put(key, value, lease)])).revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self._call(lambda: self.server.delete(key, prefix, self.name))

    async def txn(self, compare: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResult:
        return await self._call(lambda: self.server.txn(compare, success, failure or [],
                                                        self.name))

    async def lease_grant(self, ttl: int) -> int:
        return await self._call(lambda: self.server.grant(ttl))

    async def lease_keepalive(self, lease: int, *, url: str | None = None) -> int:
        return await self._call(lambda: self.server.keepalive(lease))

    async def lease_revoke(self, lease: int) -> None:
        await self._call(lambda: self.server.revoke(lease))

    async def ping(self, url: str, key: str = "/") -> None:
        await self._call(lambda: None)

    async def watch(self, key: str, start_revision: int, *, prefix: bool = False,
                    probe: Callable[[str], Awaitable[object]] | None = None,
                    probe_interval: float | None = None) -> AsyncGenerator[WatchEvent, None]:
        if self.partitioned:
            raise self._unavailable()
        watch = self.server.open_watch(self, key, start_revision, prefix)
        self._watches.add(watch)
        try:
            while True:
                try:
                    async with asyncio.timeout(probe_interval):
                        event = await watch.queue.get()
                except TimeoutError:
                    await (probe(self.endpoints) if probe else self.ping(self.endpoints))
                    continue
                if event is None or self.partitioned:
                    raise self._unavailable()
                yield event
        finally:
            self._watches.discard(watch)
            self.server.close_watch(watch)

    async def aclose(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(None)
