"""corral.core.rollout: every decision of ``next_step``, ``record_failure``,
``revert_target``, ``MaxUnavailable`` and the record's JSON form.

What a fleet of agents does with these decisions under random schedules is
``tests/test_fleet_sim.py``'s: it runs the shipped agents, not a copy of them here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.rollout import (
    Do,
    MaxUnavailable,
    Phase,
    Progress,
    Rollout,
    Step,
    Target,
    View,
    next_step,
    record_failure,
    revert_target,
)

NOW = "2024-05-01T12:00:00.000+00:00"
T = Target(7, "d7", "cfg-7")
LIVE = frozenset({"a", "b", "c"})


def rec(**changes: Any) -> Rollout:
    """The record of revision 7 (the target ``T``), in its canary phase unless told."""
    base = Rollout(7, "d7", "cfg-7", Phase.CANARY, good="cfg-5", good_revision=5,
                   started_at="earlier")
    return replace(base, **changes)


def view(**changes: Any) -> View:
    """Instance ``a`` of three, looking at revision 7 and its record, holding nothing."""
    base = View(me="a", target=T, record=rec(), holders=(), live=LIVE, in_sync=False,
                canary_seconds=10.0)
    return replace(base, **changes)


# ---- next_step: one test per path -----------------------------------------------------------


def test_nothing_stored_seeds_what_runs_here() -> None:
    """With no target and no record, an instance running a config seeds it."""
    assert next_step(view(target=None, record=None), "cfg-1", NOW) == Step(Do.SEED)


@pytest.mark.parametrize(("holders", "do"), [(("a",), Do.RELEASE), ((), Do.NOTHING)])
def test_nothing_stored_and_nothing_running_only_lets_go_of_a_slot(
        holders: tuple[str, ...], do: Do) -> None:
    """With nothing stored and nothing running, an instance only releases a slot it holds."""
    assert next_step(view(target=None, record=None, holders=holders), None, NOW) == Step(do)


def test_first_rollout_starts_a_canary_record_reverting_to_what_runs_here() -> None:
    """A first rollout starts a canary record whose revert target is the config running here."""
    step = next_step(view(record=None), "cfg-5", NOW)
    assert step.do is Do.START
    assert step.record == Rollout(7, "d7", "cfg-7", Phase.CANARY, good="cfg-5",
                                  good_revision=None, started_at=NOW)


def test_without_canary_seconds_a_rollout_starts_rolling() -> None:
    """With canary_seconds 0 a rollout starts in the rolling phase, with no canary."""
    step = next_step(view(record=None, canary_seconds=0), "cfg-5", NOW)
    assert step.record is not None and step.record.phase is Phase.ROLLING
    assert step.record.canary is None


def test_new_revision_after_a_done_one_reverts_to_that_one() -> None:
    """A new revision after a done rollout starts fresh and reverts to the done revision."""
    old = Rollout(5, "d5", "cfg-5", Phase.DONE, progress={"a": "done"}, good="cfg-3",
                  good_revision=3)
    step = next_step(view(record=old), "cfg-5", NOW)
    assert step.do is Do.START and step.record is not None
    assert (step.record.revision, step.record.digest, step.record.config) == (7, "d7", "cfg-7")
    assert (step.record.good, step.record.good_revision) == ("cfg-5", 5)
    assert step.record.progress == {} and step.record.canary is None


def test_new_revision_supersedes_a_rolling_one_keeping_its_last_success() -> None:
    """A new revision over a rolling one keeps that record's last good config and revision."""
    old = Rollout(6, "d6", "cfg-6", Phase.ROLLING, canary="b", progress={"b": "done"},
                  good="cfg-5", good_revision=5)
    step = next_step(view(record=old), "cfg-6", NOW)
    assert step.do is Do.START and step.record is not None
    assert (step.record.revision, step.record.good, step.record.good_revision) == (7, "cfg-5", 5)


def test_same_content_written_again_is_a_new_revision() -> None:
    """Matching is by digest and revision: a rewrite of the same content is a new rollout."""
    old = rec(revision=6, phase=Phase.DONE)
    assert next_step(view(record=old), "cfg-5", NOW).do is Do.START


