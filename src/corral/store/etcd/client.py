"""An async etcd v3 client over the JSON gateway.

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as JSON at ``/v3/*``, so a thin httpx client is all we need
(``design/ETCD.md`` records the libraries tried). Keys and values travel base64-encoded,
64-bit integers as strings, and a watch answers with one JSON object per line.

:class:`EtcdClient` makes one HTTP call per etcd operation, each under a timeout. With
several endpoints (``"h1:2379,h2:2379"``) the next one is tried when a call fails.
Transport and gateway errors become :class:`StoreUnavailable` here and nowhere else; the
client remembers whether its last call reached etcd (``is_connected``) for status pages.

A frozen etcd (SIGSTOP) keeps its TCP connections open and a silent watch stream would
never notice, so whenever the stream is quiet for ``probe_interval`` the client makes a
cheap range call to the same endpoint; if that fails, the watch ends with StoreUnavailable.

TLS and auth, as etcd is run in production
------------------------------------------
``tls=EtcdTLS(cacert, cert, key)`` makes endpoints without a scheme ``https://``: ``cacert``
verifies the server (else the system's CAs), ``cert``/``key`` are the client certificate
for ``--client-cert-auth``. Handshake failures are errors of their own, never timeouts: a
server certificate that does not verify, a server that wants a client certificate.
With auth enabled on etcd, ``user`` (and ``password``, else the environment variable
``CORRAL_ETCD_PASSWORD``, which keeps it out of ``ps``) is authenticated through
``/v3/auth/authenticate``; the token goes in the ``Authorization`` header of every call,
watches included. etcd 3.4 answers a call with an expired token (``--auth-token-ttl``) with
HTTP 401 ``{"error": "etcdserver: invalid auth token", "code": 16}``, and a watch opened
with one with a first message ``canceled`` for ``Unauthenticated``: either way the client
authenticates again once and repeats the call (reopens the watch) transparently. A wrong
password is :class:`AuthFailed`, at once, never retried in a loop.
With auth and ``--client-cert-auth`` together, etcd 3.4's gateway refuses a client
certificate that has a CommonName (HTTP 400): use one without CN (the token names the user).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, cast

import httpx

from corral.errors import StoreUnavailable, UsageError

__all__ = [
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_TIMEOUT",
    "JSON",
    "PASSWORD_ENV",
    "AuthFailed",
    "EtcdClient",
    "EtcdTLS",
    "KeyValue",
    "Compare",
    "LeaseNotFound",
    "Op",
    "Range",
    "TxnResult",
    "WatchEvent",
]

log = logging.getLogger("corral.store.etcd")  # one logger name for the whole driver

DEFAULT_TIMEOUT = 2.0
DEFAULT_PROBE_INTERVAL = 1.0
PASSWORD_ENV = "CORRAL_ETCD_PASSWORD"
_GRPC_NOT_FOUND = 5
_GRPC_UNAUTHENTICATED = 16
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty",
                "Unauthenticated")
_GRPC_TRANSIENT = {1, 4, 14}  # canceled (gateway answers 408), deadline exceeded, unavailable
JSON = dict[str, Any]
_T = TypeVar("_T")


class LeaseNotFound(StoreUnavailable):
    """The lease expired or was revoked: grant a new one."""


class AuthFailed(StoreUnavailable):
    """etcd refused the user's name or password: fix the settings, retrying will not help."""


class _Unreachable(Exception):
    """This endpoint did not answer usefully; another one may."""


class _TLSFailed(_Unreachable):
    """The TLS handshake with this endpoint failed (certificates, not the network)."""


class _TokenInvalid(Exception):
    """etcd no longer accepts our auth token (expired): authenticate again."""


class _AuthDisabled(Exception):
    """etcd answered authenticate with "authentication is not enabled"."""


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd: ``cacert`` verifies the server (None: the system's CAs), ``cert`` and
    ``key`` are the client certificate (``key`` may be omitted if ``cert`` holds it)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """The SSL context; UsageError naming the file that cannot be used."""
        if self.key and not self.cert:
            raise UsageError(f"etcd TLS: a client key ({self.key}) needs its certificate (cert)")
        try:
            ctx = ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"etcd TLS: cannot use CA file {self.cacert}: {exc}") from None
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"etcd TLS: cannot use client certificate {self.cert}"
                                 f"{f' with key {self.key}' if self.key else ''}: {exc}") from None
        return ctx


