"""The etcd driver: shared configs and live instance registrations, over etcd's JSON gateway.

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as JSON at ``/v3/*``, so a thin httpx client is all we need
(``design/ETCD.md`` records the libraries tried). Keys and values travel base64-encoded,
64-bit integers as strings, and a watch answers with one JSON object per line.

:class:`EtcdClient` makes one HTTP call per etcd operation, each under a timeout. With
several endpoints (``"h1:2379,h2:2379"``) the next one is tried when a call fails.
Transport and gateway errors become :class:`StoreUnavailable` here and nowhere else; the
client remembers whether its last call reached etcd (``is_connected``) for status pages.

:class:`EtcdStore` keeps each config as human-readable JSON at ``<prefix>/configs/<name>``.
Its watch is level-triggered and heals itself: read the key, yield it if its mod_revision
is newer than the last one seen, then watch from the read's revision + 1; on any failure,
back off (0.1 s doubling to 2 s) and start over, so a write made while disconnected is
never missed. A frozen etcd (SIGSTOP) keeps its TCP connections open and a silent watch
stream would never notice, so whenever the stream is quiet for ``probe_interval`` the
client makes a cheap range call to the same endpoint; if that fails, the watch restarts.

:class:`Registration` keeps ``<prefix>/instances/<name>/<id>`` under a lease, renewed
every TTL/3. When the lease is lost (expired while etcd was away, or revoked) it grants a
new one and puts the value again; after any failed round it re-puts the value too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import httpx

from corral.core.args import ArgValue, LlamaConfig, canonical_key, normalise_value
from corral.errors import InvalidArgs, StoreCorrupt, StoreUnavailable, UsageError
from corral.store.base import StoredConfig

__all__ = [
    "EtcdClient",
    "EtcdStore",
    "KeyValue",
    "LeaseNotFound",
    "Range",
    "Registration",
    "WatchEvent",
    "decode_config",
    "encode_config",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0
DEFAULT_PROBE_INTERVAL = 1.0
DEFAULT_TTL = 5
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 2.0
_GRPC_NOT_FOUND = 5
_GRPC_TRANSIENT = {1, 4, 14}  # canceled (gateway answers 408), deadline exceeded, unavailable
JSON = dict[str, Any]
_T = TypeVar("_T")


class LeaseNotFound(StoreUnavailable):
    """The lease expired or was revoked: grant a new one."""


class _Unreachable(Exception):
    """This endpoint did not answer usefully; another one may."""


class _Canceled(Exception):
    """etcd ended a watch on purpose (compaction); etcd itself is fine."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0

    @staticmethod
    def from_json(raw: JSON) -> KeyValue:
        return KeyValue(
            _unb64(raw["key"]).decode(errors="replace"),
            _unb64(raw.get("value", "")),
            int(raw.get("mod_revision", 0)),
            int(raw.get("lease", 0)),
        )


@dataclass(frozen=True)
class Range:
    kvs: tuple[KeyValue, ...]
    revision: int
    """The store's revision when this was read: watch from ``revision + 1``."""


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["PUT", "DELETE"]
    kv: KeyValue