@pytest.mark.parametrize(("holders", "do"), [(("a",), Do.RELEASE), ((), Do.NOTHING)])
def test_in_sync_with_an_unrecorded_target_starts_nothing(
        holders: tuple[str, ...], do: Do) -> None:
    """An instance already in sync with an unrecorded target starts nothing, only releases."""
    assert next_step(view(record=None, in_sync=True, holders=holders), "cfg-7", NOW) == Step(do)


def test_record_written_with_its_config_gets_its_revision_number() -> None:
    """A record written with its config (revision 0) is numbered with the target's revision."""
    r = rec(revision=0, canary="b", progress={"b": "done"})
    step = next_step(view(record=r), "cfg-5", NOW)
    assert step == Step(Do.NUMBER, replace(r, revision=7))


def test_failed_rollout_reverts_the_key() -> None:
    """A failed rollout with a good config to go back to reverts the key."""
    failed = rec(phase=Phase.FAILED, canary="b", reason="b: no")
    assert next_step(view(record=failed), "cfg-5", NOW) == Step(Do.REVERT)


@pytest.mark.parametrize(("holders", "do"), [(("a",), Do.RELEASE), ((), Do.NOTHING)])
def test_failed_first_rollout_without_good_has_nothing_to_revert_to(
        holders: tuple[str, ...], do: Do) -> None:
    """A failed first rollout, with no good config, reverts nothing and only releases a slot."""
    failed = rec(phase=Phase.FAILED, good=None, good_revision=None)
    assert next_step(view(record=failed, holders=holders), None, NOW) == Step(do)


def test_in_sync_marks_itself_done() -> None:
    """An instance in sync with the target marks itself done, leaving the phase as it was."""
    r = rec(phase=Phase.ROLLING, progress={"b": "done"})
    step = next_step(view(record=r, in_sync=True), "cfg-7", NOW)
    assert step.do is Do.MARK_DONE and step.record is not None
    assert step.record.progress == {"b": "done", "a": "done"}
    assert step.record.phase is Phase.ROLLING


@pytest.mark.parametrize(("holders", "do"), [(("a",), Do.RELEASE), ((), Do.NOTHING)])
def test_failed_here_never_tries_again(holders: tuple[str, ...], do: Do) -> None:
    """An instance whose apply failed never tries that revision again, only releases."""
    r = rec(phase=Phase.ROLLING, progress={"b": "done", "a": "failed"}, reasons={"a": "oom"})
    assert next_step(view(record=r, holders=holders), "cfg-5", NOW) == Step(do)


def test_done_rollout_reopened_by_a_late_joiner() -> None:
    """``done`` is said of the fleet as it is: one that does not run it reopens it (a late
    joiner, or instances back after an etcd outage expired their leases)."""
    r = rec(phase=Phase.DONE, progress={"b": "done", "c": "done"}, ended_at=NOW)
    assert next_step(view(record=r, holders=("a",)), "cfg-5", NOW) == \
        Step(Do.REOPEN, replace(r, phase=Phase.ROLLING, ended_at=None))


def test_reopened_rollout_late_joiner_applies_when_holding_else_queues() -> None:
    """A late joiner to a reopened rollout applies if it holds a slot, else queues or waits."""
    r = rec(phase=Phase.ROLLING, progress={"b": "done", "c": "done"})
    assert next_step(view(record=r, holders=("a",)), "cfg-5", NOW) == Step(Do.APPLY)
    assert next_step(view(record=r), "cfg-5", NOW) == Step(Do.ENQUEUE)
    assert next_step(view(record=r, holders=("b", "a")), "cfg-5", NOW) == Step(Do.NOTHING)


def test_done_rollout_in_sync_lets_go_of_its_slot() -> None:
    """An in-sync instance of a done rollout releases its slot, or does nothing without one."""
    r = rec(phase=Phase.DONE, progress={"a": "done"})
    assert next_step(view(record=r, in_sync=True, holders=("a",)), "cfg-7", NOW) == \
        Step(Do.RELEASE)
    assert next_step(view(record=r, in_sync=True), "cfg-7", NOW) == Step(Do.NOTHING)


def test_canary_gone_is_cleared() -> None:
    """A canary no longer live is cleared from the record."""
    r = rec(canary="z")
    assert next_step(view(record=r), "cfg-5", NOW) == Step(Do.CLEAR_CANARY,
                                                           replace(r, canary=None))


def test_no_canary_first_slot_holder_claims() -> None:
    """With no canary, the first slot holder claims the canary role."""
    step = next_step(view(holders=("a", "b")), "cfg-5", NOW)
    assert step == Step(Do.CLAIM_CANARY, replace(rec(), canary="a"))


