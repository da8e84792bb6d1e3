"""The supervised server's states, held as a transition table.

STOPPED ─start─▶ STARTING ─ready─▶ RUNNING ─apply─▶ APPLYING ─ready─▶ RUNNING
                    │                 │                 └─fail─▶ ROLLING_BACK ─▶ RUNNING / FATAL
                    └─fail─▶ BACKOFF ─┴─crash─▶ STARTING (at once) ...  BACKOFF ─give up─▶ FATAL
any ─stop─▶ STOPPING ─▶ STOPPED

A start counts as successful only once ``/health`` answered 200 and the process stayed up
for the minimum healthy time. An illegal transition raises and changes nothing, so a bug in
the controller shows up as an error instead of a server in an impossible state.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    APPLYING = "APPLYING"
    ROLLING_BACK = "ROLLING_BACK"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.APPLYING, S.STOPPING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FATAL, S.STARTING, S.STOPPING}),
    S.RUNNING: frozenset({S.APPLYING, S.STARTING, S.STOPPING}),
    S.APPLYING: frozenset({S.RUNNING, S.ROLLING_BACK, S.BACKOFF, S.FATAL, S.STOPPING}),
    S.ROLLING_BACK: frozenset({S.RUNNING, S.FATAL, S.BACKOFF, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.APPLYING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.FATAL: frozenset({S.APPLYING, S.STOPPING}),
}


class IllegalTransition(RuntimeError):
    pass


class Lifecycle:
    """The current state; ``move`` is the only way to change it."""

    def __init__(self) -> None:
        self.state = State.STOPPED

    def move(self, new: State) -> State:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state} -> {new} is not allowed")
        old, self.state = self.state, new
        return old

    @property
    def is_serving(self) -> bool:
        return self.state is State.RUNNING
