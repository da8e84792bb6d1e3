"""Fleet rollouts under seeded random schedules, running the shipped supervisors (issue 18).

Each schedule runs ``tests/fleet_sim.py``: 2-5 real controllers, publishing stores, fleet
syncs and rollout agents on one in-memory etcd, with watch lag, slow applies, operator
writes at random moments (right after every instance started the previous one, mid-roll,
before the canary finished, once it settled), API changes, partitions and deaths. After each
schedule the fleet must come to rest and :func:`check` holds. The targeted tests first pin
the sequences of issue 18 (put A; all apply A; put B at once).

``CORRAL_SIM_SEEDS`` sets the number of random schedules (default 200; ``make sim-slow``
runs 3,000). A failure prints the seed, the state and the trace of the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from corral.core.rollout import MaxUnavailable, Phase
from corral.supervisor.changes import ChangeRecord, Outcome
from tests.fleet_sim import CONFIG_KEY, OPERATOR, ROLLOUT_KEY, Sim, model_of
from tests.memory_etcd import run_virtual
from tests.waiting import until

SEEDS = int(os.environ.get("CORRAL_SIM_SEEDS", "200"))
SCHEDULE_LIMIT_S = 900.0  # virtual: a schedule that has not come to rest by then is stuck
CHUNKS = 8  # test functions the seeds are spread over (pytest-xdist runs them in parallel)
LIMITS = [MaxUnavailable(1), MaxUnavailable(2), MaxUnavailable(percent=50)]


def simulate(scenario: Callable[[Sim], Awaitable[Any]], seed: int = 0, **options: Any) -> Sim:
    """Run ``scenario`` on a fresh 3-member fleet (``start(3)`` is the scenario's to call)."""
    async def main() -> Sim:
        sim = Sim(seed, **options)
        sim.etcd.guarded = frozenset({CONFIG_KEY, ROLLOUT_KEY})
        try:
            async with asyncio.timeout(SCHEDULE_LIMIT_S):
                await scenario(sim)
        except TimeoutError:
            raise AssertionError(f"no rest within {SCHEDULE_LIMIT_S} s of virtual time\n"
                                 + sim.explain()) from None
        finally:
            await sim.shutdown()
        return sim

    return run_virtual(main())


def all_started(sim: Sim, model: str) -> bool:
    """Every live member has a llama-server of ``model`` (it serves /props, maybe not yet
    /health): the moment the operator of issue 18 wrote again."""
    return all(any(str(s.config.get("--model")) == model for s in m.launcher.alive())
               for m in sim.live)


def writes_of_key(sim: Sim) -> list[tuple[int, str, str | None]]:
    """(revision, writer, model) of every write of the config key, in order."""
    return [(rev, who, model_of(value)) for rev, who, key, value in sim.etcd.writes
            if key == CONFIG_KEY]


def check(sim: Sim, faulted: set[str] | frozenset[str] = frozenset()) -> None:
    """What every schedule must end with (issue 18's contract); ``faulted`` are the members
    that were cut off or killed (a canary that vanished is replaced, and may have tried)."""
    why = sim.explain()
    assert not sim.etcd.unguarded_writes, f"{sim.etcd.unguarded_writes}\n{why}"
    writes = writes_of_key(sim)
    # A supervisor writes the key with a record in the same transaction (an API change,
    # the first store), or alone: a revert.
    with_record = {rev for rev, _, key, _ in sim.etcd.writes if key == ROLLOUT_KEY}
    reverts = [w for w in writes if w[1] != OPERATOR and w[0] not in with_record]
    real = [w for w in writes if w not in reverts]
    last = real[-1]
    record = sim.record
    assert record is not None, why
    # The last write became a rollout that ended: done everywhere, or failed and reverted
    # (the revert itself rolls out where the failed write had reached).
    failed = any(r.revision == last[0] and r.phase is Phase.FAILED for r in sim.records)
    if failed:
        assert reverts and reverts[-1][0] > last[0] == max(w[0] for w in real), why
        assert writes[-1] == reverts[-1], why
    else:
        assert writes[-1] == last, why
    if record.phase is Phase.DONE:
        assert record.revision == sim.key_revision, why
    else:
        assert record.phase is Phase.FAILED and record.revision == last[0], why
        assert sim.key_model == model_of(record.good), why
    assert set(sim.final.values()) == {sim.key_model}, why
    # Every write became exactly one rollout, or a later write superseded it.
    started: dict[int, set[str]] = {}
    for r in sim.records:
        started.setdefault(r.revision, set()).add(r.started_at)
    for rev, _, model in real:
        later = [w for w in writes if w[0] > rev]
        assert rev in started or later, f"revision {rev} ({model}) never rolled out\n{why}"
        assert len(started.get(rev, ())) <= 1, f"revision {rev} started twice\n{why}"
    # A write that failed was tried by one instance (its canary), not by the fleet.
    for r in sim.records:
        if r.phase is Phase.FAILED and r.revision:
            model = model_of(r.config)
            tried = [m.name for m in sim.members.values() if model in m.tried
                     and m.name not in faulted]
            limit = 1 if sim.rollout.canary_seconds > 0 else sim.rollout.max_unavailable.slots(
                len(sim.members))
            assert len(tried) <= limit, f"{model} tried by {tried}\n{why}"


async def settle(sim: Sim, seconds: float = 180.0) -> None:
    await sim.until(sim.quiet, seconds, "the fleet at rest")
    before = len(sim.etcd.writes)
    await sim.run_for(5.0)
    stray = [w for w in sim.etcd.writes[before:] if not w[2].startswith("/corral/instances/")]
    assert not stray, f"writes after the fleet came to rest: {stray}\n{sim.explain()}"


# ---- issue 18's sequences -------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 1.5])
@pytest.mark.parametrize("second", ["bad-2", "good-2"])
def test_a_write_right_after_everyone_applied_the_last_one_is_not_lost(
        gap: float, second: str) -> None:
    """Put A; the moment all three run A, put B: B rolls out (or fails on its canary alone
    and the key goes back to A, which everyone ran), never back to the config before A."""

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: all_started(sim, "good-1"), 60, "all started good-1")
        await sim.run_for(gap)
        sim.put(second)
        await settle(sim)

    sim = simulate(scenario)
    check(sim)
    want = "good-2" if second == "good-2" else "good-1"
    assert sim.key_model == want, sim.explain()
    assert all(m.tried[-1] == want for m in sim.live), sim.explain()
    assert all(m.tried.count("good-0") == 1 for m in sim.live), "went back two writes: " \
        + sim.explain()