class EtcdClient:
    """An async etcd v3 client over the JSON gateway; every failure is a StoreUnavailable."""

    def __init__(
        self,
        endpoints: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        self._urls = _parse_endpoints(endpoints)
        self._current = 0
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False)
        self._connected = True
        self._last_error: str | None = None

    @property
    def endpoints(self) -> str:
        return ",".join(self._urls)

    @property
    def is_connected(self) -> bool:
        """Whether the last call reached etcd (True until the first call fails)."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last call failed, while ``is_connected`` is False."""
        return self._last_error

    async def range(self, key: str, *, prefix: bool = False) -> Range:
        body: JSON = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key.encode()))
        return await self._call("/v3/kv/range", body, _parse_range)

    async def get(self, key: str) -> KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Store ``value``; returns the new revision. LeaseNotFound if ``lease`` is gone."""
        raw = value.encode() if isinstance(value, str) else value
        body: JSON = {"key": _b64(key), "value": _b64(raw)}
        if lease:
            body["lease"] = str(lease)
        return await self._call("/v3/kv/put", body, _revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        body: JSON = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key.encode()))
        return await self._call("/v3/kv/deleterange", body, lambda d: int(d.get("deleted", 0)))

    async def lease_grant(self, ttl: int) -> int:
        return await self._call("/v3/lease/grant", {"TTL": str(ttl)}, lambda d: int(d["ID"]))

    async def lease_keepalive(self, lease: int) -> int:
        """Renew ``lease`` once; returns its TTL. LeaseNotFound if it has expired."""

        def parse(data: JSON) -> int:
            ttl = int(data.get("result", {}).get("TTL", 0))
            if ttl <= 0:
                raise LeaseNotFound(f"etcd lease {lease:x} has expired")
            return ttl

        return await self._call("/v3/lease/keepalive", {"ID": str(lease)}, parse)

    async def lease_revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda d: None)

    async def watch(self, key: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Events on ``key`` from ``start_revision`` on, until it fails: it only ever ends by
        raising StoreUnavailable (connection lost, probe failed, or canceled by etcd)."""
        url = self._urls[self._current]
        body = {"create_request": {"key": _b64(key), "start_revision": str(start_revision)}}
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self._timeout):
                    response = await stack.enter_async_context(
                        self._http.stream(
                            "POST",
                            f"{url}/v3/watch",
                            json=body,
                            timeout=httpx.Timeout(self._timeout, read=None),
                        )
                    )
                if response.status_code != 200:
                    raise _Unreachable(f"HTTP {response.status_code}")
                lines = cast(AsyncGenerator[str, None], response.aiter_lines())
                await stack.enter_async_context(contextlib.aclosing(lines))
                while True:
                    line = await self._next_line(url, key, lines)
                    for event in _watch_events(line):
                        yield event
        except _Canceled as exc:
            raise StoreUnavailable(f"etcd at {url} canceled the watch on {key}: {exc}") from exc
        except (_Unreachable, httpx.HTTPError, TimeoutError, ValueError, KeyError) as exc:
            reason = _describe(exc)
            self._failed(f"{url}: {reason}")
            self._rotate()
            raise StoreUnavailable(f"watch on {key} at etcd {url} broke: {reason}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _next_line(self, url: str, key: str, lines: AsyncIterator[str]) -> str:
        """The next line of a watch stream, probing ``url`` whenever the stream is quiet."""
        read = asyncio.ensure_future(_anext_or_none(lines))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=self._probe_interval)
                if done:
                    break
                await self._post(url, "/v3/kv/range", {"key": _b64(key), "count_only": True})
                self._succeeded()
            line = read.result()
        finally:
            if not read.done():
                read.cancel()
                await asyncio.wait({read})
        if line is None:
            raise _Unreachable("etcd closed the watch stream")
        return line

    async def _call(self, path: str, body: JSON, parse: Callable[[JSON], _T]) -> _T:
        """POST to the current endpoint, then to each other one, and ``parse`` the answer.

        The one exit for errors of unary calls: StoreUnavailable (or LeaseNotFound) only.
        """
        failures: list[str] = []
        for _ in self._urls:
            url = self._urls[self._current]
            try:
                data = await self._post(url, path, body)
                try:
                    result = parse(data)
                except (KeyError, ValueError, TypeError, AttributeError) as exc:
                    raise _Unreachable(f"unexpected answer to {path}: {exc!r}") from exc
            except _Unreachable as exc:
                failures.append(f"{url}: {exc}")
                self._rotate()
                continue
            except StoreUnavailable:
                self._succeeded()  # etcd answered, with a refusal
                raise
            self._succeeded()
            return result
        reason = "; ".join(failures)
        self._failed(reason)
        raise StoreUnavailable(f"etcd unreachable ({reason})")

    async def _post(self, url: str, path: str, body: JSON) -> JSON:
        """One call to one endpoint, bounded by the timeout as a whole."""
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.post(f"{url}{path}", json=body)
            data = response.json()
        except TimeoutError as exc:
            raise _Unreachable(f"no answer within {self._timeout:g} s") from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise _Unreachable(_describe(exc)) from exc
        if not isinstance(data, dict):
            raise _Unreachable(f"unexpected answer to {path}: {str(data)[:100]}")
        if response.status_code == 200 and "error" not in data:
            return data
        # Unary errors are {"error": msg, "code": n}; streamed ones {"error": {"grpc_code": n}}.
        error = data["error"] if isinstance(data.get("error"), dict) else data
        message = str(error.get("message") or error.get("error") or f"HTTP {response.status_code}")
        code = error.get("code", error.get("grpc_code"))
        if code == _GRPC_NOT_FOUND and "lease" in message:
            raise LeaseNotFound(f"etcd at {url}: {message}")
        if code in _GRPC_TRANSIENT or response.status_code == 408 or response.status_code >= 500:
            raise _Unreachable(message)
        raise StoreUnavailable(f"etcd at {url} refused {path}: {message}")

    def _succeeded(self) -> None:
        if not self._connected:
            log.info("etcd reachable again at %s", self._urls[self._current])
        self._connected, self._last_error = True, None

    def _failed(self, reason: str) -> None:
        if self._connected:
            log.warning("etcd unreachable: %s", reason)
        self._connected, self._last_error = False, reason

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self._urls)


