"""Change ids (corral.supervisor.changes.ChangeIds): counting within a run, unique across runs."""

from __future__ import annotations

import time

import pytest

from corral.supervisor.changes import ChangeIds, run_tag

T = 1_767_225_600_000  # 2026-01-01 in ms


def test_ids_count_up_within_a_run_under_its_tag() -> None:
    """c1, c2, ... with this run's tag."""
    ids = ChangeIds("run")
    assert [ids.next() for _ in range(3)] == ["c1-run", "c2-run", "c3-run"]


@pytest.mark.parametrize(("a", "b"), [
    ((T, 0), (T + 1, 0)),  # the next run starts a millisecond later
    ((T, 0), (T, 1)),  # two runs in the same millisecond (or a clock set back)
    ((T, 35), (T, 36)),  # the random part is padded: no carry into the time part
])
def test_runs_that_differ_in_start_or_chance_get_different_tags(
        a: tuple[int, int], b: tuple[int, int]) -> None:
    """The tag is the start time and a random part, each of a fixed width."""
    assert run_tag(*a) != run_tag(*b)
    assert len(run_tag(*a)) == len(run_tag(*b)) == 10


def test_a_run_is_tagged_with_its_start_time() -> None:
    """The tag's time part is the wall clock in ms when the run began (base 36)."""
    before = time.time_ns() // 1_000_000
    tag = ChangeIds().run
    after = time.time_ns() // 1_000_000
    assert before <= int(tag[:8], 36) <= after
    assert 0 <= int(tag[8:], 36) < 36 ** 2
