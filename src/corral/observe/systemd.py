"""systemd integration without python-systemd: ``Type=notify`` and the watchdog.

Theory of operation
-------------------
**Notifications.** systemd passes ``$NOTIFY_SOCKET``, a datagram socket (a path, or an
abstract name written ``@name``); a service sends it newline-separated ``KEY=VALUE``
assignments (``sd_notify(3)``). :class:`Notifier` does that with a plain ``AF_UNIX``
``SOCK_DGRAM`` socket and is a no-op when the variable is unset, so the supervisor calls it
unconditionally. A unix datagram queue holds few messages (``net.unix.max_dgram_qlen``, 10
by default): when systemd is slow to read, a send waits (like ``sd_notify``, which waits
for ever) but at most ``send_timeout`` (2 s), then the message is dropped with a warning,
so a READY=1 is not lost to a busy PID 1 and a wedged one cannot stall the supervisor.

What to say and when is a pure function of the controller's state transitions,
:func:`transition_messages`: ``READY=1`` once llama-server is first ready; ``RELOADING=1``
(with ``MONOTONIC_USEC``) when an apply starts on a running service, and ``READY=1`` again
when the apply is over, whatever its outcome (systemd's reload ends; ``STATUS=`` says how it
went); ``STOPPING=1`` at shutdown; ``STATUS=`` with every state.

**A start-up that ends FATAL** (``--max-start-failures`` failed starts before anything was
ever ready) sends no ``READY=1``: the service never served, and saying it is ready would
make ``systemctl start`` succeed and ``Restart=`` never act. Instead the supervisor exits
with :data:`EXIT_FATAL_AT_START` (3) and the status says why (``STATUS=FATAL at start-up:
<reason>``, kept through the shutdown), so ``systemctl start`` fails at once rather than at
``TimeoutStartSec``, and ``Restart=on-failure`` / ``StartLimitBurst=`` decide what comes
next. Without ``$NOTIFY_SOCKET`` the supervisor stays up in FATAL, where an apply through
the API can clear it.

**Watchdog.** With ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``);
:meth:`Notifier.watchdog` sends ``WATCHDOG=1`` every half of it, but only while the
``alive()`` check it is given says the supervisor loop is healthy. That the coroutine runs at
all proves the event loop is not blocked.

Socket activation (``LISTEN_FDS``) is the front door's: :mod:`corral.front.activation`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from corral.core.decide import State

if TYPE_CHECKING:
    from corral.observe.events import Event

__all__ = [
    "EXIT_FATAL_AT_START",
    "Notifier",
    "NotifyMemory",
    "monotonic_usec",
    "transition_messages",
    "watchdog_interval",
]

log = logging.getLogger("corral.systemd")

EXIT_FATAL_AT_START = 3  # under systemd: the start-up ended FATAL, nothing was ever ready
_RELOADS = (State.APPLYING, State.ROLLING_BACK)  # an apply in progress, rollback included
_EXPLAINED = (State.STARTING, State.BACKOFF, State.FATAL)  # last_error says why (a crash...)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---- what to say at a state change (pure) --------------------------------------------------


@dataclass(frozen=True)
class NotifyMemory:
    """What earlier transitions told systemd: ready once? a reload open?"""

    ready_sent: bool = False
    reloading: bool = False
    stopping_sent: bool = False
    failed_start_up: str | None = None  # the status text, once a start-up ended FATAL


def status_text(state: State, detail: str | None = None) -> str:
    return _one_line(f"{state.value}: {detail}" if detail else state.value)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]  # systemctl status shows one line anyway


def transition_messages(old: State, new: State, detail: str | None, memory: NotifyMemory,
                        now_usec: int) -> tuple[list[str], NotifyMemory]:
    """The assignments to send when the controller goes from ``old`` to ``new``.

    ``detail`` goes into STATUS= (the last error for BACKOFF/FATAL, ...); ``now_usec`` is
    CLOCK_MONOTONIC in µs, sent with RELOADING=1. Returns the messages and the new memory.
    """
    messages: list[str] = []
    ready, reloading, stopping = memory.ready_sent, memory.reloading, memory.stopping_sent
    failed = memory.failed_start_up
    if new is State.FATAL and not ready and failed is None:
        failed = _one_line(f"{State.FATAL.value} at start-up: {detail or 'no reason given'}")
    if new is State.STOPPING or (new is State.STOPPED and old is State.STOPPING):
        if not stopping:
            messages.append("STOPPING=1")
            stopping = True
    elif new in _RELOADS:
        if ready and not reloading:
            messages += ["RELOADING=1", f"MONOTONIC_USEC={now_usec}"]
            reloading = True
    elif reloading:
        messages.append("READY=1")  # the reload is over, whatever its outcome
        reloading = False
    elif new is State.RUNNING and not ready:
        messages.append("READY=1")
        ready = True
    if new is State.RUNNING:
        ready = True
    # After a failed start-up the reason stays the status, through the shutdown.
    messages.append(f"STATUS={failed or status_text(new, detail)}")
    return messages, NotifyMemory(ready, reloading, stopping, failed)


# ---- the notifier ---------------------------------------------------------------------------


def _notify_address(value: str | None) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # an abstract socket
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying",
                value)
    return None


def watchdog_interval(env: MutableMapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None: no watchdog.

    Like ``sd_watchdog_enabled(3)``: $WATCHDOG_PID, when set, must be this process.
    """
    env = os.environ if env is None else env
    usec, for_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    if for_pid and for_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; every method is a no-op without it."""

    def __init__(self, address: str | None = None, *, watchdog_s: float | None = None,
                 clock: Callable[[], int] = monotonic_usec, send_timeout: float = 2.0) -> None:
        self.address = _notify_address(address)
        self.watchdog_s = watchdog_s if self.address is not None else None
        self.memory = NotifyMemory()
        self._clock = clock
        self.send_timeout = send_timeout
        self.sent: list[str] = []  # every datagram sent, for tests and status
        # Called once when a start-up ends FATAL under systemd: the supervisor should exit.
        self.on_failed_start_up: Callable[[], object] = lambda: None

    @classmethod
    def from_environment(cls, unset: bool = True,
                         env: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for; ``unset`` removes the variables so that
        llama-server and other children do not inherit them."""
        env = os.environ if env is None else env
        notifier = cls(env.get("NOTIFY_SOCKET"), watchdog_s=watchdog_interval(env))
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` as one datagram; False when not sent (disabled or failed)."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        try:  # a socket per message, as sd_notify does: nothing to close, fork-safe
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.send_timeout)
                sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", " ".join(assignments), exc)
            return False
        self.sent.append(data.decode())
        return True

    # ---- the messages --------------------------------------------------------------------

    # Called directly (rather than through on_state), they keep on_state's memory right.

    def ready(self, status: str | None = None) -> bool:
        self.memory = replace(self.memory, ready_sent=True, reloading=False)
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def ready_again(self, status: str | None = None) -> bool:
        """READY=1 after a reload: systemd leaves the reloading state."""
        return self.ready(status)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def reloading(self, status: str | None = None) -> bool:
        self.memory = replace(self.memory, reloading=True)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._clock()}",
                           *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        self.memory = replace(self.memory, stopping_sent=True)
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog_ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def on_state(self, old: State, new: State, detail: str | None = None) -> bool:
        """Tell systemd about one controller transition (see :func:`transition_messages`)."""
        if self.address is None:
            return False
        failed_before = self.memory.failed_start_up
        messages, self.memory = transition_messages(old, new, detail, self.memory,
                                                    self._clock())
        sent = self.notify(*messages)
        if self.memory.failed_start_up and not failed_before:
            log.error("%s: exiting with %d for systemd (Restart= decides what next)",
                      self.memory.failed_start_up, EXIT_FATAL_AT_START)
            self.on_failed_start_up()
        return sent

    @property
    def exit_code(self) -> int:
        """What the supervisor exits with: :data:`EXIT_FATAL_AT_START` after a start-up
        that ended FATAL under systemd, else 0."""
        return EXIT_FATAL_AT_START if self.memory.failed_start_up else 0

    def on_event(self, event: Event) -> None:
        """An :class:`~corral.observe.events.EventBus` listener: the controller's "state"
        events (``from``, ``to``, ``error``) go to :meth:`on_state`; the rest is ignored.
        The error is shown only where it is the reason for the state."""
        if event.kind != "state" or self.address is None:
            return
        new = State(event.data["to"])
        error = event.data.get("error") if new in _EXPLAINED else None
        self.on_state(State(event.data["from"]), new, error)

    async def watchdog(self, alive: Callable[[], bool],
                       interval: float | None = None) -> None:
        """Ping WATCHDOG=1 every ``interval`` (half of $WATCHDOG_USEC) while ``alive()``.

        Returns at once when there is no watchdog; otherwise runs until cancelled. A ping
        skipped because ``alive()`` is False lets systemd's watchdog fire (it kills and,
        with Restart=, restarts the service).
        """
        interval = interval if interval is not None else self.watchdog_s
        if interval is None or self.address is None:
            return
        was_alive = True
        while True:
            is_alive = alive()
            if is_alive:
                self.watchdog_ping()
            elif was_alive:
                log.error("the supervisor loop looks stuck: no watchdog ping to systemd")
            was_alive = is_alive
            await asyncio.sleep(interval)


# ---- socket activation ----------------------------------------------------------------------
