"""corral serve's placement rules (corral.core.placement.plan), pure: no clock, no servers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.placement import (
    Evict,
    Limits,
    Load,
    ModelState,
    Phase,
    Reason,
    Refuse,
    parse_memory,
    plan,
)
from corral.errors import UsageError

GIB = 1024.0


def m(model_id: str, phase: Phase = Phase.UNLOADED, need: float = 1000.0, **kw: object
      ) -> ModelState:
    return ModelState(model_id, phase, {"host": need}, **kw)  # type: ignore[arg-type]


def loaded(model_id: str, need: float = 1000.0, **kw: object) -> ModelState:
    kw.setdefault("idle_s", 60.0)
    return m(model_id, Phase.LOADED, need, **kw)


def test_a_held_model_that_fits_is_loaded() -> None:
    """A model with held requests and room for it: Load, nothing evicted."""
    assert plan([m("a", held=1)], Limits({"host": 2000})) == [Load("a")]


def test_models_without_requests_are_left_alone() -> None:
    """No held request, no load: models load on demand only."""
    assert plan([m("a"), loaded("b")], Limits({"host": 5000})) == []


def test_two_models_that_fit_together_load_in_parallel() -> None:
    """Both fit: both load at once, no eviction."""
    assert plan([m("a", held=1, oldest_held_s=2), m("b", held=1)],
                Limits({"host": 2500})) == [Load("a"), Load("b")]


def test_an_idle_model_is_evicted_for_memory_then_the_waiter_loads() -> None:
    """No room: the idle resident one goes (memory), and the waiter loads once it has."""
    models = [loaded("b"), m("a", held=1)]
    assert plan(models, Limits({"host": 1500})) == [Evict("b", Reason.MEMORY)]
    gone = [m("b"), m("a", held=1)]
    assert plan(gone, Limits({"host": 1500})) == [Load("a")]


def test_the_count_limit_evicts_for_count() -> None:
    """--max-models 1: the idle resident one goes, with reason count."""
    assert plan([loaded("b"), m("a", held=1)], Limits(max_models=1)) == \
        [Evict("b", Reason.COUNT)]


def test_least_recently_used_idle_model_goes_first() -> None:
    """Of two idle models, the one idle longest is evicted, and only as many as needed."""
    models = [loaded("recent", idle_s=5.0), loaded("old", idle_s=500.0), m("a", held=1)]
    assert plan(models, Limits({"host": 2500})) == [Evict("old", Reason.MEMORY)]


def test_a_busy_model_keeps_serving_until_the_waiter_waited_max_wait() -> None:
    """In flight, the waiter's oldest request under --max-wait: nothing happens; at it,
    the busy model is evicted for fairness."""
    limits = Limits({"host": 1500}, max_wait_s=10)
    busy = loaded("b", in_flight=2, idle_s=None)
    assert plan([busy, m("a", held=3, oldest_held_s=9.9)], limits) == []
    assert plan([busy, m("a", held=3, oldest_held_s=10.0)], limits) == \
        [Evict("b", Reason.FAIRNESS)]


def test_a_model_used_within_the_idle_grace_counts_as_busy() -> None:
    """An agent's next request follows within the grace: no swap in between."""
    limits = Limits(max_models=1, idle_grace_s=1.0)
    just_used = loaded("b", idle_s=0.4)
    assert plan([just_used, m("a", held=1, oldest_held_s=0.5)], limits) == []
    assert plan([loaded("b", idle_s=1.0), m("a", held=1)], limits) == \
        [Evict("b", Reason.COUNT)]


def test_a_pinned_model_is_never_evicted() -> None:
    """Pinned: not for memory, not for fairness, not for its ttl; a model that only fits
    without it is refused at once, naming it (not left to time out)."""
    pinned = loaded("p", pinned=True, ttl_s=5, idle_s=100)
    for limits in (Limits(max_models=1), Limits({"host": 1500})):
        actions = plan([pinned, m("a", held=1, oldest_held_s=99)], limits)
        assert [type(a) for a in actions] == [Refuse], actions
        assert "beside the pinned model(s) p" in actions[0].why  # type: ignore[union-attr]
    busy_pinned = loaded("p", pinned=True, in_flight=1, idle_s=None)
    assert [type(a) for a in plan([busy_pinned, m("a", held=1, oldest_held_s=99)],
                                  Limits(max_models=1))] == [Refuse]
    assert plan([pinned, m("a", held=1)], Limits({"host": 2500})) == [Load("a")]
    assert plan([pinned, loaded("b"), m("a", held=1)], Limits({"host": 2500})) == \
        [Evict("b", Reason.MEMORY)]  # the unpinned one goes; the pinned one stays


def test_a_model_past_its_ttl_is_unloaded_when_idle() -> None:
    """ttl: idle past it -> Evict(ttl); busy or under it -> kept; 0 -> never."""
    assert plan([loaded("a", ttl_s=30, idle_s=31)], Limits()) == [Evict("a", Reason.TTL)]
    assert plan([loaded("a", ttl_s=30, idle_s=29)], Limits()) == []
    assert plan([loaded("a", ttl_s=30, idle_s=31, in_flight=1)], Limits()) == []
    assert plan([loaded("a", ttl_s=0, idle_s=10_000)], Limits()) == []


