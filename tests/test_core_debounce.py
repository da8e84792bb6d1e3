"""corral.core.debounce: the batch window, and the proposal's two debounce examples.

Time is a number passed in; the tests use milliseconds so that every deadline is exact.
The examples run in a tiny pure simulation of the applier (see :func:`simulate`): requests
arrive at given times, a batch is taken when it is due and the applier is idle, planned
with :func:`plan_batch`, and a restart keeps the applier busy for ``restart`` ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.args import (
    Change,
    ChangeValue,
    FlagCatalog,
    LlamaConfig,
    apply_change,
    parse_change,
    parse_help,
)
from corral.core.debounce import Debouncer
from corral.core.steps import plan_batch
from tests.fake_llama_server import HELP as FAKE_HELP

FAKE = parse_help(FAKE_HELP)

# --- the Debouncer alone ----------------------------------------------------------------

DEADLINE_CASES = [
    # name, window, max_age, add times, expected deadline
    ("empty", 200, 2000, [], None),
    ("one", 200, 2000, [0], 200),
    ("quiet window restarts", 200, 2000, [0, 100], 300),
    ("burst", 200, 2000, [0, 20, 100, 200], 400),
    ("max age caps", 200, 2000, [0, 150, 300, 1900], 2000),
    ("max age shorter than window", 500, 300, [10], 310),
    ("zero window", 0, 2000, [7], 7),
    ("late start", 200, 2000, [5000, 5100], 5300),
]


@pytest.mark.parametrize(("window", "max_age", "adds", "deadline"),
                         [c[1:] for c in DEADLINE_CASES], ids=[c[0] for c in DEADLINE_CASES])
def test_deadline(window: float, max_age: float, adds: list[float],
                  deadline: float | None) -> None:
    """A batch is due a window after its last add, capped at max_age after its first."""
    d: Debouncer[int] = Debouncer(window, max_age)
    for i, t in enumerate(adds):
        d.add(i, t)
    assert d.pending == len(adds)
    assert d.deadline() == deadline
    if deadline is None:
        assert not d.is_due(math.inf)
        assert d.take(math.inf) == []
    else:
        assert not d.is_due(deadline - 1)
        assert d.take(deadline - 1) == []
        assert d.pending == len(adds)  # an early take keeps everything
        assert d.is_due(deadline)
        assert d.take(deadline) == list(range(len(adds)))
        assert d.pending == 0
        assert d.deadline() is None


def test_steady_stream_every_150ms_closes_at_2s() -> None:
    """A stream never quiet for a window still closes a batch at max_age, then starts anew."""
    d: Debouncer[int] = Debouncer(200, 2000)
    for i, t in enumerate(range(0, 2000, 150)):  # 0 .. 1950: never quiet for 200 ms
        assert d.take(t) == []
        d.add(i, t)
    assert d.deadline() == 2000
    assert d.take(1999) == []
    assert d.take(2000) == list(range(14))
    for i, t in enumerate(range(2100, 4200, 150)):  # the stream goes on: the next batch
        assert d.take(t) == []  # is 2 s old at 4100
        d.add(i, t)
    assert d.deadline() == 4100
    assert d.take(4100) == list(range(14))


def test_take_starts_a_fresh_window() -> None:
    """After a take the next batch's deadline counts from its own first add."""
    d: Debouncer[str] = Debouncer(200, 2000)
    d.add("a", 0)
    assert d.take(200) == ["a"]
    d.add("b", 1999)  # an old first_at must not make the new batch due at once
    assert d.deadline() == 2199
    assert d.take(2000) == []
    assert d.take(2199) == ["b"]


# --- the applier simulation -------------------------------------------------------------

Request = tuple[float, dict[str, ChangeValue]]
START = LlamaConfig("llama-server", (("--model", "start.gguf"),))


@dataclass
class Run:
    starts: list[tuple[float, LlamaConfig]] = field(default_factory=list)
    noops: list[float] = field(default_factory=list)
    batches: list[tuple[float, int]] = field(default_factory=list)  # (taken at, size)

    @property
    def restarts(self) -> int:
        return len(self.starts)

    def started_models(self) -> list[str | bool | None]:
        return [config.get("--model") for _, config in self.starts]


def simulate(requests: list[Request], *, window: float = 200, max_age: float = 2000,
             restart: float = 2000, catalog: FlagCatalog | None = None,
             initial: LlamaConfig = START) -> Run:
    """Drive a Debouncer like the applier does; each apply keeps it busy for ``restart``.

    Requests that arrive at the same instant as a deadline join the batch first.
    """
    debouncer: Debouncer[Change] = Debouncer(window, max_age)
    pending = sorted(requests, key=lambda r: r[0])
    run, current, busy_until, i = Run(), initial, -math.inf, 0
    for _ in range(10 * len(requests) + 10):
        if i == len(pending) and not debouncer.pending:
            return run
        deadline = debouncer.deadline()
        next_take = math.inf if deadline is None else max(deadline, busy_until)
        now = min(pending[i][0] if i < len(pending) else math.inf, next_take)
        while i < len(pending) and pending[i][0] <= now:
            debouncer.add(parse_change(pending[i][1], catalog), pending[i][0])
            i += 1
        if now < busy_until or not (batch := debouncer.take(now)):
            continue
        run.batches.append((now, len(batch)))
        plan = plan_batch(current, True, batch)
        if plan.is_noop:
            run.noops.append(now)
            continue
        run.starts.append((now, plan.desired))
        current, busy_until = plan.desired, now + restart
    raise AssertionError("simulation did not settle")


