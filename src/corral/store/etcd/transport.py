"""HTTP to etcd's JSON gateway: endpoint failover, auth tokens, and what a failure means.

Theory of operation
-------------------
:class:`GatewayTransport` POSTs one JSON body per call, each under a timeout. With several
endpoints (``"h1:2379,h2:2379"``) the next one is tried when a call fails. Transport and
gateway errors become :class:`StoreUnavailable` here and nowhere else (the watch, which
streams, gets the pieces: :meth:`~GatewayTransport.stream` and ``next_line``); the transport
remembers whether its last call reached etcd (``is_connected``) for status pages.

TLS and auth, as etcd is run in production
------------------------------------------
``tls=EtcdTLS(cacert, cert, key)`` makes endpoints without a scheme ``https://``: ``cacert``
verifies the server (else the system's CAs), ``cert``/``key`` are the client certificate
for ``--client-cert-auth``. Handshake failures are errors of their own, never timeouts: a
server certificate that does not verify, a server that wants a client certificate
(:mod:`.tls` tells them apart).
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
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

import httpx

from corral.errors import StoreUnavailable, UsageError
from corral.store.etcd.failures import (
    AuthDisabled,
    AuthFailed,
    TLSFailed,
    TokenInvalid,
    Unreachable,
    describe,
    json_or_none,
    raise_for_answer,
    transport_error,
)
from corral.store.etcd.tls import EtcdTLS, tls_alert
from corral.store.etcd.wire import JSON, b64

__all__ = ["PASSWORD_ENV", "GatewayTransport", "parse_endpoints"]

log = logging.getLogger("corral.store.etcd")  # one logger name for the whole driver

PASSWORD_ENV = "CORRAL_ETCD_PASSWORD"
_T = TypeVar("_T")


class GatewayTransport:
    """POSTs to etcd's gateway with failover and auth; every failure is a StoreUnavailable."""

    def __init__(self, endpoints: str, *, timeout: float, probe_interval: float,
                 tls: EtcdTLS | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        """See :class:`~corral.store.etcd.client.EtcdClient`: it takes the same settings."""
        self._urls = parse_endpoints(endpoints, "https" if tls else "http")
        if tls and any(u.startswith("http://") for u in self._urls):
            raise UsageError(f"etcd TLS options given but {endpoints!r} names an http:// "
                             "endpoint: use https:// or no scheme")
        self._tls = tls
        self._ssl: ssl.SSLContext | None = tls.context() if tls else None
        if user is not None and password is None:
            password = os.environ.get(PASSWORD_ENV)
            if password is None:
                raise UsageError(f"etcd user {user!r} needs a password: \"password\" in "
                                 f"--config-driver or the environment variable {PASSWORD_ENV}")
        self.user = user
        self._password = password
        self.token: str | None = None  # None: not authenticated yet; "": auth is disabled
        self._auth_lock = asyncio.Lock()
        self.current = 0
        """The index of the endpoint calls go to first."""
        self.timeout = timeout
        self.probe_interval = probe_interval
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=False,
                                       verify=self._ssl or True)
        self.is_connected = True
        """Whether the last call reached etcd (True until the first call fails)."""
        self.last_error: str | None = None
        """Why the last call failed, while ``is_connected`` is False."""

    @property
    def endpoints(self) -> str:
        return ",".join(self._urls)

    @property
    def url(self) -> str:
        """The endpoint calls go to first."""
        return self._urls[self.current]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: JSON, parse: Callable[[JSON], _T]) -> _T:
        """POST to the current endpoint, then to each other one, and ``parse`` the answer.

        The one exit for errors of unary calls: StoreUnavailable (or LeaseNotFound) only.
        """
        failures: list[str] = []
        only_tls = True
        start = self.current
        # Each endpoint once, in order from the current one; concurrent calls and watches
        # move ``current`` too, so this loop keeps its own position.
        for offset in range(len(self._urls)):
            index = (start + offset) % len(self._urls)
            url = self._urls[index]
            try:
                data = await self.post(url, path, body)
                try:
                    result = parse(data)
                except (KeyError, ValueError, TypeError, AttributeError) as exc:
                    raise Unreachable(f"unexpected answer to {path}: {exc!r}") from exc
            except Unreachable as exc:
                failures.append(f"{url}: {self.describe(exc)}")
                only_tls = only_tls and isinstance(exc, TLSFailed)
                if self.current == index:
                    self.rotate()
                continue
            except AuthFailed as exc:
                self.failed(str(exc))
                raise
            except StoreUnavailable:
                self.current = index
                self.succeeded()  # etcd answered, with a refusal
                raise
            self.current = index
            self.succeeded()
            return result
        reason = "; ".join(failures)
        self.failed(reason)
        if only_tls:
            raise StoreUnavailable(f"etcd TLS handshake failed ({reason})")
        raise StoreUnavailable(f"etcd unreachable ({reason})")

    async def call_at(self, url: str, path: str, body: JSON) -> JSON:
        """One call to ``url`` only; StoreUnavailable if it fails."""
        try:
            return await self.post(url, path, body)
        except Unreachable as exc:
            raise StoreUnavailable(f"etcd at {url}: {self.describe(exc)}") from exc

    async def post(self, url: str, path: str, body: JSON) -> JSON:
        """One call with the auth token; an expired one is renewed once and the call repeated.
        Unreachable if ``url`` did not answer usefully."""
        token = await self.token_for(url)
        try:
            return await self._post(url, path, body, token)
        except TokenInvalid as exc:
            if not self.user:
                raise StoreUnavailable(f"etcd at {url} refused {path}: {exc} (etcd has auth "
                                       "enabled: give a user and password)") from exc
            log.info("etcd auth token of user %s no longer valid (%s): authenticating again",
                     self.user, exc)
            await self.renew_token(url, token)
            try:
                return await self._post(url, path, body, await self.token_for(url))
            except TokenInvalid as again:
                raise StoreUnavailable(f"etcd at {url} refused {path} with a fresh token of "
                                       f"user {self.user}: {again}") from again

    @contextlib.asynccontextmanager
    async def stream(self, url: str, path: str, body: JSON,
                     token: str | None) -> AsyncIterator[AsyncIterator[str]]:
        """The lines of a streamed answer (a watch). Transport errors, while opening or
        reading, come out as Unreachable; an expired token as TokenInvalid."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self.timeout):
                    response = await stack.enter_async_context(self._http.stream(
                        "POST", f"{url}{path}", json=body, headers=_auth_header(token),
                        timeout=httpx.Timeout(self.timeout, read=None)))
                if response.status_code != 200:
                    await response.aread()
                    raise_for_answer(url, path, response.status_code,
                                      json_or_none(response.content), response.text)
                lines = cast(AsyncGenerator[str, None], response.aiter_lines())
                await stack.enter_async_context(contextlib.aclosing(lines))
                yield lines
        except httpx.HTTPError as exc:
            raise await self._classify(url, exc) from exc
        except ssl.SSLError as exc:  # httpcore does not wrap an alert read mid-response
            raise transport_error(httpx.ConnectError(str(exc)), self._tls, exc) from exc

    async def next_line(self, url: str, key: str, lines: AsyncIterator[str],
                        probe: Callable[[str], Awaitable[object]] | None = None,
                        interval: float | None = None) -> str:
        """The next line of a watch stream on ``key``, probing ``url`` whenever the stream is
        quiet (default: a count-only range): a frozen etcd keeps its connections open."""
        read = asyncio.ensure_future(_anext_or_none(lines))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=interval or self.probe_interval)
                if done:
                    break
                if probe is None:
                    await self.post(url, "/v3/kv/range", {"key": b64(key), "count_only": True})
                else:
                    try:
                        await probe(url)
                    except StoreUnavailable as exc:
                        raise Unreachable(str(exc)) from exc
                self.succeeded()
            line = read.result()
        finally:
            if not read.done():
                read.cancel()
                await asyncio.wait({read})
        if line is None:
            raise Unreachable("etcd closed the watch stream")
        return line

    async def token_for(self, url: str) -> str | None:
        """The token to send (None: no auth), authenticating at ``url`` first if needed."""
        if not self.user:
            return None
        if self.token is None:
            async with self._auth_lock:
                if self.token is None:
                    self.token = await self._authenticate(url)
        return self.token or None

    async def renew_token(self, url: str, stale: str | None) -> None:
        """Replace the token ``stale`` (unless a concurrent call already did)."""
        async with self._auth_lock:
            if self.token == (stale or ""):
                self.token = await self._authenticate(url)

    async def _authenticate(self, url: str) -> str:
        """A fresh token ("" if etcd has auth disabled); AuthFailed for a wrong password."""
        assert self.user is not None and self._password is not None
        try:
            data = await self._post(url, "/v3/auth/authenticate",
                                    {"name": self.user, "password": self._password}, None)
        except AuthDisabled:
            log.info("etcd at %s has auth disabled: calls go without a token", url)
            return ""
        except TokenInvalid as exc:
            raise AuthFailed(f"etcd refused user {self.user}: {exc}") from exc
        except StoreUnavailable as exc:
            if isinstance(exc, AuthFailed):
                raise
            raise AuthFailed(f"etcd refused user {self.user}: {exc}") from exc
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise Unreachable(f"etcd at {url} answered authenticate without a token")
        return token

    async def _post(self, url: str, path: str, body: JSON, token: str | None = None) -> JSON:
        """One call to one endpoint, bounded by the timeout as a whole."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._http.post(f"{url}{path}", json=body,
                                                  headers=_auth_header(token))
        except TimeoutError as exc:
            raise Unreachable(f"no answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise await self._classify(url, exc) from exc
        except ssl.SSLError as exc:  # httpcore does not wrap an alert read mid-response
            raise transport_error(httpx.ConnectError(str(exc)), self._tls, exc) from exc
        data = json_or_none(response.content)
        if isinstance(data, dict) and response.status_code == 200 and "error" not in data:
            return data
        raise_for_answer(url, path, response.status_code, data, response.text, self.user)

    async def _classify(self, url: str, exc: httpx.HTTPError) -> Unreachable:
        """What a transport error means, looking closer at https connections that broke."""
        error = transport_error(exc, self._tls)
        if (isinstance(error, TLSFailed) or not url.startswith("https://")
                or not isinstance(exc, httpx.ReadError | httpx.WriteError
                                  | httpx.RemoteProtocolError)):
            return error
        # A server that refuses our client certificate (or its absence) alerts after the
        # TLS 1.3 handshake, and the request's write often fails first with a bare broken
        # pipe: open a bare TLS connection and read what the server says.
        diagnosis = await tls_alert(url, self._ssl, min(self.timeout, 1.0))
        if diagnosis is None:
            return error
        return transport_error(httpx.ConnectError(str(diagnosis)), self._tls, diagnosis)

    def describe(self, exc: BaseException) -> str:
        return describe(exc, self._tls)

    def succeeded(self) -> None:
        if not self.is_connected:
            log.info("etcd reachable again at %s", self.url)
        self.is_connected, self.last_error = True, None

    def failed(self, reason: str) -> None:
        if self.is_connected:
            log.warning("etcd unreachable: %s", reason)
        self.is_connected, self.last_error = False, reason

    def rotate(self) -> None:
        self.current = (self.current + 1) % len(self._urls)


def parse_endpoints(addr: str, scheme: str = "http") -> list[str]:
    urls = [a.strip().rstrip("/") for a in addr.split(",") if a.strip()]
    if not urls:
        raise UsageError(f"etcd address {addr!r} names no endpoint (expected host:port[,...])")
    return [u if "://" in u else f"{scheme}://{u}" for u in urls]


async def _anext_or_none(lines: AsyncIterator[str]) -> str | None:
    return await anext(lines, None)


def _auth_header(token: str | None) -> dict[str, str]:
    return {"Authorization": token} if token else {}
