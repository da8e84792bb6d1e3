"""corral.core.lifecycle: every legal move works, every other move raises and changes nothing."""

from __future__ import annotations

from collections import deque
from itertools import product

import pytest

from corral.core.lifecycle import TRANSITIONS, IllegalTransition, Lifecycle, State

S = State
LEGAL = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
ILLEGAL = sorted((a, b) for a, b in product(State, State) if b not in TRANSITIONS[a])


def path_to(target: State) -> list[State]:
    """The shortest legal walk from STOPPED to ``target`` (breadth-first)."""
    came_from: dict[State, State | None] = {S.STOPPED: None}
    queue = deque([S.STOPPED])
    while queue:
        state = queue.popleft()
        for nxt in sorted(TRANSITIONS[state]):
            if nxt not in came_from:
                came_from[nxt] = state
                queue.append(nxt)
    path: list[State] = []
    node: State | None = target
    while node is not None and node is not S.STOPPED:
        path.append(node)
        node = came_from[node]
    return path[::-1]


def at(state: State) -> Lifecycle:
    lifecycle = Lifecycle()
    for step in path_to(state):
        lifecycle.move(step)
    assert lifecycle.state is state
    return lifecycle


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert all(targets <= set(State) for targets in TRANSITIONS.values())


def test_starts_stopped() -> None:
    assert Lifecycle().state is S.STOPPED


@pytest.mark.parametrize("state", list(State))
def test_every_state_is_reachable_and_can_stop(state: State) -> None:
    lifecycle = at(state)
    if state is not S.STOPPED:
        if state is not S.STOPPING:
            lifecycle.move(S.STOPPING)
        lifecycle.move(S.STOPPED)
    assert lifecycle.state is S.STOPPED


@pytest.mark.parametrize(("old", "new"), LEGAL)
def test_legal_move(old: State, new: State) -> None:
    lifecycle = at(old)
    assert lifecycle.move(new) is old
    assert lifecycle.state is new


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_illegal_move_raises_and_changes_nothing(old: State, new: State) -> None:
    lifecycle = at(old)
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        lifecycle.move(new)
    assert lifecycle.state is old


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.STOPPED, S.RUNNING),  # a start counts only once /health answered 200
        (S.STOPPING, S.STARTING),  # nothing starts while the old group is stopping
        (S.FATAL, S.STARTING),  # only a new apply clears FATAL
        (S.BACKOFF, S.RUNNING),
        (S.RUNNING, S.RUNNING),
        (S.STOPPED, S.STOPPED),
    ],
)
def test_moves_the_design_forbids(old: State, new: State) -> None:
    assert (old, new) in ILLEGAL


@pytest.mark.parametrize("state", list(State))
def test_only_running_is_serving(state: State) -> None:
    assert at(state).is_serving is (state is S.RUNNING)


def test_happy_path_apply_and_rollback() -> None:
    lifecycle = Lifecycle()
    for step in (S.STARTING, S.RUNNING, S.APPLYING, S.RUNNING, S.APPLYING, S.ROLLING_BACK,
                 S.RUNNING, S.STOPPING, S.STOPPED):
        lifecycle.move(step)
    assert lifecycle.state is S.STOPPED