@pytest.mark.parametrize("second", ["bad-2", "good-2"])
def test_a_write_in_mid_roll_supersedes(second: str) -> None:
    """Put A; once one instance runs it, put B: B is what the fleet ends on (or A's
    predecessor, if B fails: not everyone ran A)."""

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: any(m.model == "good-1" for m in sim.live), 60, "a canary")
        sim.put(second)
        await settle(sim)

    sim = simulate(scenario)
    check(sim)
    assert sim.key_model == ("good-2" if second == "good-2" else "good-0"), sim.explain()


def test_a_rollout_ends_done_when_the_last_instance_dies_before_saying_so() -> None:
    """The last instance starts A and is killed at once: the others finish the record once
    its lease is gone; the next write reverts to A (everyone live ran it) if it fails."""

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: all_started(sim, "good-1"), 60, "all started good-1")
        last = next(m for m in sim.live if m.model != "good-1")
        await sim.kill(last.name)
        await settle(sim)
        assert sim.record is not None and sim.record.phase is Phase.DONE, sim.explain()
        sim.put("bad-2")
        await settle(sim)

    sim = simulate(scenario)
    check(sim, faulted={"i0", "i1", "i2"} - {m.name for m in sim.live})
    assert sim.key_model == "good-1", sim.explain()


def test_a_rollout_ends_done_when_the_last_instance_is_cut_off() -> None:
    """The last instance applies A while cut off from etcd: the others finish the record
    when its lease runs out; back, it registers again and the record stays done."""

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: all_started(sim, "good-1"), 60, "all started good-1")
        last = next(m for m in sim.live if m.model != "good-1")
        sim.partition(last.name)
        await sim.until(lambda: sim.record is not None and sim.record.phase is Phase.DONE,
                        30, "the record done without the cut-off instance")
        sim.heal(last.name)
        await settle(sim)

    sim = simulate(scenario)
    check(sim, faulted={"i0", "i1", "i2"})
    assert sim.key_model == "good-1", sim.explain()


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_an_api_change_racing_an_operator_write_never_overwrites_it(delay: float) -> None:
    """An API change is being tried on one instance when an operator writes the key: the
    change is answered superseded (409) and the operator's write rolls out, or (if the write
    came first) the change is made on top of it; nothing written is lost either way."""
    outcome: list[ChangeRecord | None] = []

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        task = asyncio.create_task(sim.api_change("i1", "api-1"))
        await sim.run_for(delay)
        sim.put("good-2")
        outcome.append(await task)
        await settle(sim)

    sim = simulate(scenario)
    record = outcome[0]
    assert record is not None
    check(sim)
    if record.outcome is Outcome.APPLIED:  # stored before the operator's write, or on it
        writes = [w[2] for w in writes_of_key(sim)]
        assert set(writes) >= {"good-2", "api-1"}, sim.explain()
        assert sim.key_model == writes[-1], sim.explain()
        if writes.index("api-1") > writes.index("good-2"):
            # stored after the operator's write: only as a change made on top of it
            assert record.before is not None, sim.explain()
            assert str(record.before.get("--model")) == "good-2", sim.explain()
    else:
        assert record.outcome is Outcome.SUPERSEDED, sim.explain()
        assert sim.key_model == "good-2", sim.explain()


