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
    is_serving,
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
