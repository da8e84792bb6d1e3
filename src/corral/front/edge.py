"""The front door's edge: the connection cap and the idle and header timeouts, applied.

``corral.core.edge`` decides (the table of connections and their phases); this keeps the
table's clock and its sweeper, closes what the table hands back and has the door answer
408, 431 and 503 (``answer``). Client connections report their heads here directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.core.edge import Admission, ConnectionTable, sweep_interval
from corral.front.limits import connection_cap
from corral.front.model import FrontSettings
from corral.front.timings import MonotonicClock

if TYPE_CHECKING:
    from corral.front.client import ClientConn

__all__ = ["LINGER_S", "Answer", "Edge", "close_gently"]

LINGER_S = 1.0  # how long a connection answered early is read (and dropped) before closing

# (client, status, cause, message): the door answers a client before or instead of a request
Answer = Callable[["ClientConn", int, str, str], None]


class Edge:
    """Open client connections, and which of them have had their time."""

    def __init__(self, settings: FrontSettings, clock: MonotonicClock, answer: Answer) -> None:
        self.settings = settings
        self.max_head_bytes = settings.max_head_bytes
        self.table: ConnectionTable[ClientConn] = ConnectionTable(0)
        self.closed_idle = 0
        self._clock = clock
        self._answer = answer
        self._sweeper: asyncio.TimerHandle | None = None
        # A request began: the table's own method, called once per request (no wrapper).
        self.busy: Callable[[ClientConn], None] = self.table.left_idle

    @property
    def open(self) -> set[ClientConn]:
        return self.table.open

    def start(self) -> None:
        """Fix the cap (from the open-file limit unless configured) and start sweeping."""
        self.table.max_connections = connection_cap(self.settings.max_connections)
        self._sweep_later()

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # ---- what connections report --------------------------------------------------------

    def opened(self, client: ClientConn) -> bool:
        """A connection was accepted: True when it may stay (it may have evicted an idle
        one); False when it was answered 503 and is closing."""
        decision, evicted = self.table.admit(client, self._clock.monotonic())
        if evicted is not None:
            self.closed_idle += 1
            self.drop(evicted)
        if decision is Admission.REJECT:
            self._answer(client, 503, "too_many_connections",
                         f"too many connections (at most {self.table.max_connections})")
            return False
        return True

    def head_began(self, client: ClientConn) -> None:
        """A read ended with ``client``'s head begun and not whole: the header timeout runs
        from now (a head that arrives whole in one read costs nothing here)."""
        self.table.head_began(client, self._clock.monotonic())

    def head_ended(self, client: ClientConn) -> None:
        self.table.head_ended(client)

    def head_too_large(self, client: ClientConn) -> None:
        self._answer(client, 431, "header_too_large",
                     f"the request head is larger than {self.max_head_bytes} bytes")

    def went_idle(self, client: ClientConn) -> None:
        self.table.went_idle(client, self._clock.monotonic())

    def lost(self, client: ClientConn) -> None:
        self.table.forget(client)

    def drop(self, client: ClientConn, linger: bool = False) -> None:
        """Close ``client`` (it is no longer counted). ``linger`` after an answer to a
        request not read whole: what it still sends is read and dropped for a while, since
        closing with unread bytes resets the connection and the answer may be lost."""
        client.closing = True
        self.table.forget(client)
        if linger:
            close_gently(client.transport)
        else:
            client.transport.close()

    # ---- the sweep ----------------------------------------------------------------------

    def sweep(self) -> None:
        """Close the connections idle past --idle-timeout; answer 408 to the ones whose head
        is not whole after --header-timeout (a response in progress finishes first)."""
        now, s = self._clock.monotonic(), self.settings
        for client in self.table.expired_idle(now, s.idle_timeout_s):
            self.closed_idle += 1
            self.drop(client)
        for client in self.table.expired_heads(now, s.header_timeout_s):
            if not client.queue:
                self._answer(client, 408, "header_timeout", "the request head did not "
                             f"arrive whole within {s.header_timeout_s:g} s")

    def _sweep_later(self) -> None:
        every = sweep_interval(self.settings.idle_timeout_s, self.settings.header_timeout_s)
        if every is not None:
            self._sweeper = asyncio.get_running_loop().call_later(every, self._tick)

    def _tick(self) -> None:
        self.sweep()
        self._sweep_later()


def close_gently(transport: asyncio.Transport) -> None:
    """Send what is written, then FIN; keep reading (the protocol drops it) until the peer
    closes or ``LINGER_S`` passed (nginx's lingering close)."""
    if transport.is_closing():
        return
    if not transport.can_write_eof():
        transport.close()
        return
    try:
        transport.write_eof()
    except OSError:  # the peer is gone already (reset): nothing to linger for
        transport.abort()
        return
    asyncio.get_running_loop().call_later(LINGER_S, transport.abort)