# ---- random schedules -----------------------------------------------------------------------


async def random_schedule(sim: Sim, rng: random.Random, n: int) -> set[str]:
    """1-4 writes (operator or API; good, bad or crashing) at random moments, with
    partitions and deaths; returns the members that were cut off or killed."""
    await sim.start(n)
    faulted: set[str] = set()
    pending: list[asyncio.Task[Any]] = []
    previous = "good-0"
    for k in range(1, rng.randint(2, 5)):
        moment = rng.choice(["now", "soon", "mid-roll", "after-all-started", "at-rest"])
        if moment == "soon":
            await sim.run_for(rng.uniform(0.0, 2.0))
        elif moment == "mid-roll":
            await _until_or(sim, functools.partial(_running, sim, previous,
                                                   rng.randint(1, len(sim.live))))
        elif moment == "after-all-started":
            await _until_or(sim, functools.partial(all_started, sim, previous))
            await sim.run_for(rng.uniform(0.0, 0.8))
        elif moment == "at-rest":
            await _until_or(sim, sim.quiet)
        fault = rng.random()
        if fault < 0.12 and len(sim.live) > 1:
            victim = rng.choice(sim.live).name
            faulted.add(victim)
            sim.partition(victim)
            pending.append(asyncio.create_task(_heal_later(sim, victim, rng.uniform(0.5, 9.0))))
        elif fault < 0.2 and len(sim.live) > 2:
            victim = rng.choice(sim.live).name
            faulted.add(victim)
            await sim.kill(victim)
        model = f"{rng.choice(['good', 'good', 'good', 'bad', 'crash'])}-{k}"
        if rng.random() < 0.2:
            model = f"{model}-api"
            pending.append(asyncio.create_task(sim.api_change(rng.choice(sim.live).name,
                                                              model)))
        else:
            sim.put(model)
        previous = model
    await asyncio.gather(*pending)
    return faulted


def _running(sim: Sim, model: str, at_least: int) -> bool:
    return sum(m.model == model for m in sim.live) >= at_least


async def _until_or(sim: Sim, condition: Callable[[], object], seconds: float = 20.0) -> None:
    """Until ``condition`` or ``seconds`` (a moment that may never come in this schedule)."""
    with contextlib.suppress(AssertionError):  # the moment not come: go on regardless
        await until(condition, seconds, "a moment of this schedule", interval=0.05)
    condition()  # but a condition that fails (raises) fails the test


async def _heal_later(sim: Sim, name: str, seconds: float) -> None:
    await sim.run_for(seconds)
    if sim.members[name].alive:
        sim.heal(name)


