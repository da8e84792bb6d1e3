"""Bearer-token check and request size limit, as plain ASGI middleware.

Two tokens: the full one (every route) and an optional read-only one (``GET``/``HEAD``
only). Either may come from a file that :meth:`Tokens.reload` re-reads (on ``SIGHUP``), so
tokens rotate without a restart. After too many failed checks from one address
(:class:`~corral.core.limiter.FailureLimit`) that address gets 429 for a while, whatever it
sends. Failures are logged with the address and never with the token.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.core.limiter import FailureLimit
from corral.errors import UsageError

log = logging.getLogger("corral.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Open without a token: the health check and the web page's static files (the page then
# asks for the token and sends it with every /v1 call): one file name after /static/.
OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIX = "/static/"


def is_open(path: str) -> bool:
    name = path.removeprefix(OPEN_PREFIX)
    return path in OPEN_PATHS or (name != path and name[:1] not in ("", ".")
                                  and "/" not in name)


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]
                 | None = None) -> None:
    body = json.dumps({"status": "error", "error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class TokenSource:
    """A token given as is, or the path of a file holding it (re-read on reload)."""

    value: str | None = None
    path: Path | None = None

    def read(self, what: str) -> str | None:
        if self.path is None:
            return self.value or None
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the {what} from {self.path}: {exc}") from None
        if not token or "\n" in token:
            raise UsageError(f"{self.path} must hold one {what} on one line")
        return token


class Tokens:
    """The full token and the read-only one, as ``Bearer`` header values."""

    def __init__(self, full: TokenSource | str | None = None,
                 read: TokenSource | str | None = None) -> None:
        self.full_source = full if isinstance(full, TokenSource) else TokenSource(full)
        self.read_source = read if isinstance(read, TokenSource) else TokenSource(read)
        self.full: bytes | None = None
        self.read: bytes | None = None
        self.reload()

    @property
    def required(self) -> bool:
        return self.full is not None or self.read is not None

    @property
    def from_files(self) -> bool:
        return self.full_source.path is not None or self.read_source.path is not None

    def reload(self) -> None:
        """Read both tokens again (files may have changed); raise UsageError, keeping the
        tokens in force, if one cannot be read."""
        full = self.full_source.read("API token")
        read = self.read_source.read("read-only token")
        if read is not None and read == full:
            raise UsageError("the read-only token must differ from the full one")
        self.full = f"Bearer {full}".encode() if full else None
        self.read = f"Bearer {read}".encode() if read else None

    def grants(self, given: bytes) -> str | None:
        """"full", "read" or None (constant-time compares, both always made)."""
        full = self.full is not None and hmac.compare_digest(given, self.full)
        read = self.read is not None and hmac.compare_digest(given, self.read)
        if full:
            return "full"
        return "read" if read else None


class TokenAuth:
    """Every path but :func:`is_open`'s (``/health``, the page and its static files) needs
    ``Authorization: Bearer <token>`` (constant time); the read-only token opens
    ``GET``/``HEAD`` routes only."""

    def __init__(self, app: ASGIApp, tokens: Tokens | str | None,
                 limit: FailureLimit | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.tokens = tokens if isinstance(tokens, Tokens) else Tokens(tokens)
        self.limit = limit or FailureLimit()
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens.required:
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?",))[0]
        if self.limit.is_blocked(address, self.clock()):
            await _reply(send, 429, "too many failed token checks from this address; "
                         "try again in a second", [(b"retry-after", b"1")])
            return
        if is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        grant = None if given is None else self.tokens.grants(given)
        if grant == "full" or (grant == "read" and scope["method"] in READ_METHODS):
            await self.app(scope, receive, send)
            return
        if grant == "read":
            log.warning("%s %s from %s refused: the read-only token opens GET routes only",
                        scope["method"], scope["path"], address)
            await _reply(send, 403, "the read-only token opens GET routes only")
            return
        self._failed(address, scope, "no token" if given is None else "wrong token")
        if given is None:
            await _reply(send, 401, "this API needs 'Authorization: Bearer <token>'",
                         [(b"www-authenticate", b"Bearer")])
        else:
            await _reply(send, 403, "wrong API token")

    def _failed(self, address: str, scope: Scope, why: str) -> None:
        blocked = self.limit.failed(address, self.clock())
        log.warning("%s %s from %s: %s%s", scope["method"], scope["path"], address, why,
                    f"; {self.limit.max_failures} failures within {self.limit.window_s:g} s: "
                    f"answering 429 for {self.limit.block_s:g} s" if blocked else "")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _reply(send, 413, f"request body over {self.max_bytes} bytes")
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await _reply(send, 413, f"request body over {self.max_bytes} bytes")


class BodyTooLarge(Exception):
    pass
