"""HAProxy's Runtime API over its admin socket: one command per connection.

One connection per command costs a Unix-socket connect (tens of microseconds) and never
leaves a half-read answer behind when a command fails or HAProxy restarts mid-round.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from corral.core.balance import Server, parse_servers_state, parse_sessions
from corral.errors import CorralError

__all__ = ["HAProxyError", "HAProxyUnreachable", "Runtime", "RuntimeAPI", "sample_config"]

log = logging.getLogger("corral.balance")

# Answers that say a command did not do what it was asked (the Runtime API answers text,
# with no status code; a successful command answers nothing or a short confirmation).
_REFUSALS = ("No such", "Unknown", "cannot", "Cannot", "Only servers", "not found",
             "Require", "error", "Error", "invalid", "Invalid", "already exists",
             "Already exists", "still has", "Permission denied")


class HAProxyError(CorralError):
    """The admin socket could not be reached, or a command was refused."""


class HAProxyUnreachable(HAProxyError):
    """The admin socket did not answer (HAProxy down or restarting)."""


class Runtime(Protocol):
    """What the balancer asks of HAProxy (:class:`RuntimeAPI`, or a fake in tests)."""

    socket_path: str

    async def run(self, command: str) -> None: ...

    async def servers(self, backend: str) -> list[Server]: ...


class RuntimeAPI:
    def __init__(self, socket_path: str, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def call(self, command: str) -> str:
        """The answer to ``command``; HAProxyError if the socket cannot be reached."""
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
                try:
                    writer.write(command.encode() + b"\n")
                    await writer.drain()
                    answer = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            raise HAProxyUnreachable(f"HAProxy's admin socket {self.socket_path}: "
                               f"{exc or type(exc).__name__}") from exc
        return answer.decode(errors="replace")

    async def run(self, command: str) -> None:
        """Run a command that changes something; HAProxyError if it was refused."""
        answer = (await self.call(command)).strip()
        if any(word in answer for word in _REFUSALS):
            raise HAProxyError(f"{command!r}: {answer}")
        log.debug("haproxy: %s -> %s", command, answer or "ok")

    async def servers(self, backend: str) -> list[Server]:
        """The backend's servers with their sessions in flight; HAProxyError if the backend
        does not exist."""
        state = await self.call(f"show servers state {backend}")
        if "Can't find backend" in state or "No such backend" in state:
            raise HAProxyError(f"HAProxy has no backend {backend!r}")
        stat = await self.call(f"show stat {backend} 4 -1")
        sessions = parse_sessions(stat, backend)
        return [Server(s.name, s.address, s.port, s.admin, sessions.get(s.name, 0), s.up)
                for s in parse_servers_state(state, backend)]


def sample_config(backend: str, socket_path: str, listen: str = "0.0.0.0:8000") -> str:
    """A minimal haproxy.cfg for ``corral balance --print-config``: a front end, an empty
    backend that ``corral balance`` fills, health checks on /health, retries and the admin
    socket."""
    return f"""\
global
    stats socket {socket_path} mode 600 level admin
    # corral balance adds and removes servers at run time: keep them across reloads
    # with 'server-state-file' if you like; corral balance re-adds them anyway.

defaults
    mode http
    timeout connect 2s
    timeout client 10m
    timeout server 10m     # completions may stream for minutes
    timeout queue 30s
    option redispatch
    retries 2
    retry-on conn-failure empty-response response-timeout

frontend corral
    bind {listen}
    default_backend {backend}

backend {backend}
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    # no 'server' lines: corral balance adds one per live instance ({backend}/corral-...)
"""