def test_no_canary_queued_behind_another_waits() -> None:
    """With no canary, an instance queued behind another waits."""
    assert next_step(view(holders=("b", "a")), "cfg-5", NOW) == Step(Do.NOTHING)


def test_no_canary_not_queued_enqueues() -> None:
    """With no canary, an instance not yet in the slot queue enqueues."""
    assert next_step(view(), "cfg-5", NOW) == Step(Do.ENQUEUE)


def test_no_canary_everyone_done_finishes() -> None:
    """The canary proved it and died before promoting, and everyone live already runs it."""
    r = rec(progress={"a": "done", "b": "done", "c": "done", "z": "done"})
    step = next_step(view(record=r, in_sync=True), "cfg-7", NOW)
    assert step == Step(Do.FINISH, replace(r, phase=Phase.DONE, ended_at=NOW))


def test_no_canary_in_sync_others_not_done_waits() -> None:
    """With no canary, an in-sync instance waits while other live ones aren't done."""
    r = rec(progress={"a": "done"})
    assert next_step(view(record=r, in_sync=True), "cfg-7", NOW) == Step(Do.NOTHING)


@pytest.mark.parametrize("in_sync", [False, True])
def test_someone_else_is_canary_wait_without_a_slot(in_sync: bool) -> None:
    """While another is canary, an instance waits, giving back any slot it holds."""
    r = rec(canary="b", progress={"a": "done"} if in_sync else {})
    assert next_step(view(record=r, in_sync=in_sync, holders=("b",)), "cfg-5", NOW) == \
        Step(Do.NOTHING)
    # Holding one while waiting could block the canary (a regression, see below): give it back.
    assert next_step(view(record=r, in_sync=in_sync, holders=("b", "a")), "cfg-5", NOW) == \
        Step(Do.RELEASE)


def test_canary_applies_while_holding() -> None:
    """The canary applies the target while it holds a slot."""
    assert next_step(view(record=rec(canary="a"), holders=("a",)), "cfg-5", NOW) == \
        Step(Do.APPLY)


def test_canary_that_lost_its_slot_queues_again() -> None:
    """A canary that lost its slot enqueues again, then waits its turn."""
    assert next_step(view(record=rec(canary="a")), "cfg-5", NOW) == Step(Do.ENQUEUE)
    assert next_step(view(record=rec(canary="a"), holders=("b", "a")), "cfg-5", NOW) == \
        Step(Do.NOTHING)


@pytest.mark.parametrize(("running_for", "after"), [(None, 10.0), (0.0, 10.0), (4.0, 6.0)])
def test_canary_waits_out_its_canary_seconds(running_for: float | None, after: float) -> None:
    """An applied canary waits out what remains of canary_seconds since it began running."""
    r = rec(canary="a", progress={"a": "done"})
    v = view(record=r, in_sync=True, holders=("a",), running_for=running_for)
    assert next_step(v, "cfg-7", NOW) == Step(Do.WAIT, after=after)


def test_proven_canary_promotes() -> None:
    """A canary running for canary_seconds promotes the rollout to rolling."""
    r = rec(canary="a", progress={"a": "done"})
    v = view(record=r, in_sync=True, holders=("a",), running_for=10.0)
    assert next_step(v, "cfg-7", NOW) == Step(Do.PROMOTE, replace(r, phase=Phase.ROLLING))


def test_rolling_applies_while_holding() -> None:
    """While rolling, an instance holding a slot applies the target."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"b": "done"})
    assert next_step(view(record=r, holders=("a",)), "cfg-5", NOW) == Step(Do.APPLY)


def test_rolling_queues_then_waits_for_a_slot() -> None:
    """While rolling, an instance without a slot enqueues, then waits behind holders."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"b": "done"})
    assert next_step(view(record=r), "cfg-5", NOW) == Step(Do.ENQUEUE)
    assert next_step(view(record=r, holders=("c", "a")), "cfg-5", NOW) == Step(Do.NOTHING)


