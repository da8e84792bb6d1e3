"""An async etcd v3 client over the JSON gateway: the KV, lease and watch calls Corral makes.

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as JSON at ``/v3/*``, so a thin httpx client is all we need
(``design/ETCD.md`` records the libraries tried). The driver is in three layers:

- :mod:`.wire` -- the values sent and read (:class:`KeyValue`, :class:`Compare`,
  :class:`Op`, ...) and their JSON encoding; pure.
- :mod:`.transport` -- :class:`GatewayTransport`, one HTTP call per etcd operation with
  endpoint failover, auth tokens, and the one place failures become
  :class:`StoreUnavailable` (:mod:`.failures` says what each answer means, :mod:`.tls`
  what a failed handshake means).
- here -- :class:`EtcdClient`: range, put, delete, txn, leases and watches.

A frozen etcd (SIGSTOP) keeps its TCP connections open and a silent watch stream would
never notice, so whenever the stream is quiet for ``probe_interval`` the client makes a
cheap call to the same endpoint; if that fails, the watch ends with StoreUnavailable. A
watch opened with an expired auth token is reopened once with a fresh one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from corral.errors import StoreUnavailable
from corral.store.etcd.failures import (
    AuthFailed,
    LeaseNotFound,
    TokenInvalid,
    Unreachable,
    is_stale_token,
)
from corral.store.etcd.tls import EtcdTLS
from corral.store.etcd.transport import GatewayTransport
from corral.store.etcd.wire import (
    JSON,
    Compare,
    KeyValue,
    Op,
    Range,
    TxnResult,
    WatchEvent,
    WatchMessage,
    b64,
    key_range,
    parse_range,
    parse_txn,
    parse_watch_message,
    revision_of,
)

__all__ = ["DEFAULT_PROBE_INTERVAL", "DEFAULT_TIMEOUT", "EtcdClient"]

log = logging.getLogger("corral.store.etcd")  # one logger name for the whole driver

DEFAULT_TIMEOUT = 2.0
DEFAULT_PROBE_INTERVAL = 1.0


class EtcdClient:
    """An async etcd v3 client over the JSON gateway; every failure is a StoreUnavailable."""

    def __init__(
        self,
        endpoints: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        tls: EtcdTLS | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        """``endpoints``: ``host:port`` or URLs, comma-separated. ``tls``: see
        :class:`EtcdTLS` (endpoints without a scheme then use https). ``user``/``password``:
        etcd auth; without ``password`` it is read from ``$CORRAL_ETCD_PASSWORD``.
        UsageError for settings that cannot work (unreadable certificate, no password)."""
        # The layer below (endpoints, the one in use, the auth token): read it, do not drive it.
        self.transport = GatewayTransport(endpoints, timeout=timeout,
                                          probe_interval=probe_interval, tls=tls, user=user,
                                          password=password)

    @property
    def user(self) -> str | None:
        return self.transport.user

    @property
    def endpoints(self) -> str:
        return self.transport.endpoints

    @property
    def is_connected(self) -> bool:
        """Whether the last call reached etcd (True until the first call fails)."""
        return self.transport.is_connected

    @property
    def last_error(self) -> str | None:
        """Why the last call failed, while ``is_connected`` is False."""
        return self.transport.last_error

    async def range(self, key: str, *, prefix: bool = False) -> Range:
        return await self.transport.call("/v3/kv/range", key_range(key, prefix), parse_range)

    async def get(self, key: str) -> KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Store ``value``; returns the new revision. LeaseNotFound if ``lease`` is gone."""
        raw = value.encode() if isinstance(value, str) else value
        body: JSON = {"key": b64(key), "value": b64(raw)}
        if lease:
            body["lease"] = str(lease)
        return await self.transport.call("/v3/kv/put", body, revision_of)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        return await self.transport.call("/v3/kv/deleterange", key_range(key, prefix),
                                        lambda d: int(d.get("deleted", 0)))

    async def txn(self, compare: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResult:
        """If every ``compare`` holds, do ``success``, else ``failure``: atomically."""
        body: JSON = {"compare": [c.to_json() for c in compare],
                      "success": [op.to_json() for op in success],
                      "failure": [op.to_json() for op in failure or []]}
        return await self.transport.call("/v3/kv/txn", body, parse_txn)

    async def lease_grant(self, ttl: int) -> int:
        return await self.transport.call("/v3/lease/grant", {"TTL": str(ttl)},
                                        lambda d: int(d["ID"]))

    async def lease_keepalive(self, lease: int, *, url: str | None = None) -> int:
        """Renew ``lease`` once; returns its TTL. LeaseNotFound if it has expired.

        With ``url``, at that endpoint only (a watch's probe: it must reach the member the
        watch streams from, or a frozen member would go unnoticed).
        """

        def parse(data: JSON) -> int:
            ttl = int(data.get("result", {}).get("TTL", 0))
            if ttl <= 0:
                raise LeaseNotFound(f"etcd lease {lease:x} has expired")
            return ttl

        body = {"ID": str(lease)}
        if url is None:
            return await self.transport.call("/v3/lease/keepalive", body, parse)
        return parse(await self.transport.call_at(url, "/v3/lease/keepalive", body))

    async def ping(self, url: str, key: str = "/") -> None:
        """One cheap call to ``url`` (a count-only range): StoreUnavailable if it fails."""
        await self.transport.call_at(url, "/v3/kv/range", {"key": b64(key), "count_only": True})

    async def lease_revoke(self, lease: int) -> None:
        await self.transport.call("/v3/lease/revoke", {"ID": str(lease)}, lambda d: None)

    async def watch(self, key: str, start_revision: int, *, prefix: bool = False,
                    probe: Callable[[str], Awaitable[object]] | None = None,
                    probe_interval: float | None = None) -> AsyncGenerator[WatchEvent, None]:
        """Events on ``key`` (or every key under it) from ``start_revision`` on, until it
        fails: it only ever ends by raising StoreUnavailable (connection lost, probe failed,
        or canceled by etcd).

        When the stream is quiet for ``probe_interval`` (default: the client's), ``probe`` is
        called with the watch's endpoint (default: a count-only range there); a fleet passes
        its lease keep-alive, so one request both renews the lease and proves the stream.
        """
        gateway = self.transport
        url = gateway.url
        next_revision = start_revision
        token: str | None = None
        reauthenticated = renew = False
        while True:
            request = {**key_range(key, prefix), "start_revision": str(next_revision)}
            try:
                if renew:
                    renew = False
                    await gateway.renew_token(url, token)
                token = await gateway.token_for(url)
                async with gateway.stream(url, "/v3/watch", {"create_request": request},
                                          token) as lines:
                    while True:
                        line = await gateway.next_line(url, key, lines, probe, probe_interval)
                        for event in _events(url, key, parse_watch_message(line)):
                            next_revision = event.kv.mod_revision + 1
                            reauthenticated = False
                            yield event
            except TokenInvalid as exc:
                # Opened with an expired token: authenticate again and reopen once.
                if reauthenticated or not gateway.user:
                    raise StoreUnavailable(f"etcd at {url} refused the watch on {key}: "
                                           f"{exc}") from exc
                log.info("etcd auth token of user %s no longer valid (%s): authenticating "
                         "again", gateway.user, exc)
                reauthenticated = renew = True
            except (Unreachable, TimeoutError, ValueError, KeyError) as exc:
                reason = gateway.describe(exc)
                gateway.failed(f"{url}: {reason}")
                gateway.rotate()
                raise StoreUnavailable(f"watch on {key} at etcd {url} broke: {reason}") from exc
            except AuthFailed as exc:
                gateway.failed(str(exc))
                raise

    async def aclose(self) -> None:
        await self.transport.aclose()


def _events(url: str, key: str, message: WatchMessage) -> tuple[WatchEvent, ...]:
    """The events of one watch message; why the watch ended, as the exception to handle."""
    if message.error is not None:
        raise Unreachable(message.error)
    if message.canceled is not None:
        if is_stale_token(message.canceled):
            raise TokenInvalid(message.canceled)
        raise StoreUnavailable(f"etcd at {url} canceled the watch on {key}: "
                               f"{message.canceled}")
    return message.events