def run_seed(seed: int) -> None:
    rng = random.Random(seed)
    n = 2 + seed % 4
    options = {"max_unavailable": LIMITS[seed % 3],
               "canary_seconds": 0.0 if seed % 7 == 6 else 1.0,
               "lag": [0.0, 0.05, 0.3][(seed // 3) % 3]}
    result: list[set[str]] = []

    async def scenario(sim: Sim) -> None:
        result.append(await random_schedule(sim, rng, n))
        await settle(sim)

    sim = simulate(scenario, seed, **options)
    check(sim, result[0])


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_schedules_keep_every_write(chunk: int) -> None:
    """Seeded random schedules (writes, API changes, partitions, deaths at random moments):
    every one ends at rest with the key on the last write or its revert target, the record
    done or failed, every live instance on the key's config, no write overwritten, and every
    failed write tried by its canary alone."""
    for seed in range(chunk, SEEDS, CHUNKS):
        run_seed(seed)


# ---- regressions the earlier (hand-written) simulation found, now on the shipped agents -----


def test_rollback_by_hand_while_a_slot_is_held() -> None:
    """The operator writes the old config back while the new one is rolling: every instance
    ends on the old one and the rollout of the write-back is done (once a deadlock: an
    instance in sync kept its slot while another waited for it)."""

    async def scenario(sim: Sim) -> None:
        await sim.start(2)
        sim.put("good-1")
        await sim.until(lambda: sim.record is not None and sim.record.phase is Phase.ROLLING,
                        60, "the canary promoted good-1")
        sim.put("good-0")
        await settle(sim)

    sim = simulate(scenario)
    check(sim)
    assert sim.key_model == "good-0", sim.explain()


def test_canary_outside_a_shrunken_percentage() -> None:
    """50 % of 4 instances, and one that is not the canary dies as soon as the canary is
    claimed: the slots shrink to one and the rollout still ends done (once a deadlock)."""

    async def scenario(sim: Sim) -> None:
        await sim.start(4)
        sim.put("good-1")
        await sim.until(lambda: sim.record is not None and sim.record.canary is not None, 60,
                        "a canary claimed")
        canary = sim.record.canary if sim.record else None
        await sim.kill(next(m.name for m in sim.live if m.name != canary))
        await settle(sim)

    sim = simulate(scenario, max_unavailable=MaxUnavailable(percent=50))
    check(sim, faulted={m for m in sim.members if m not in sim.final})
    assert sim.key_model == "good-1", sim.explain()


@pytest.mark.parametrize("seed", range(6))
def test_a_killed_canary_is_replaced(seed: int) -> None:
    """The canary dies mid-apply: its lease runs out, another instance takes the role, and
    the rollout ends done."""

    async def scenario(sim: Sim) -> None:
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: sim.record is not None and sim.record.canary is not None, 60,
                        "a canary claimed")
        await sim.run_for(random.Random(seed).uniform(0.0, 0.6))
        canary = sim.record.canary if sim.record else None
        assert canary is not None
        await sim.kill(canary)
        await settle(sim)
        assert sim.record is not None and sim.record.canary != canary, sim.explain()

    sim = simulate(scenario, seed)
    check(sim, faulted={m for m in sim.members if m not in sim.final})
    assert sim.key_model == "good-1", sim.explain()


def test_a_config_failing_on_one_host_only_marks_that_host() -> None:
    """good-1 fails pre-flight on i2 alone. If i2 is not the canary the rollout ends done
    with i2 marked failed (tried once) and still on good-0; if it is, the rollout fails."""

    async def scenario(sim: Sim) -> None:
        sim.fails_on["i2"] = {"good-1"}
        await sim.start(3)
        sim.put("good-1")
        await sim.until(lambda: sim.record is not None and sim.record.revision
                        and sim.record.phase in (Phase.DONE, Phase.FAILED)
                        and not any(m.controller.pending_changes for m in sim.live),
                        60, "the rollout ended")
        await sim.run_for(5.0)

    sim = simulate(scenario)
    record = sim.record
    assert record is not None
    if record.canary == "i2":
        assert record.phase is Phase.FAILED and sim.key_model == "good-0", sim.explain()
    else:
        assert record.phase is Phase.DONE and sim.key_model == "good-1", sim.explain()
        assert record.progress.get("i2") == "failed", sim.explain()
        assert sim.final == {"i0": "good-1", "i1": "good-1", "i2": "good-0"}, sim.explain()
        assert sim.members["i2"].tried.count("good-1") == 0  # rejected before any start