def test_rolling_percentage_gives_several_slots() -> None:
    """A 67% max-unavailable lets the second in the queue hold a slot and apply."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"b": "done"})
    v = view(record=r, holders=("c", "a"), max_unavailable=MaxUnavailable(percent=67))
    assert v.holding and next_step(v, "cfg-5", NOW) == Step(Do.APPLY)


def test_rolling_in_sync_releases_its_slot() -> None:
    """While rolling, an in-sync instance releases its slot."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"a": "done", "b": "done", "c": "done"})
    assert next_step(view(record=r, in_sync=True, holders=("a",)), "cfg-7", NOW) == \
        Step(Do.RELEASE)


def test_rolling_everyone_live_has_an_outcome_finishes() -> None:
    """Once every live instance is done or failed, the rolling rollout finishes."""
    r = rec(phase=Phase.ROLLING, canary="b",
            progress={"a": "done", "b": "done", "c": "failed", "dead": "done"})
    step = next_step(view(record=r, in_sync=True), "cfg-7", NOW)
    assert step == Step(Do.FINISH, replace(r, phase=Phase.DONE, ended_at=NOW))


def test_rolling_in_sync_others_still_to_go_waits() -> None:
    """An in-sync instance waits while live others have no outcome yet."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"a": "done", "b": "done"})
    assert next_step(view(record=r, in_sync=True), "cfg-7", NOW) == Step(Do.NOTHING)


# ---- record_failure -------------------------------------------------------------------------


def test_first_failure_fails_the_rollout_with_its_reason() -> None:
    """A failure before any success fails the rollout, with the reason, keeping good."""
    r = rec(canary="a")
    failed = record_failure(r, "a", "model failed to load", NOW)
    assert failed.phase is Phase.FAILED
    assert failed.reason == "a: model failed to load"
    assert failed.progress == {"a": "failed"}
    assert failed.reasons == {"a": "model failed to load"}
    assert failed.ended_at == NOW
    assert (failed.good, failed.good_revision) == ("cfg-5", 5)


def test_failure_after_a_success_is_that_instances_alone() -> None:
    """A failure after a success marks only that instance failed; the rollout goes on."""
    r = rec(phase=Phase.ROLLING, canary="b", progress={"b": "done"})
    failed = record_failure(r, "a", "out of memory", NOW)
    assert failed.phase is Phase.ROLLING and failed.reason is None and failed.ended_at is None
    assert failed.progress == {"b": "done", "a": "failed"}
    assert failed.reasons == {"a": "out of memory"}


# ---- MaxUnavailable -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [
    ("1", MaxUnavailable(1)), (" 3 ", MaxUnavailable(3)),
    ("20%", MaxUnavailable(percent=20.0)), ("100%", MaxUnavailable(percent=100.0)),
    ("12.5%", MaxUnavailable(percent=12.5)),
])
def test_max_unavailable_parses(text: str, parsed: MaxUnavailable) -> None:
    """Counts and percentages parse to MaxUnavailable, and str() parses back the same."""
    assert MaxUnavailable.parse(text) == parsed
    assert MaxUnavailable.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["0", "-1", "", "two", "1.5", "0%", "101%", "-5%", "%",
                                  "x%", "nan%"])
def test_max_unavailable_refuses(text: str) -> None:
    """Non-positive, fractional or non-numeric counts and percents outside (0, 100] are refused."""
    with pytest.raises(ValueError, match=r"expected a count >= 1 or a percentage") as caught:
        MaxUnavailable.parse(text)
    assert repr(text.strip()) in str(caught.value)


@pytest.mark.parametrize(("limit", "live", "slots"), [
    (MaxUnavailable(1), 30, 1), (MaxUnavailable(2), 1, 2), (MaxUnavailable(percent=20), 30, 6),
    (MaxUnavailable(percent=20), 9, 1), (MaxUnavailable(percent=20), 4, 1),
    (MaxUnavailable(percent=50), 5, 2), (MaxUnavailable(percent=100), 3, 3),
    (MaxUnavailable(percent=50), 0, 1),
])
def test_max_unavailable_slots(limit: MaxUnavailable, live: int, slots: int) -> None:
    """A count gives that many slots; a percentage of live instances rounds down, at least 1."""
    assert limit.slots(live) == slots


@settings(database=None)
@given(percent=st.floats(min_value=0.001, max_value=100), live=st.integers(0, 10_000))
def test_max_unavailable_percentage_is_at_least_one_and_at_most_everyone(
        percent: float, live: int) -> None:
    """Percentage slots are floor(percent of live), never below 1 nor above everyone."""
    slots = MaxUnavailable(percent=percent).slots(live)
    assert 1 <= slots <= max(1, live)
    assert slots == max(1, int(percent * live / 100))


# ---- the record's JSON form -----------------------------------------------------------------

_names = st.text("abcdefgh0123456789-", min_size=1, max_size=6)
_text = st.text(max_size=12)
_rollouts = st.builds(
    Rollout, revision=st.integers(0, 2**40), digest=_text, config=_text,
    phase=st.sampled_from(Phase), canary=st.none() | _names,
    progress=st.dictionaries(_names, st.sampled_from([p.value for p in Progress]), max_size=4),
    reasons=st.dictionaries(_names, _text, max_size=3), reason=st.none() | _text,
    good=st.none() | _text, good_revision=st.none() | st.integers(1, 2**40),
    started_at=_text, ended_at=st.none() | _text)


@settings(max_examples=60, database=None)
@given(_rollouts)
def test_record_round_trips_through_json(r: Rollout) -> None:
    """Any rollout record round-trips unchanged through its JSON form."""
    assert Rollout.from_json(json.loads(json.dumps(r.to_json()))) == r


# ---- a write with no record yet: the books of the one before are closed first -------------


def test_a_newer_write_first_marks_the_older_record_for_an_instance_that_runs_it() -> None:
    """Issue 18: the last instance applied revision 6 when 7 was written; it says so in 6's
    record before anyone starts 7's, so 7's revert target is 6."""
    old = Rollout(6, "d6", "cfg-6", Phase.ROLLING, canary="b", progress={"b": "done",
                                                                          "c": "done"})
    step = next_step(view(record=old, runs_record=True, holders=("a",)), "cfg-6", NOW)
    assert step == Step(Do.MARK_DONE, old.with_progress("a", Progress.DONE))


def test_a_newer_write_finishes_an_older_record_everyone_ran() -> None:
    """A newer write first finishes an older record everyone ran, then reverts to it."""
    old = Rollout(6, "d6", "cfg-6", Phase.ROLLING, progress=dict.fromkeys("abc", "done"),
                  good="cfg-5", good_revision=5)
    step = next_step(view(record=old, runs_record=True), "cfg-6", NOW)
    assert step == Step(Do.FINISH, replace(old, phase=Phase.DONE, ended_at=NOW))
    done = replace(old, phase=Phase.DONE)
    start = next_step(view(record=done, runs_record=True), "cfg-6", NOW)
    assert start.do is Do.START and start.record is not None
    assert (start.record.good, start.record.good_revision) == ("cfg-6", 6)


def test_a_newer_write_waits_while_another_instance_may_still_apply_the_older_one() -> None:
    """A newer write waits while another holds a slot of the older rolling rollout."""
    old = Rollout(6, "d6", "cfg-6", Phase.ROLLING, progress={"b": "done"})
    assert next_step(view(record=old, holders=("c",)), "cfg-5", NOW) == Step(Do.NOTHING)
    assert next_step(view(record=old, holders=("a", "c")), "cfg-5", NOW) == Step(Do.RELEASE)
    # a holder of a finished rollout is not applying it: no reason to wait
    assert next_step(view(record=replace(old, phase=Phase.DONE), holders=("c",)), "cfg-5",
                     NOW).do is Do.START


@pytest.mark.parametrize(("progress", "runs_it", "good"), [
    ({"a": "done", "b": "done"}, "ab", ("cfg-6", 6)),  # everyone live ran it
    ({"a": "done"}, "ab", ("cfg-5", 5)),  # they disagreed: the newest that reached done
    ({"a": "done", "b": "failed"}, "ab", ("cfg-5", 5)),
    ({"a": "done"}, "a", ("cfg-6", 6)),
])
def test_revert_target_is_what_every_live_instance_ran(
        progress: dict[str, str], runs_it: str, good: tuple[str, int]) -> None:
    """The revert target is the older revision if every live runner reached done, else its good."""
    old = Rollout(6, "d6", "cfg-6", Phase.ROLLING, progress=progress, good="cfg-5",
                  good_revision=5)
    assert revert_target(old, frozenset(runs_it)) == good


def test_revert_target_of_an_unnumbered_record_has_no_revision() -> None:
    """The revert target of an unnumbered (revision 0) record has its config but no revision."""
    old = Rollout(0, "d6", "cfg-6", Phase.DONE)
    assert revert_target(old, frozenset("a")) == ("cfg-6", None)