class EtcdStore:
    """Configs in etcd at ``<prefix>/configs/<name>``, watched for writes by anyone."""

    def __init__(
        self,
        addr: str,
        prefix: str = "/corral",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
    ) -> None:
        self._client = EtcdClient(addr, timeout=timeout, probe_interval=probe_interval)
        self._prefix = prefix.rstrip("/")
        self._seen: dict[str, int] = {}  # name -> revision as of which we know its value

    @property
    def description(self) -> str:
        return f"etcd {self._client.endpoints} {self._prefix}/configs/"

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def is_connected(self) -> bool:
        """Whether the last call to etcd worked; for the supervisor's status."""
        return self._client.is_connected

    @property
    def last_error(self) -> str | None:
        return self._client.last_error

    def config_key(self, name: str) -> str:
        return f"{self._prefix}/configs/{_escape(name)}"

    def instance_key(self, name: str, instance_id: str) -> str:
        return f"{self._prefix}/instances/{_escape(name)}/{_escape(instance_id)}"

    async def load(self, name: str) -> StoredConfig | None:
        key = self.config_key(name)
        found = await self._client.range(key)
        self._seen[name] = max(self._seen.get(name, 0), found.revision)
        return decode_config(found.kvs[0].value, key) if found.kvs else None

    async def save(self, name: str, stored: StoredConfig) -> None:
        revision = await self._client.put(self.config_key(name), encode_config(stored))
        self._seen[name] = max(self._seen.get(name, 0), revision)

    async def watch(self, name: str) -> AsyncIterator[StoredConfig]:
        """Every config written under ``name`` from now on, by anyone; never ends by itself.

        Starts after what this store last loaded or saved for ``name``; if it did neither,
        the current value (if any) comes first. Values that are not a config are skipped
        with a warning; outages are ridden out (see ``is_connected``).
        """
        key = self.config_key(name)
        seen = self._seen.get(name, 0)

        def newer(kv: KeyValue) -> StoredConfig | None:
            nonlocal seen
            if kv.mod_revision <= seen:
                return None
            seen = kv.mod_revision
            return _decode_or_warn(kv)

        delay = _BACKOFF_FIRST
        while True:
            try:
                found = await self._client.range(key)
                delay = _BACKOFF_FIRST
                for kv in found.kvs:
                    if (stored := newer(kv)) is not None:
                        yield stored
                changes = self._client.watch(key, found.revision + 1)
                async with contextlib.aclosing(changes):
                    async for event in changes:
                        if event.kind == "PUT" and (stored := newer(event.kv)) is not None:
                            yield stored
            except StoreUnavailable as exc:
                log.info("watch on %s interrupted (%s); retrying in %.1f s", key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def register(
        self,
        name: str,
        info: Mapping[str, Any],
        *,
        instance_id: str | None = None,
        ttl: int = DEFAULT_TTL,
    ) -> Registration:
        """A (not yet started) registration of this instance under ``name``."""
        instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}"
        return Registration(self._client, self.instance_key(name, instance_id), info, ttl=ttl)

    async def list_instances(self, name: str) -> dict[str, JSON]:
        """Live instances of ``name``: instance id -> the value it registered."""
        base = self.instance_key(name, "")
        found = await self._client.range(base, prefix=True)
        out: dict[str, JSON] = {}
        for kv in found.kvs:
            try:
                value = json.loads(kv.value)
            except ValueError:
                value = None
            if isinstance(value, dict):
                out[_unescape(kv.key[len(base) :])] = value
            else:
                log.warning("ignoring etcd key %s: not a JSON object", kv.key)
        return out

    async def close(self) -> None:
        await self._client.aclose()


