"""What the supervisor does next: one table from (state, event) to (next state, actions).

Theory of operation
-------------------
The controller never decides. It turns what happened into an :class:`Event` (a start
became ready, the server exited, a batch is due, ...), looks up ``DECISIONS[state, event]``
and carries out the actions in order; a long action (a start, a plan of steps) ends by
feeding the next event back. A (state, event) pair missing from the table is a bug and
raises :class:`IllegalTransition` before anything changes (h11's ``_state.py`` works the
same way).

Besides the table, the judgements the controller needs are pure functions here: what a due
batch is (:func:`batch_event`: a no-op while a server serves, else a batch to apply; one whose
merged config fails pre-flight arrives as ``PREFLIGHT_FAILED``, and the table answers both
without touching a server), *which* event a failed start is (the backoff policy allows
another try, ``START_FAILED``, or gives up, ``GAVE_UP``), which one a failed apply is
(:func:`apply_failure_event`; a failed apply out of FATAL stays FATAL,
:func:`failed_apply_gives_up`), what a start that fails while rolling back reports
(:func:`start_failure_reason`), when liveness is probed (:func:`liveness_due`) and when a
start skips pre-flight (:func:`needs_preflight`). Whether a batch is stored and whether it
is a restart is :func:`corral.core.steps.batch_kind`.

Left outside: nothing judged. The shell only turns I/O into events (a start that raised, a
pre-flight that refused, a server that exited) and carries out the actions.

States (supervisord's words)::

    STOPPED ─boot─▶ STARTING ─ready─▶ RUNNING ─batch─▶ APPLYING ─applied─▶ RUNNING
                       │                 │                 ├─failed, old stopped─▶ ROLLING_BACK
                       │                 └─crashed─▶ STARTING (at once)
                       └─start failed─▶ BACKOFF ─retry due─▶ STARTING ... ─gave up─▶ FATAL
    any ─shutdown─▶ STOPPING ─stopped─▶ STOPPED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    APPLYING = "APPLYING"
    ROLLING_BACK = "ROLLING_BACK"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"


class Event(enum.StrEnum):
    BOOT = "boot"  # the supervisor has started
    READY = "ready"  # a start answered /health 200 and stayed up long enough
    START_FAILED = "start failed"  # a start failed; the backoff policy allows another try
    GAVE_UP = "gave up"  # a start failed; the backoff policy gives up
    CRASHED = "crashed"  # the serving llama-server exited on its own
    HUNG = "hung"  # the serving llama-server failed its liveness probes
    RETRY_DUE = "retry due"  # the backoff delay is over
    BATCH = "batch"  # a batch of changes to apply is due (pre-flight passed)
    UNCHANGED = "unchanged"  # a due batch leaves the serving config as it is, no restart
    PREFLIGHT_FAILED = "pre-flight failed"  # a due batch's merged config failed pre-flight
    APPLIED = "applied"  # the batch's config is ready (and stored, if it was to be)
    FAILED_OLD_SERVING = "failed, old serving"  # the batch failed; the old server never stopped
    FAILED_OLD_STOPPED = "failed, old stopped"  # the batch failed after the old server stopped
    SHUTDOWN = "shutdown"  # SIGTERM/SIGINT
    STOPPED = "stopped"  # every server is stopped


class Action(enum.StrEnum):
    START_BOOT = "start the stored config, else the command line's"
    START = "start the last good config"
    FORGET_FAILURES = "reset the count of failed starts"
    SCHEDULE_RETRY = "schedule a retry after the backoff delay"
    CANCEL_RETRY = "cancel the scheduled retry"
    COUNT_RESTART = "count a restart"
    KILL = "SIGKILL the serving llama-server"
    HOLD = "front door: hold new requests"
    REFUSE = "front door: answer 503 at once"
    RUN_PLAN = "run the batch's plan of steps"
    ANSWER = "answer the batch"
    ANSWER_PENDING = "answer every waiting change: shutting down"
    CLOSE_FRONT = "front door: stop accepting, drain, answer held requests 503"
    STOP_ALL = "stop every llama-server"


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Decision:
    next: State
    actions: tuple[Action, ...] = ()


S, E, A = State, Event, Action
_SHUTDOWN = Decision(S.STOPPING, (A.ANSWER_PENDING, A.CLOSE_FRONT, A.STOP_ALL))

# The table. Read a row as: in STATE, when EVENT happens, go to NEXT and do ACTIONS.
DECISIONS: dict[tuple[State, Event], Decision] = {
    (S.STOPPED, E.BOOT): Decision(S.STARTING, (A.START_BOOT,)),
    (S.STARTING, E.READY): Decision(S.RUNNING, (A.FORGET_FAILURES,)),
    (S.STARTING, E.START_FAILED): Decision(S.BACKOFF, (A.SCHEDULE_RETRY,)),
    (S.STARTING, E.GAVE_UP): Decision(S.FATAL, (A.REFUSE,)),
    (S.RUNNING, E.CRASHED): Decision(S.STARTING, (A.HOLD, A.COUNT_RESTART, A.START)),
    # The kill makes the server exit; that exit then arrives as CRASHED.
    (S.RUNNING, E.HUNG): Decision(S.RUNNING, (A.KILL,)),
    (S.RUNNING, E.BATCH): Decision(S.APPLYING, (A.RUN_PLAN,)),
    # A no-op (answered applied) and a change pre-flight refuses (answered rejected) touch
    # no server: the state stays, and so does a scheduled retry.
    (S.RUNNING, E.UNCHANGED): Decision(S.RUNNING, (A.ANSWER,)),
    **{(state, E.PREFLIGHT_FAILED): Decision(state, (A.ANSWER,))
       for state in (S.RUNNING, S.BACKOFF, S.FATAL)},
    (S.BACKOFF, E.RETRY_DUE): Decision(S.STARTING, (A.START,)),
    (S.BACKOFF, E.BATCH): Decision(S.APPLYING, (A.CANCEL_RETRY, A.RUN_PLAN)),
    (S.FATAL, E.BATCH): Decision(S.APPLYING, (A.RUN_PLAN,)),
    (S.APPLYING, E.APPLIED): Decision(S.RUNNING, (A.FORGET_FAILURES, A.ANSWER)),
    (S.APPLYING, E.FAILED_OLD_SERVING): Decision(S.RUNNING, (A.ANSWER,)),
    (S.APPLYING, E.FAILED_OLD_STOPPED): Decision(S.ROLLING_BACK, (A.START,)),
    # A batch applied while nothing was serving (backoff, FATAL) that fails: back to waiting.
    (S.APPLYING, E.START_FAILED): Decision(S.BACKOFF, (A.SCHEDULE_RETRY, A.ANSWER)),
    (S.APPLYING, E.GAVE_UP): Decision(S.FATAL, (A.REFUSE, A.ANSWER)),
    (S.ROLLING_BACK, E.READY): Decision(S.RUNNING, (A.ANSWER,)),
    # The last good config failed right after it had been serving: no retry loop, FATAL.
    (S.ROLLING_BACK, E.START_FAILED): Decision(S.FATAL, (A.REFUSE, A.ANSWER)),
    (S.ROLLING_BACK, E.GAVE_UP): Decision(S.FATAL, (A.REFUSE, A.ANSWER)),
    **{(state, E.SHUTDOWN): _SHUTDOWN for state in State if state is not S.STOPPING},
    (S.STOPPING, E.STOPPED): Decision(S.STOPPED),
}


def decide(state: State, event: Event) -> Decision:
    """The next state and the actions for ``event`` in ``state``; raises if there is none."""
    try:
        return DECISIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"no decision for {event.value!r} in {state}") from None


def batch_event(changed: bool, restart: bool, state: State) -> Event:
    """What a due batch is: ``UNCHANGED`` when it leaves the config as it is while a server
    serves and asks no restart (answered applied, nothing restarts, no pre-flight); else a
    ``BATCH`` to apply, the same config included out of BACKOFF or FATAL (that is how a user
    retries), if its merged config passes pre-flight."""
    if not changed and not restart and is_serving(state):
        return Event.UNCHANGED
    return Event.BATCH


def start_failure_event(gives_up: bool) -> Event:
    return Event.GAVE_UP if gives_up else Event.START_FAILED


def apply_failure_event(old_serving: bool, old_was_serving: bool, gives_up: bool) -> Event:
    """What a failed batch means: nothing lost, a rollback needed, or a failed start."""
    if old_serving:
        return Event.FAILED_OLD_SERVING
    if old_was_serving:
        return Event.FAILED_OLD_STOPPED
    return start_failure_event(gives_up)


def failed_apply_gives_up(prior: State, next_delay: float | None) -> bool:
    """Whether a failed apply with nothing serving is FATAL: it was FATAL before (a retry by
    hand that failed again), or the backoff policy has no further delay."""
    return prior is State.FATAL or next_delay is None


def start_failure_reason(state: State, apply_error: str | None, reason: str) -> str:
    """A start that fails while rolling back reports the apply's failure as well."""
    if state is State.ROLLING_BACK:
        return f"{apply_error}; and the rollback failed too: {reason}"
    return reason


def liveness_due(state: State) -> bool:
    """Liveness probes only a server that serves (not one starting, applying or stopping)."""
    return state is State.RUNNING


def needs_preflight(config: object, proven: object) -> bool:
    """A config that has run is revived without pre-flight (respawn latency is what we sell,
    and the estimate can take seconds); a broken one fails its start instead."""
    return config != proven


def is_serving(state: State) -> bool:
    """A server that became ready runs the last good config (a batch of it is a no-op)."""
    return state is State.RUNNING