class _Canceled(Exception):
    """etcd ended a watch on purpose (compaction); etcd itself is fine."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    create_revision: int = 0

    @staticmethod
    def from_json(raw: JSON) -> KeyValue:
        return KeyValue(
            _unb64(raw["key"]).decode(errors="replace"),
            _unb64(raw.get("value", "")),
            int(raw.get("mod_revision", 0)),
            int(raw.get("lease", 0)),
            int(raw.get("create_revision", 0)),
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


@dataclass(frozen=True)
class Compare:
    """One guard of a transaction: ``key``'s ``target`` (``"MOD"``, ``"CREATE"``, ``"VALUE"``)
    ``result`` (``"EQUAL"``, ``"LESS"``, ...) ``value``. A missing key has revisions 0."""

    key: str
    target: Literal["MOD", "CREATE", "VERSION", "VALUE"]
    value: int | bytes
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"] = "EQUAL"

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        """``key`` is as last read (``mod_revision`` 0: it still does not exist)."""
        return Compare(key, "MOD", mod_revision)

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "CREATE", 0)

    def to_json(self) -> JSON:
        field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
                 "VALUE": "value"}[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key), "target": self.target, "result": self.result,
                field: value}


@dataclass(frozen=True)
class Op:
    """One operation of a transaction: a put, a delete, or a read."""

    kind: Literal["put", "delete", "range"]
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @staticmethod
    def put(key: str, value: bytes | str, lease: int = 0) -> Op:
        return Op("put", key, value.encode() if isinstance(value, str) else value, lease)

    @staticmethod
    def delete(key: str) -> Op:
        return Op("delete", key)

    @staticmethod
    def get(key: str, *, prefix: bool = False) -> Op:
        return Op("range", key, prefix=prefix)

    def to_json(self) -> JSON:
        body: JSON = {"key": _b64(self.key)}
        if self.prefix:
            body["range_end"] = _b64(_prefix_end(self.key.encode()))
        if self.kind == "put":
            body["value"] = _b64(self.value)
            if self.lease:
                body["lease"] = str(self.lease)
        name = {"put": "request_put", "delete": "request_delete_range",
                "range": "request_range"}[self.kind]
        return {name: body}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    """The store's revision after the transaction (that of its writes, if it wrote)."""
    ranges: tuple[Range, ...]
    """What the transaction's reads returned, in order."""


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
        self._urls = _parse_endpoints(endpoints, "https" if tls else "http")
        if tls and any(u.startswith("http://") for u in self._urls):
            raise UsageError(f"etcd TLS options given but {endpoints!r} names an http:// "
                             "endpoint: use https:// or no scheme")
        self._tls = tls
        self._ssl: ssl.SSLContext | None = tls.context() if tls else None
        verify: ssl.SSLContext | bool = self._ssl or True
        if user is not None and password is None:
            password = os.environ.get(PASSWORD_ENV)
            if password is None:
                raise UsageError(f"etcd user {user!r} needs a password: \"password\" in "
                                 f"--config-driver or the environment variable {PASSWORD_ENV}")
        self._user = user
        self._password = password
        self._token: str | None = None  # None: not authenticated yet; "": auth is disabled
        self._auth_lock = asyncio.Lock()
        self._current = 0
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False, verify=verify)
        self._connected = True
        self._last_error: str | None = None

    @property
    def user(self) -> str | None:
        return self._user

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

    async def txn(self, compare: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResult:
        """If every ``compare`` holds, do ``success``, else ``failure``: atomically."""
        body: JSON = {"compare": [c.to_json() for c in compare],
                      "success": [op.to_json() for op in success],
                      "failure": [op.to_json() for op in failure or []]}
        return await self._call("/v3/kv/txn", body, _parse_txn)

    async def lease_grant(self, ttl: int) -> int:
        return await self._call("/v3/lease/grant", {"TTL": str(ttl)}, lambda d: int(d["ID"]))

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
            return await self._call("/v3/lease/keepalive", body, parse)
        try:
            return parse(await self._post_authenticated(url, "/v3/lease/keepalive", body))
        except _Unreachable as exc:
            raise StoreUnavailable(f"etcd at {url}: {_describe(exc, self._tls)}") from exc

    async def ping(self, url: str, key: str = "/") -> None:
        """One cheap call to ``url`` (a count-only range): StoreUnavailable if it fails."""
        try:
            await self._post_authenticated(url, "/v3/kv/range",
                                           {"key": _b64(key), "count_only": True})
        except _Unreachable as exc:
            raise StoreUnavailable(f"etcd at {url}: {_describe(exc, self._tls)}") from exc

    async def lease_revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)}, lambda d: None)

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
        url = self._urls[self._current]
        next_revision = start_revision
        token: str | None = None
        reauthenticated = renew = False
        while True:
            request: JSON = {"key": _b64(key), "start_revision": str(next_revision)}
            if prefix:
                request["range_end"] = _b64(_prefix_end(key.encode()))
            try:
                if renew:
                    renew = False
                    await self._reauthenticate(url, token)
                token = await self._ensure_token(url)
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(self._timeout):
                        response = await stack.enter_async_context(
                            self._http.stream(
                                "POST",
                                f"{url}/v3/watch",
                                json={"create_request": request},
                                headers=_auth_header(token),
                                timeout=httpx.Timeout(self._timeout, read=None),
                            )
                        )
                    if response.status_code != 200:
                        await response.aread()
                        _raise_for_answer(url, "/v3/watch", response.status_code,
                                          _json_or_none(response.content), response.text)
                    lines = cast(AsyncGenerator[str, None], response.aiter_lines())
                    await stack.enter_async_context(contextlib.aclosing(lines))
                    while True:
                        line = await self._next_line(url, key, lines, probe, probe_interval)
                        for event in _watch_events(line):
                            next_revision = event.kv.mod_revision + 1
                            reauthenticated = False
                            yield event
            except _TokenInvalid as exc:
                # Opened with an expired token: authenticate again and reopen once.
                if reauthenticated or not self._user:
                    raise StoreUnavailable(f"etcd at {url} refused the watch on {key}: "
                                           f"{exc}") from exc
                log.info("etcd auth token of user %s no longer valid (%s): authenticating "
                         "again", self._user, exc)
                reauthenticated = renew = True
            except _Canceled as exc:
                raise StoreUnavailable(f"etcd at {url} canceled the watch on {key}: "
                                       f"{exc}") from exc
            except (_Unreachable, httpx.HTTPError, TimeoutError, ValueError, KeyError) as exc:
                reason = _describe(exc, self._tls)
                if isinstance(exc, httpx.HTTPError):
                    reason = str(await self._classify(url, exc))
                self._failed(f"{url}: {reason}")
                self._rotate()
                raise StoreUnavailable(f"watch on {key} at etcd {url} broke: {reason}") from exc
            except AuthFailed as exc:
                self._failed(str(exc))
                raise

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _next_line(self, url: str, key: str, lines: AsyncIterator[str],
                         probe: Callable[[str], Awaitable[object]] | None = None,
                         interval: float | None = None) -> str:
        """The next line of a watch stream, probing ``url`` whenever the stream is quiet."""
        read = asyncio.ensure_future(_anext_or_none(lines))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=interval or self._probe_interval)
                if done:
                    break
                if probe is None:
                    await self._post_authenticated(url, "/v3/kv/range",
                                                   {"key": _b64(key), "count_only": True})
                else:
                    try:
                        await probe(url)
                    except StoreUnavailable as exc:
                        raise _Unreachable(str(exc)) from exc
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
        only_tls = True
        start = self._current
        # Each endpoint once, in order from the current one; concurrent calls and watches
        # move ``_current`` too, so this loop keeps its own position.
        for offset in range(len(self._urls)):
            index = (start + offset) % len(self._urls)
            url = self._urls[index]
            try:
                data = await self._post_authenticated(url, path, body)
                try:
                    result = parse(data)
                except (KeyError, ValueError, TypeError, AttributeError) as exc:
                    raise _Unreachable(f"unexpected answer to {path}: {exc!r}") from exc
            except _Unreachable as exc:
                failures.append(f"{url}: {_describe(exc, self._tls)}")
                only_tls = only_tls and isinstance(exc, _TLSFailed)
                if self._current == index:
                    self._rotate()
                continue
            except AuthFailed as exc:
                self._failed(str(exc))
                raise
            except StoreUnavailable:
                self._current = index
                self._succeeded()  # etcd answered, with a refusal
                raise
            self._current = index
            self._succeeded()
            return result
        reason = "; ".join(failures)
        self._failed(reason)
        if only_tls:
            raise StoreUnavailable(f"etcd TLS handshake failed ({reason})")
        raise StoreUnavailable(f"etcd unreachable ({reason})")

    async def _post_authenticated(self, url: str, path: str, body: JSON) -> JSON:
        """``_post`` with the auth token; an expired one is renewed once and the call repeated."""
        token = await self._ensure_token(url)
        try:
            return await self._post(url, path, body, token)
        except _TokenInvalid as exc:
            if not self._user:
                raise StoreUnavailable(f"etcd at {url} refused {path}: {exc} (etcd has auth "
                                       "enabled: give a user and password)") from exc
            log.info("etcd auth token of user %s no longer valid (%s): authenticating again",
                     self._user, exc)
            await self._reauthenticate(url, token)
            try:
                return await self._post(url, path, body, await self._ensure_token(url))
            except _TokenInvalid as again:
                raise StoreUnavailable(f"etcd at {url} refused {path} with a fresh token of "
                                       f"user {self._user}: {again}") from again

    async def _ensure_token(self, url: str) -> str | None:
        """The token to send (None: no auth), authenticating at ``url`` first if needed."""
        if not self._user:
            return None
        if self._token is None:
            async with self._auth_lock:
                if self._token is None:
                    self._token = await self._authenticate(url)
        return self._token or None

    async def _reauthenticate(self, url: str, stale: str | None) -> None:
        """Replace the token ``stale`` (unless a concurrent call already did)."""
        async with self._auth_lock:
            if self._token == (stale or ""):
                self._token = await self._authenticate(url)

    async def _authenticate(self, url: str) -> str:
        """A fresh token ("" if etcd has auth disabled); AuthFailed for a wrong password."""
        assert self._user is not None and self._password is not None
        try:
            data = await self._post(url, "/v3/auth/authenticate",
                                    {"name": self._user, "password": self._password}, None)
        except _AuthDisabled:
            log.info("etcd at %s has auth disabled: calls go without a token", url)
            return ""
        except _TokenInvalid as exc:
            raise AuthFailed(f"etcd refused user {self._user}: {exc}") from exc
        except StoreUnavailable as exc:
            if isinstance(exc, AuthFailed):
                raise
            raise AuthFailed(f"etcd refused user {self._user}: {exc}") from exc
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise _Unreachable(f"etcd at {url} answered authenticate without a token")
        return token

    async def _post(self, url: str, path: str, body: JSON, token: str | None = None) -> JSON:
        """One call to one endpoint, bounded by the timeout as a whole."""
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._http.post(f"{url}{path}", json=body,
                                                  headers=_auth_header(token))
        except TimeoutError as exc:
            raise _Unreachable(f"no answer within {self._timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise await self._classify(url, exc) from exc
        data = _json_or_none(response.content)
        if isinstance(data, dict) and response.status_code == 200 and "error" not in data:
            return data
        _raise_for_answer(url, path, response.status_code, data, response.text, self._user)

    async def _classify(self, url: str, exc: httpx.HTTPError) -> _Unreachable:
        """What a transport error means, looking closer at https connections that broke."""
        error = _transport_error(exc, self._tls)
        if (isinstance(error, _TLSFailed) or not url.startswith("https://")
                or not isinstance(exc, httpx.ReadError | httpx.WriteError
                                  | httpx.RemoteProtocolError)):
            return error
        # A server that refuses our client certificate (or its absence) alerts after the
        # TLS 1.3 handshake, and the request's write often fails first with a bare broken
        # pipe: open a bare TLS connection and read what the server says.
        diagnosis = await self._tls_alert(url)
        if diagnosis is None:
            return error
        return _transport_error(httpx.ConnectError(str(diagnosis)), self._tls, diagnosis)

    async def _tls_alert(self, url: str) -> ssl.SSLError | None:
        """The TLS alert ``url`` sends right after a handshake, if any."""
        target = httpx.URL(url)
        host, port = target.host, target.port or 443
        try:
            async with asyncio.timeout(min(self._timeout, 1.0)):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._ssl or ssl.create_default_context(),
                    server_hostname=host)
                try:
                    await reader.read(1)
                finally:
                    writer.close()
        except ssl.SSLError as alert:
            return alert
        except (OSError, TimeoutError):
            pass
        return None

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


