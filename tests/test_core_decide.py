"""corral.core.decide: the decision table's properties, and the judgements beside it."""

from __future__ import annotations

from itertools import product

import pytest

from corral.core.decide import (
    DECISIONS,
    Action,
    Decision,
    Event,
    IllegalTransition,
    State,
    apply_failure_event,
    batch_event,
    decide,
    failed_apply_gives_up,
    is_serving,
    liveness_due,
    needs_preflight,
    start_failure_reason,
)

S, E, A = State, Event, Action

# The table is not typed again here (a copy proves the copy): each row's behaviour is pinned
# by tests/test_controller.py on the in-process rig, and these properties pin its shape.


MISSING = [(s, e) for s, e in product(State, Event) if (s, e) not in DECISIONS]


@pytest.mark.parametrize(("state", "event"), MISSING, ids=[f"{s}-{e.name}" for s, e in MISSING])
def test_anything_else_raises(state: State, event: Event) -> None:
    """An event the table has no row for is a bug: it raises instead of guessing."""
    with pytest.raises(IllegalTransition):
        decide(state, event)


def test_every_state_can_shut_down_and_stopping_only_ends() -> None:
    """Shutdown is possible from anywhere; STOPPING leads only to STOPPED."""
    for state in State:
        if state is not S.STOPPING:
            assert decide(state, E.SHUTDOWN).next is S.STOPPING
    assert {e for s, e in DECISIONS if s is S.STOPPING} == {E.STOPPED}


def test_fatal_is_left_only_by_a_batch_or_shutdown() -> None:
    """FATAL waits for a new config: no retry, no crash revival."""
    assert {e for s, e in DECISIONS if s is S.FATAL} == {E.BATCH, E.PREFLIGHT_FAILED,
                                                         E.SHUTDOWN}
    assert decide(S.FATAL, E.PREFLIGHT_FAILED).next is S.FATAL  # a refused batch stays


def test_waiting_states_schedule_a_retry_and_fatal_refuses() -> None:
    """Every move into BACKOFF schedules a retry; every move into FATAL refuses requests."""
    for (state, event), d in DECISIONS.items():
        if d.next is S.BACKOFF and state is not S.BACKOFF:
            assert A.SCHEDULE_RETRY in d.actions, (state, event)
        if d.next is S.FATAL and state is not S.FATAL:
            assert A.REFUSE in d.actions, (state, event)


def test_every_batch_is_answered_once() -> None:
    """A batch is answered when it ends (applied, failed, rolled back, or judged before any
    apply), exactly once; a rollback under way answers when it ends."""
    ends = {(s, e) for (s, e), d in DECISIONS.items() if A.ANSWER in d.actions}
    assert ends == {
        (S.APPLYING, E.APPLIED), (S.APPLYING, E.FAILED_OLD_SERVING),
        (S.APPLYING, E.START_FAILED), (S.APPLYING, E.GAVE_UP),
        (S.ROLLING_BACK, E.READY), (S.ROLLING_BACK, E.START_FAILED),
        (S.ROLLING_BACK, E.GAVE_UP), (S.RUNNING, E.UNCHANGED),
        *[(s, E.PREFLIGHT_FAILED) for s in (S.RUNNING, S.BACKOFF, S.FATAL)]}
    assert all(d.actions.count(A.ANSWER) <= 1 for d in DECISIONS.values())


@pytest.mark.parametrize("state", [S.RUNNING, S.BACKOFF, S.FATAL])
def test_a_batch_pre_flight_refuses_only_answers(state: State) -> None:
    """A batch whose merged config fails pre-flight is answered (rejected) and nothing else
    happens: the state stays, a scheduled retry stays scheduled, no server is touched."""
    assert decide(state, E.PREFLIGHT_FAILED) == Decision(state, (A.ANSWER,))


def test_a_no_op_batch_only_answers() -> None:
    """A batch that leaves the serving config as it is is answered (applied), nothing else."""
    assert decide(S.RUNNING, E.UNCHANGED) == Decision(S.RUNNING, (A.ANSWER,))


@pytest.mark.parametrize(("changed", "restart", "state", "event"), [
    (False, False, S.RUNNING, E.UNCHANGED),  # the same config while serving: a no-op
    (True, False, S.RUNNING, E.BATCH),
    (False, True, S.RUNNING, E.BATCH),  # a restart runs though nothing changes
    (False, False, S.BACKOFF, E.BATCH),  # the same config again is how a user retries
    (False, False, S.FATAL, E.BATCH),
    (True, True, S.FATAL, E.BATCH),
])
def test_batch_event(changed: bool, restart: bool, state: State, event: Event) -> None:
    """A due batch is a no-op only if it changes nothing, asks no restart and a server serves."""
    assert batch_event(changed, restart, state) is event


@pytest.mark.parametrize(("old_serving", "old_was_serving", "gives_up", "event"), [
    (True, True, False, E.FAILED_OLD_SERVING),   # start-first: the candidate died, nobody saw
    (True, True, True, E.FAILED_OLD_SERVING),
    (False, True, False, E.FAILED_OLD_STOPPED),  # stop-first: roll back
    (False, True, True, E.FAILED_OLD_STOPPED),
    (False, False, False, E.START_FAILED),       # backoff: back to waiting
    (False, False, True, E.GAVE_UP),             # FATAL stays FATAL
])
def test_apply_failure_event(old_serving: bool, old_was_serving: bool, gives_up: bool,
                             event: Event) -> None:
    """What a failed batch means depends only on whether the old server was and is serving."""
    assert apply_failure_event(old_serving, old_was_serving, gives_up) is event


def test_only_running_is_serving() -> None:
    """A batch equal to the last good config is a no-op only in RUNNING."""
    assert [s for s in State if is_serving(s)] == [S.RUNNING]


@pytest.mark.parametrize(("prior", "next_delay", "gives_up"), [
    (S.FATAL, 0.5, True),  # a retry by hand out of FATAL that fails stays FATAL
    (S.BACKOFF, None, True),  # the backoff policy has no further delay
    (S.BACKOFF, 0.5, False), (S.RUNNING, 2.0, False),
])
def test_failed_apply_gives_up(prior: State, next_delay: float | None, gives_up: bool) -> None:
    """A failed apply with nothing serving is FATAL out of FATAL, or when backoff is spent."""
    assert failed_apply_gives_up(prior, next_delay) is gives_up


def test_a_start_that_fails_while_rolling_back_reports_both_failures() -> None:
    """The rollback's failure is added to the apply's; any other failed start says its own."""
    assert start_failure_reason(S.ROLLING_BACK, "bad flag", "exit 1") == \
        "bad flag; and the rollback failed too: exit 1"
    assert start_failure_reason(S.STARTING, "bad flag", "exit 1") == "exit 1"


def test_liveness_probes_only_a_serving_server() -> None:
    """Probes run in RUNNING alone: not while starting, applying, rolling back or stopping."""
    assert [s for s in State if liveness_due(s)] == [S.RUNNING]


def test_a_config_that_ran_is_revived_without_preflight() -> None:
    """Pre-flight is skipped only for the config that last became ready."""
    assert not needs_preflight("a", "a")
    assert needs_preflight("b", "a") and needs_preflight("a", None)

