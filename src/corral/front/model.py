"""The front door's vocabulary: an upstream, the settings, and the statistics snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class Upstream(NamedTuple):
    """One llama-server the front door can forward to (a generation on a loopback port).

    A named tuple, not a dataclass: it keys the in-flight counts and the pool, hashed about
    eight times per request, and a tuple's hash and equality run in C."""

    host: str
    port: int
    generation: int


@dataclass(frozen=True, slots=True)
class FrontSettings:
    """Limits of the held queue, of the crash retry and of client connections.

    ``retry_grace_s``: a request whose upstream failed before answering a byte, while that
    upstream is still the active one, waits this long for the controller to notice the crash
    (``hold()`` or ``route_to()``) before it is retried on the same upstream anyway.
    """

    max_held: int = 256
    hold_timeout_s: float = 120.0
    retry_after_s: int = 2
    retry_grace_s: float = 2.0
    # The edge (corral.core.edge): a connection with no request in progress is closed after
    # idle_timeout_s; a request head must arrive whole within header_timeout_s of its first
    # byte (else 408) and be at most max_head_bytes (else 431); 0 turns a timeout off. At
    # max_connections (None: derived from the open-file limit at serve()) a new connection
    # replaces the longest-idle one, or gets 503 when none is idle.
    idle_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    max_connections: int | None = None
    max_head_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class FrontStats:
    """What the front door has done, for ``/v1/status`` (a snapshot; counters since start).

    ``failed`` counts the answers the front door gave itself, by reason: ``held_overflow``,
    ``hold_timeout``, ``refused``, ``bad_gateway``, ``bad_request``, ``header_timeout``
    (408), ``header_too_large`` (431), ``too_many_connections`` (503 at the cap). ``requests_total``
    counts final responses sent to clients by status class (``2xx`` ... ``5xx``), the front
    door's own answers included. ``cut`` counts responses that ended before their last byte.
    """

    listen: str
    mode: str
    active_port: int | None
    active_generation: int | None
    in_flight: int
    held_now: int
    held_total: int
    released_total: int
    retried: int
    cut: int
    failed: Mapping[str, int] = field(default_factory=dict)
    requests_total: Mapping[str, int] = field(default_factory=dict)
    connections: int = 0        # client connections open now
    max_connections: int = 0    # the cap in force (0 before serve())
    closed_idle: int = 0        # closed after --idle-timeout, or to make room at the cap

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())