class Registration:
    """Keeps one key alive under a lease while :meth:`run` runs; :meth:`close` removes it.

    Use ``async with store.register(...) as reg:`` (runs in a task of its own), or run
    :meth:`run` in the caller's TaskGroup and call :meth:`close` after cancelling it.
    """

    def __init__(
        self, client: EtcdClient, key: str, info: Mapping[str, Any], *, ttl: int = DEFAULT_TTL
    ) -> None:
        self._client = client
        self._key = key
        self._info = dict(info)
        self._ttl = max(1, int(ttl))
        self._lease: int | None = None
        self._version, self._written = 1, 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return self._key

    @property
    def info(self) -> JSON:
        return dict(self._info)

    @property
    def lease(self) -> int | None:
        return self._lease

    @property
    def is_registered(self) -> bool:
        """Whether the key is written under a live lease, as of the last round."""
        return self._lease is not None and self._written == self._version

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the value; written at once by the running loop."""
        self._info.update(fields)
        self._version += 1
        self._wake.set()

    async def run(self) -> None:
        """Renew the lease every TTL/3 and write updates, until cancelled."""
        while True:
            try:
                await self._round()
            except LeaseNotFound:
                self._lease = None
                self._wake.set()  # register again at once
            except StoreUnavailable as exc:
                log.debug("registration %s: %s", self._key, exc)
                self._written = 0  # re-put once etcd answers again
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ttl / 3):
                    await self._wake.wait()
            self._wake.clear()

    async def _round(self) -> None:
        if self._lease is not None:
            try:
                await self._client.lease_keepalive(self._lease)
            except LeaseNotFound:
                log.info("registration %s: lease lost, registering again", self._key)
                self._lease = None
        if self._lease is None:
            self._written = 0
            self._lease = await self._client.lease_grant(self._ttl)
        if self._written != self._version:
            version = self._version
            await self._client.put(self._key, json.dumps(self._info), lease=self._lease)
            self._written = version

    async def close(self) -> None:
        """Stop the loop started by ``async with`` and revoke the lease (best effort)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        lease, self._lease = self._lease, None
        if lease is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._client.lease_revoke(lease)

    async def __aenter__(self) -> Registration:
        self._task = asyncio.create_task(self.run(), name=f"etcd registration {self._key}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def encode_config(stored: StoredConfig) -> bytes:
    """Readable JSON, one flag per line: ``etcdctl get`` shows it as an operator would."""
    args = ",\n".join(
        f"    {json.dumps(list(pair), ensure_ascii=False)}" for pair in stored.config.args
    )
    fields = [
        f'  "binary": {json.dumps(stored.config.binary, ensure_ascii=False)}',
        f'  "args": [\n{args}\n  ]' if args else '  "args": []',
        f'  "applied_at": {json.dumps(stored.applied_at, ensure_ascii=False)}',
        f'  "applied_by": {json.dumps(stored.applied_by, ensure_ascii=False)}',
    ]
    return ("{\n" + ",\n".join(fields) + "\n}\n").encode()


def decode_config(raw: bytes, where: str) -> StoredConfig:
    """Parse a stored value; ``args`` may be a list of pairs or (hand-written) an object."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StoreCorrupt(f"etcd key {where} does not hold JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StoreCorrupt(f"etcd key {where} holds {type(data).__name__}, not a JSON object")
    binary = data.get("binary")
    if not isinstance(binary, str) or not binary.strip():
        raise StoreCorrupt(f"etcd key {where}: 'binary' must be a non-empty string")
    try:
        args = _decode_args(data.get("args", []))
    except (InvalidArgs, TypeError, ValueError) as exc:
        raise StoreCorrupt(f"etcd key {where}: bad 'args': {exc}") from exc
    stamps = [data.get(k) or "" for k in ("applied_at", "applied_by")]
    return StoredConfig(LlamaConfig(binary.strip(), args), str(stamps[0]), str(stamps[1]))


def _decode_args(raw: object) -> tuple[tuple[str, ArgValue], ...]:
    pairs: Iterable[object]
    if isinstance(raw, dict):
        pairs = raw.items()
    elif isinstance(raw, list):
        pairs = raw
    else:
        raise TypeError("expected a list of [flag, value] pairs or an object")
    out: dict[str, ArgValue] = {}
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"{pair!r} is not a [flag, value] pair")
        key, value = pair
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(f"value of {key!r} must be a string, number or boolean")
        name = canonical_key(key, None)
        normal = normalise_value(name, value, None)
        if normal is None:
            out.pop(name, None)
        else:
            out[name] = normal
    return tuple(out.items())


def _decode_or_warn(kv: KeyValue) -> StoredConfig | None:
    try:
        return decode_config(kv.value, kv.key)
    except StoreCorrupt as exc:
        log.warning("ignoring a write that is not a config: %s", exc)
        return None


async def _anext_or_none(lines: AsyncIterator[str]) -> str | None:
    return await anext(lines, None)


def _watch_events(line: str) -> list[WatchEvent]:
    data = json.loads(line)
    if "error" in data:
        raise _Unreachable(f"watch error: {data['error']}")
    result = data.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"
        raise _Canceled(reason)
    return [
        WatchEvent("DELETE" if ev.get("type") == "DELETE" else "PUT", KeyValue.from_json(ev["kv"]))
        for ev in result.get("events", [])
    ]


def _parse_endpoints(addr: str) -> list[str]:
    urls = [a.strip().rstrip("/") for a in addr.split(",") if a.strip()]
    if not urls:
        raise UsageError(f"etcd address {addr!r} names no endpoint (expected host:port[,...])")
    return [u if "://" in u else f"http://{u}" for u in urls]


def _parse_range(data: JSON) -> Range:
    kvs = tuple(KeyValue.from_json(kv) for kv in data.get("kvs", []))
    return Range(kvs, _revision(data))


def _revision(data: JSON) -> int:
    return int(data.get("header", {}).get("revision", 0))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, _Unreachable):
        return text
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _escape(part: str) -> str:
    """Names become one key segment: '/' would nest, so it (and '%') is %-escaped."""
    return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
    return part.replace("%2F", "/").replace("%25", "%")


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"