def test_a_model_too_big_even_alone_is_refused_with_figures() -> None:
    """It can never fit: Refuse with both figures, and nothing is evicted for it."""
    actions = plan([loaded("b"), m("huge", need=9000, held=1)], Limits({"host": 8000}))
    assert len(actions) == 1 and isinstance(actions[0], Refuse), actions
    assert "9000 MiB > 8000 MiB" in actions[0].why


def test_nothing_is_evicted_when_even_every_idle_model_would_not_make_room() -> None:
    """The busy one is not yet due for fairness: evicting the idle one alone would not be
    enough, so it is kept (no pointless unload)."""
    limits = Limits({"host": 2500}, max_wait_s=10)
    models = [loaded("busy", in_flight=1, idle_s=None), loaded("idle"),
              m("a", need=1600, held=1, oldest_held_s=1)]
    assert plan(models, limits) == []


def test_memory_being_freed_counts_as_gone() -> None:
    """A model unloading frees its memory soon: no second eviction for the same waiter."""
    models = [m("b", Phase.UNLOADING), loaded("c"), m("a", held=1)]
    assert plan(models, Limits({"host": 2500})) == []


def test_a_waiting_model_keeps_its_place() -> None:
    """The longest waiter's need is reserved: a later, smaller one loads only into what
    the first does not need."""
    models = [loaded("busy", need=1000, in_flight=1, idle_s=None),
              m("first", need=1000, held=1, oldest_held_s=5),
              m("small", need=500, held=1, oldest_held_s=1)]
    # 'small' alone would fit in 1800 (1000 + 500), but 'first' waited longer.
    assert plan(models, Limits({"host": 1800}, max_wait_s=10)) == []
    assert plan(models, Limits({"host": 2600}, max_wait_s=10)) == [Load("first"),
                                                                   Load("small")]


def test_per_device_limits_apply_per_device() -> None:
    """A GPU limit holds even when the host has room."""
    gpu = ModelState("g", Phase.UNLOADED, {"host": 100, "cuda0": 7000}, held=1)
    other = ModelState("o", Phase.LOADED, {"host": 100, "cuda0": 5000}, idle_s=60)
    limits = Limits({"host": 64 * GIB, "cuda0": 10 * GIB})
    assert plan([other, gpu], limits) == [Evict("o", Reason.MEMORY)]


@pytest.mark.parametrize(("spec", "want"), [
    ("1500MiB", {"host": 1500}), ("8GiB", {"host": 8192}), ("8G", {"host": 8192}),
    ("host=12GiB,cuda0=20GiB", {"host": 12288, "cuda0": 20480}), ("512", {"host": 512 / 1024 ** 2}),
])
def test_max_memory_specs(spec: str, want: dict[str, float]) -> None:
    """--max-memory reads sizes with units, bare bytes, and per-device lists."""
    assert parse_memory(spec) == pytest.approx(want)


@pytest.mark.parametrize("spec", ["", "lots", "8XB", "host=", "=8GiB", "-1GiB"])
def test_bad_max_memory_is_a_usage_error(spec: str) -> None:
    """A size that cannot be read says how to write one."""
    with pytest.raises(UsageError, match="--max-memory"):
        parse_memory(spec)


phases = st.sampled_from(list(Phase))
states = st.builds(
    lambda i, phase, need, in_flight, held, wait, idle, pinned, ttl: ModelState(
        f"m{i}", phase, {"host": need}, in_flight, held, wait, idle, pinned, ttl),
    st.integers(0, 1000), phases, st.floats(100, 3000), st.integers(0, 3), st.integers(0, 3),
    st.floats(0, 30), st.one_of(st.none(), st.floats(0, 100)), st.booleans(),
    st.sampled_from([0.0, 5.0]))


@settings(max_examples=400, deadline=None)
@given(st.lists(states, max_size=6, unique_by=lambda s: s.id), st.floats(1000, 6000),
       st.one_of(st.none(), st.integers(1, 3)))
def test_plans_never_break_the_rules(models: list[ModelState], limit: float,
                                     count: int | None) -> None:
    """Whatever the snapshot: pinned models are never evicted; only loaded models are
    evicted and only unloaded ones loaded, each at most once; loads never exceed the
    limits once the evictions finish; busy models go only for fairness."""
    limits = Limits({"host": limit}, count, max_wait_s=10, idle_grace_s=1)
    actions = plan(models, limits)
    by_id = {s.id: s for s in models}
    ids = [a.id for a in actions]
    assert len(ids) == len(set(ids)), actions
    evicted = {a.id for a in actions if isinstance(a, Evict)}
    loads = {a.id for a in actions if isinstance(a, Load)}
    for a in actions:
        s = by_id[a.id]
        if isinstance(a, Evict):
            assert s.phase is Phase.LOADED and not s.pinned, (a, s)
            if not s.is_idle(limits.idle_grace_s):
                assert a.reason is Reason.FAIRNESS
        elif isinstance(a, Load):
            assert s.phase is Phase.UNLOADED and s.held > 0, (a, s)
    staying = [s for s in models if s.phase in (Phase.LOADING, Phase.LOADED)
               and s.id not in evicted] + [by_id[i] for i in loads]
    if loads:
        assert sum(s.need_mib["host"] for s in staying) <= limit + 1e-6, actions
        if count is not None:
            assert len(staying) <= count, actions
