"""corral.core.decide: one test per row of the decision table, and nothing outside it."""

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
    decide,
    failed_apply_gives_up,
    is_serving,
    liveness_due,
    needs_preflight,
    start_failure_reason,
)

S, E, A = State, Event, Action

# Every row, spelled out again on purpose: a change to the table must be made twice.
ROWS: list[tuple[State, Event, State, tuple[Action, ...]]] = [
    (S.STOPPED, E.BOOT, S.STARTING, (A.START_BOOT,)),
    (S.STARTING, E.READY, S.RUNNING, (A.FORGET_FAILURES,)),
    (S.STARTING, E.START_FAILED, S.BACKOFF, (A.SCHEDULE_RETRY,)),
    (S.STARTING, E.GAVE_UP, S.FATAL, (A.REFUSE,)),
    (S.RUNNING, E.CRASHED, S.STARTING, (A.HOLD, A.COUNT_RESTART, A.START)),
    (S.RUNNING, E.HUNG, S.RUNNING, (A.KILL,)),
    (S.RUNNING, E.BATCH, S.APPLYING, (A.RUN_PLAN,)),
    (S.BACKOFF, E.RETRY_DUE, S.STARTING, (A.START,)),
    (S.BACKOFF, E.BATCH, S.APPLYING, (A.CANCEL_RETRY, A.RUN_PLAN)),
    (S.FATAL, E.BATCH, S.APPLYING, (A.RUN_PLAN,)),
    (S.APPLYING, E.APPLIED, S.RUNNING, (A.FORGET_FAILURES, A.ANSWER)),
    (S.APPLYING, E.FAILED_OLD_SERVING, S.RUNNING, (A.ANSWER,)),
    (S.APPLYING, E.FAILED_OLD_STOPPED, S.ROLLING_BACK, (A.START,)),
    (S.APPLYING, E.START_FAILED, S.BACKOFF, (A.SCHEDULE_RETRY, A.ANSWER)),
    (S.APPLYING, E.GAVE_UP, S.FATAL, (A.REFUSE, A.ANSWER)),
    (S.ROLLING_BACK, E.READY, S.RUNNING, (A.ANSWER,)),
    (S.ROLLING_BACK, E.START_FAILED, S.FATAL, (A.REFUSE, A.ANSWER)),
    (S.ROLLING_BACK, E.GAVE_UP, S.FATAL, (A.REFUSE, A.ANSWER)),
    (S.STOPPING, E.STOPPED, S.STOPPED, ()),
    *[(s, E.SHUTDOWN, S.STOPPING, (A.ANSWER_PENDING, A.CLOSE_FRONT, A.STOP_ALL))
      for s in State if s is not S.STOPPING],
]


@pytest.mark.parametrize(("state", "event", "next_state", "actions"), ROWS,
                         ids=[f"{r[0]}-{r[1].name}" for r in ROWS])
def test_row(state: State, event: Event, next_state: State,
             actions: tuple[Action, ...]) -> None:
    """The table decides exactly this for this (state, event)."""
    assert decide(state, event) == Decision(next_state, actions)


def test_rows_cover_the_table() -> None:
    """No row of the table is untested, and no tested row is missing from it."""
    assert {(r[0], r[1]) for r in ROWS} == set(DECISIONS)


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
    assert {e for s, e in DECISIONS if s is S.FATAL} == {E.BATCH, E.SHUTDOWN}


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