async def _anext_or_none(lines: AsyncIterator[str]) -> str | None:
    return await anext(lines, None)


def _auth_header(token: str | None) -> dict[str, str]:
    return {"Authorization": token} if token else {}


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _raise_for_answer(url: str, path: str, status: int, data: Any, text: str,
                      user: str | None = None) -> NoReturn:
    """Turn an error answer of the gateway into the right exception."""
    if not isinstance(data, dict):
        if 400 <= status < 500:  # the gateway itself refused, in plain text
            hint = (" (with auth enabled, etcd's gateway refuses a client certificate that has "
                    "a CommonName: use one without CN)" if "CommonName" in text else "")
            raise StoreUnavailable(f"etcd at {url} refused {path}: HTTP {status}: "
                                   f"{text.strip()[:200]}{hint}")
        raise _Unreachable(f"unexpected answer to {path} (HTTP {status}): {text.strip()[:100]}")
    # Unary errors are {"error": msg, "code": n}; streamed ones {"error": {"grpc_code": n}}.
    error = data["error"] if isinstance(data.get("error"), dict) else data
    message = str(error.get("message") or error.get("error") or f"HTTP {status}")
    code = error.get("code", error.get("grpc_code"))
    if code == _GRPC_NOT_FOUND and "lease" in message:
        raise LeaseNotFound(f"etcd at {url}: {message}")
    if path == "/v3/auth/authenticate":
        if "authentication is not enabled" in message:
            raise _AuthDisabled(message)
        if "authentication failed" in message:
            raise AuthFailed(f"etcd refused user {user}: authentication failed ({message})")
    elif code == _GRPC_UNAUTHENTICATED or status == 401 or any(
            s in message for s in _STALE_TOKEN):
        raise _TokenInvalid(message)
    if code in _GRPC_TRANSIENT or status == 408 or status >= 500:
        raise _Unreachable(message)
    raise StoreUnavailable(f"etcd at {url} refused {path}: {message}")


