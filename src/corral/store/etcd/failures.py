"""What an answer of etcd's gateway (or its absence) means: the driver's exceptions.

::

    StoreUnavailable              (corral.errors) etcd answered with a refusal, or nobody did
     +-- LeaseNotFound            the lease expired or was revoked
     +-- AuthFailed               wrong user or password: retrying will not help
    Unreachable                   one endpoint did not answer usefully: try the next one
     +-- TLSFailed                its TLS handshake failed (certificates, not the network)
    TokenInvalid                  our auth token expired: authenticate again, once

Only :class:`StoreUnavailable` and its subclasses leave the driver; the transport turns the
others into it.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import httpx

from corral.errors import StoreUnavailable
from corral.store.etcd.tls import EtcdTLS, ssl_cause, tls_failure

__all__ = [
    "AuthFailed",
    "AuthDisabled",
    "LeaseNotFound",
    "TLSFailed",
    "TokenInvalid",
    "Unreachable",
    "describe",
    "is_stale_token",
    "json_or_none",
    "raise_for_answer",
    "transport_error",
]

_GRPC_NOT_FOUND = 5
_GRPC_UNAUTHENTICATED = 16
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty",
                "Unauthenticated")
_GRPC_TRANSIENT = {1, 4, 14}  # canceled (gateway answers 408), deadline exceeded, unavailable


class LeaseNotFound(StoreUnavailable):
    """The lease expired or was revoked: grant a new one."""


class AuthFailed(StoreUnavailable):
    """etcd refused the user's name or password: fix the settings, retrying will not help."""


class Unreachable(Exception):
    """This endpoint did not answer usefully; another one may."""


class TLSFailed(Unreachable):
    """The TLS handshake with this endpoint failed (certificates, not the network)."""


class TokenInvalid(Exception):
    """etcd no longer accepts our auth token (expired): authenticate again."""


class AuthDisabled(Exception):
    """etcd answered authenticate with "authentication is not enabled"."""


def is_stale_token(message: str) -> bool:
    """Whether etcd's ``message`` says our auth token is no longer accepted."""
    return any(s in message for s in _STALE_TOKEN)


def describe(exc: BaseException, tls: EtcdTLS | None = None) -> str:
    """One failure of one endpoint, in words."""
    if isinstance(exc, httpx.HTTPError):
        return str(transport_error(exc, tls))
    text = str(exc)
    if isinstance(exc, Unreachable):
        return text
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def transport_error(exc: httpx.HTTPError, tls: EtcdTLS | None,
                    cause: BaseException | None = None) -> Unreachable:
    """The failure of one request, telling TLS handshake failures from the network."""
    found = ssl_cause(cause or exc)
    if found is None:
        text = str(exc)
        return Unreachable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return TLSFailed(tls_failure(found, tls))


def json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def raise_for_answer(url: str, path: str, status: int, data: Any, text: str,
                      user: str | None = None) -> NoReturn:
    """Turn an error answer of the gateway into the right exception."""
    if not isinstance(data, dict):
        if 400 <= status < 500:  # the gateway itself refused, in plain text
            hint = (" (with auth enabled, etcd's gateway refuses a client certificate that has "
                    "a CommonName: use one without CN)" if "CommonName" in text else "")
            raise StoreUnavailable(f"etcd at {url} refused {path}: HTTP {status}: "
                                   f"{text.strip()[:200]}{hint}")
        raise Unreachable(f"unexpected answer to {path} (HTTP {status}): {text.strip()[:100]}")
    # Unary errors are {"error": msg, "code": n}; streamed ones {"error": {"grpc_code": n}}.
    error = data["error"] if isinstance(data.get("error"), dict) else data
    message = str(error.get("message") or error.get("error") or f"HTTP {status}")
    code = error.get("code", error.get("grpc_code"))
    if code == _GRPC_NOT_FOUND and "lease" in message:
        raise LeaseNotFound(f"etcd at {url}: {message}")
    if path == "/v3/auth/authenticate":
        if "authentication is not enabled" in message:
            raise AuthDisabled(message)
        if "authentication failed" in message:
            raise AuthFailed(f"etcd refused user {user}: authentication failed ({message})")
    elif code == _GRPC_UNAUTHENTICATED or status == 401 or is_stale_token(message):
        raise TokenInvalid(message)
    if code in _GRPC_TRANSIENT or status == 408 or status >= 500:
        raise Unreachable(message)
    raise StoreUnavailable(f"etcd at {url} refused {path}: {message}")