def test_proposal_example_1_one_apply() -> None:
    """Proposal example 1: four requests within windows make one batch and one restart."""
    run = simulate([
        (0, {"model": "foo.gguf"}),
        (20, {"model": "baz.gguf", "cb": 5}),
        (100, {"model": "foo.gguf"}),
        (200, {"cb": 6}),
    ])
    assert run.batches == [(400, 4)]
    assert run.starts == [
        (400, LlamaConfig("llama-server", (("--model", "foo.gguf"), ("--cb", "6"))))]
    assert run.restarts == 1


def test_proposal_example_1_with_catalog() -> None:
    """Proposal example 1 with the fake catalog: aliases merge into one start at 400 ms."""
    # The fake binary's -cb takes no value, so the example's "cb": 5 becomes -np here.
    run = simulate([
        (0, {"model": "foo.gguf"}),
        (20, {"-m": "baz.gguf", "np": 5}),
        (100, {"--model": "foo.gguf"}),
        (200, {"-np": 6}),
    ], catalog=FAKE)
    assert run.starts == [
        (400, LlamaConfig("llama-server", (("--model", "foo.gguf"), ("--parallel", "6"))))]


def test_proposal_example_2_bar_is_never_started() -> None:
    """Proposal example 2: bar, superseded while foo restarts, is never started."""
    run = simulate([
        (200, {"model": "foo.gguf"}),
        (401, {"model": "bar.gguf"}),
        (602, {"model": "baz.gguf"}),
    ], window=200, restart=2000)
    assert run.started_models() == ["foo.gguf", "baz.gguf"]
    assert [t for t, _ in run.starts] == [400, 2400]  # baz only after foo is done
    assert run.batches == [(400, 1), (2400, 2)]
    assert run.restarts == 2
    assert "bar.gguf" not in run.started_models()


SCENARIOS: list[tuple[str, list[Request], dict[str, float], list[str | bool | None], int]] = [
    # name, requests, simulate kwargs, started models, no-op batches
    ("single", [(0, {"model": "a"})], {}, ["a"], 0),
    ("same as running is a no-op", [(0, {"model": "start.gguf"})], {}, [], 1),
    ("set and revert in one batch", [(0, {"model": "x"}), (50, {"model": "start.gguf"})],
     {}, [], 1),
    ("two quiet batches", [(0, {"model": "a"}), (3000, {"model": "b"})], {}, ["a", "b"], 0),
    ("fast restart: bar is started", [(200, {"model": "foo"}), (401, {"model": "bar"}),
                                      (602, {"model": "baz"})],
     {"restart": 100}, ["foo", "bar", "baz"], 0),
    ("revert during apply is applied", [(0, {"model": "a"}), (500, {"model": "start.gguf"})],
     {}, ["a", "start.gguf"], 0),
    ("steady stream, 2 s restarts",
     [(t, {"model": f"m{t}"}) for t in range(0, 3000, 150)], {},
     ["m1950", "m2850"], 0),
]


@pytest.mark.parametrize(("requests", "kwargs", "models", "noops"),
                         [c[1:] for c in SCENARIOS], ids=[c[0] for c in SCENARIOS])
def test_scenarios(requests: list[Request], kwargs: dict[str, float],
                   models: list[str], noops: int) -> None:
    """No-op batches start nothing; a revert mid-apply applies; fast restarts start them all."""
    run = simulate(requests, **kwargs)
    assert run.started_models() == models
    assert len(run.noops) == noops


@given(st.lists(st.tuples(st.integers(0, 6000), st.sampled_from(["a", "b", "c", None])),
                max_size=25),
       st.integers(0, 400), st.integers(0, 3000))
def test_simulation_invariants(arrivals: list[tuple[int, str | None]], window: int,
                               restart: int) -> None:
    """Batches hold every request once, never overlap, and start all known when taken."""
    requests: list[Request] = [(t, {"model": m, f"k{t % 3}": str(t)}) for t, m in arrivals]
    run = simulate(requests, window=window, max_age=2000, restart=restart)
    ordered = sorted(requests, key=lambda r: r[0])
    # Every request ends up in exactly one batch; batches only close when due.
    assert sum(n for _, n in run.batches) == len(requests)
    # Restarts never overlap: an apply is not interrupted.
    times = [t for t, _ in run.starts]
    assert all(b - a >= restart for a, b in zip(times, times[1:], strict=False))
    # What starts is always everything known when the batch was taken: nothing superseded.
    for taken_at, config in run.starts:
        expected = START
        for t, raw in ordered:
            if t <= taken_at:
                expected = apply_change(expected, parse_change(raw, None))
        assert config.as_dict() == expected.as_dict()
    # And the last state is what the requests add up to.
    final = START
    for _, raw in ordered:
        final = apply_change(final, parse_change(raw, None))
    last = run.starts[-1][1] if run.starts else START
    assert last.as_dict() == final.as_dict()