def _transport_error(exc: httpx.HTTPError, tls: EtcdTLS | None,
                     cause: BaseException | None = None) -> _Unreachable:
    """The failure of one request, telling TLS handshake failures from the network."""
    cause = cause or exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return _Unreachable(_describe(exc, plain=True))
    if isinstance(cause, ssl.SSLCertVerificationError):
        against = f"CA {tls.cacert}" if tls and tls.cacert else "the system's CAs"
        return _TLSFailed(f"the server's certificate could not be verified against {against}: "
                          f"{cause.verify_message or cause.reason}")
    reason = str(cause.reason or cause)
    if "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        if not (tls and tls.cert):
            return _TLSFailed("the server requires a client certificate and none was given "
                              f"(set cert and key): {reason}")
        return _TLSFailed(f"the server rejected the client certificate {tls.cert}: {reason}")
    if "UNKNOWN_CA" in reason:
        return _TLSFailed(f"the server does not trust the client certificate "
                          f"{tls.cert if tls else ''}: {reason}")
    return _TLSFailed(f"TLS handshake failed: {reason}")


def _watch_events(line: str) -> list[WatchEvent]:
    data = json.loads(line)
    if "error" in data:
        raise _Unreachable(f"watch error: {data['error']}")
    result = data.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"
        if any(s in reason for s in _STALE_TOKEN):
            raise _TokenInvalid(reason)
        raise _Canceled(reason)
    return [
        WatchEvent("DELETE" if ev.get("type") == "DELETE" else "PUT", KeyValue.from_json(ev["kv"]))
        for ev in result.get("events", [])
    ]


def _parse_endpoints(addr: str, scheme: str = "http") -> list[str]:
    urls = [a.strip().rstrip("/") for a in addr.split(",") if a.strip()]
    if not urls:
        raise UsageError(f"etcd address {addr!r} names no endpoint (expected host:port[,...])")
    return [u if "://" in u else f"{scheme}://{u}" for u in urls]


def _parse_range(data: JSON) -> Range:
    kvs = tuple(KeyValue.from_json(kv) for kv in data.get("kvs", []))
    return Range(kvs, _revision(data))


def _parse_txn(data: JSON) -> TxnResult:
    ranges = tuple(_parse_range(r["response_range"]) for r in data.get("responses", [])
                   if "response_range" in r)
    return TxnResult(bool(data.get("succeeded", False)), _revision(data), ranges)


def _revision(data: JSON) -> int:
    return int(data.get("header", {}).get("revision", 0))


def _describe(exc: BaseException, tls: EtcdTLS | None = None, *, plain: bool = False) -> str:
    if isinstance(exc, httpx.HTTPError) and not plain:
        return str(_transport_error(exc, tls))
    text = str(exc)
    if isinstance(exc, _Unreachable):
        return text
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
