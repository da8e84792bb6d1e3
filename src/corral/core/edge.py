"""The front door as an edge: how many connections it may hold, and when one has had its time.

Theory of operation
-------------------
Every client connection is in one of three phases. IDLE: open with no request in progress
(just accepted, or between keep-alive requests); it may stay ``idle_timeout_s``. HEAD: the
first byte of a request arrived but not yet its whole head; the head must be complete within
``header_timeout_s`` of that byte, and no larger than ``max_head_bytes``. BUSY: a request
is being answered (held, forwarded, streamed); no edge timeout applies, the held queue's and
llama-server's own limits do.

The number of open client connections is capped below the open-file limit, as HAProxy
derives its ``maxconn``: a proxied request needs two descriptors (the client's and the
upstream's), and a reserve stays for the API, the logs, the store, the pid and lock files and
llama-server's pipes. At the cap a new connection takes the place of the longest-idle one
(keep-alive lets a server close an idle connection at any time; nginx reuses its idle
connections the same way); when none is idle it is answered 503 and closed at once, so the
connections being served are never starved of descriptors.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)

__all__ = ["FD_RESERVE", "Admission", "ConnectionTable", "admit", "max_connections_for",
           "nofile_target", "sweep_interval"]

FD_RESERVE = 256  # descriptors kept for everything but client and upstream connections
MIN_CONNECTIONS = 16
# With an unlimited hard limit, the soft limit is raised this far (the kernel's nr_open
# default); descriptors above it cannot be opened anyway.
NOFILE_CEILING = 1 << 20


class Admission(enum.Enum):
    ACCEPT = "accept"
    EVICT_IDLE = "evict the longest-idle connection, then accept"
    REJECT = "answer 503 and close"


def admit(open_connections: int, idle_connections: int, max_connections: int) -> Admission:
    """What to do with a connection that was just accepted."""
    if open_connections < max_connections:
        return Admission.ACCEPT
    return Admission.EVICT_IDLE if idle_connections else Admission.REJECT


def max_connections_for(nofile_soft: int, reserve: int = FD_RESERVE) -> int:
    """Client connections that fit in ``nofile_soft`` descriptors: two per proxied request
    (client and upstream) after the reserve, at least ``MIN_CONNECTIONS``."""
    return max(MIN_CONNECTIONS, (nofile_soft - reserve) // 2)


def nofile_target(soft: int, hard: int, infinity: int) -> int:
    """The soft open-file limit to raise to: the hard limit (``infinity`` is the platform's
    RLIM_INFINITY); never lower than it is."""
    if hard == infinity:
        return soft if soft == infinity else max(soft, NOFILE_CEILING)
    return max(soft, hard)


def sweep_interval(idle_timeout_s: float, header_timeout_s: float) -> float | None:
    """How often expired connections are looked for: a quarter of the shorter timeout (a
    timeout of 0 is off), so one is closed at most 25 % late, between 10 ms and 1 s; None
    when both are off."""
    on = [t for t in (idle_timeout_s, header_timeout_s) if t > 0]
    return min(1.0, max(0.01, min(on) / 4)) if on else None


class ConnectionTable(Generic[C]):
    """The open client connections and the phase of each: IDLE and HEAD ones in the order
    they entered it (oldest first), so expiry and eviction look only at the oldest.

    The shell tells it what happened (with ``now``) and closes what it hands back.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open: set[C] = set()
        self._idle: dict[C, float] = {}   # IDLE since (insertion order = age order)
        self._heads: dict[C, float] = {}  # first byte of the head at

    def admit(self, conn: C, now: float) -> tuple[Admission, C | None]:
        """A connection was accepted: the decision, and the idle one to close to make room."""
        decision = admit(len(self.open), len(self._idle), self.max_connections)
        evicted = None
        if decision is Admission.EVICT_IDLE:
            evicted = next(iter(self._idle))
            self.forget(evicted)
        if decision is not Admission.REJECT:
            self.open.add(conn)
            self._idle[conn] = now
        return decision, evicted

    def left_idle(self, conn: C) -> None:
        """A request began on ``conn``."""
        self._idle.pop(conn, None)

    def head_began(self, conn: C, now: float) -> None:
        """``conn``'s request head began at ``now`` and is not whole yet."""
        self._idle.pop(conn, None)
        if conn in self.open:
            self._heads.pop(conn, None)
            self._heads[conn] = now  # at the end: the newest

    def head_ended(self, conn: C) -> None:
        self._heads.pop(conn, None)

    def went_idle(self, conn: C, now: float) -> None:
        if conn in self.open:
            self._idle.pop(conn, None)
            self._idle[conn] = now  # at the end: the newest

    def forget(self, conn: C) -> None:
        self.open.discard(conn)
        self._idle.pop(conn, None)
        self._heads.pop(conn, None)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def expired_idle(self, now: float, timeout_s: float) -> list[C]:
        """IDLE connections past ``timeout_s`` (0: never), forgotten: the shell closes them."""
        if timeout_s <= 0:
            return []
        out = []
        for conn, since in self._idle.items():
            if now - since < timeout_s:
                break
            out.append(conn)
        for conn in out:
            self.forget(conn)
        return out

    def expired_heads(self, now: float, timeout_s: float) -> list[C]:
        """Connections whose request head is not whole ``timeout_s`` (0: never) after its
        first byte; kept until the shell closes them (``forget``)."""
        if timeout_s <= 0:
            return []
        out = []
        for conn, since in self._heads.items():
            if now - since < timeout_s:
                break
            out.append(conn)
        return out
