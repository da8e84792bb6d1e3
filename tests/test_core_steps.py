"""corral.core.steps: desired config, no-op detection (only while serving), steps per strategy."""

from __future__ import annotations

import pytest

from corral.core.args import Change, LlamaConfig
from corral.core.steps import (
    AwaitReady,
    Drain,
    Hold,
    Persist,
    Slot,
    Start,
    Stop,
    Strategy,
    Switch,
    batch_kind,
    plan_batch,
)

GOOD = LlamaConfig("llama-server", (("--model", "a.gguf"), ("--port", "8081")))
NEW = LlamaConfig("llama-server", (("--model", "b.gguf"), ("--port", "8081")))
A, C = Slot.ACTIVE, Slot.CANDIDATE


def ch(binary: str | None = None, **args: str | bool | None) -> Change:
    return Change(binary, tuple((f"--{k}", v) for k, v in args.items()))


CASES = [
    # name, serving, batch, desired, is_noop
    ("empty batch while serving", True, [], GOOD, True),
    ("empty batch in backoff/FATAL restarts", False, [], GOOD, False),
    ("same value while serving", True, [ch(model="a.gguf")], GOOD, True),
    ("same value, not serving", False, [ch(model="a.gguf")], GOOD, False),
    ("same binary", True, [ch("llama-server")], GOOD, True),
    ("remove absent flag", True, [ch(ctx=None)], GOOD, True),
    ("set then revert in batch", True, [ch(model="b.gguf"), ch(model="a.gguf")], GOOD, True),
    ("change", True, [ch(model="b.gguf")], NEW, False),
    ("binary change", True, [ch("/opt/llama-server")],
     LlamaConfig("/opt/llama-server", GOOD.args), False),
    ("add flag", True, [ch(cb=True)],
     LlamaConfig("llama-server", (*GOOD.args, ("--cb", True))), False),
    ("remove flag", True, [ch(port=None)],
     LlamaConfig("llama-server", (("--model", "a.gguf"),)), False),
    ("merged, later wins", True, [ch(model="b.gguf", ctx="1"), ch(model="c.gguf")],
     LlamaConfig("llama-server", (("--model", "c.gguf"), ("--port", "8081"), ("--ctx", "1"))),
     False),
]


@pytest.mark.parametrize(("serving", "batch", "desired", "is_noop"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_plan_batch_desired_and_noop(serving: bool, batch: list[Change], desired: LlamaConfig,
                                     is_noop: bool) -> None:
    """The plan's config is last good ⊕ merged batch; a no-op only while it already serves."""
    plan = plan_batch(GOOD, serving, batch)
    assert plan.desired == desired
    assert plan.is_noop is is_noop


def test_same_flags_in_another_order_keep_the_running_config() -> None:
    """A reordering is no change: the plan keeps the running config object (no restart)."""
    reordered = Change(None, (("--port", "8081"), ("--model", "a.gguf")), replace=True)
    plan = plan_batch(GOOD, True, [reordered])
    assert plan.is_noop and plan.desired is GOOD


STEPS = [
    ("stop-first", True, Strategy.STOP_FIRST, True,
     (Hold(), Drain(A), Stop(A), Start(NEW, A), AwaitReady(A), Persist(NEW))),
    ("start-first", True, Strategy.START_FIRST, True,
     (Start(NEW, C), AwaitReady(C), Persist(NEW), Switch(), Drain(C), Stop(C))),
    ("nothing serving ignores the strategy", False, Strategy.START_FIRST, True,
     (Start(NEW, A), AwaitReady(A), Persist(NEW))),
    ("a fleet config is not stored again", True, Strategy.STOP_FIRST, False,
     (Hold(), Drain(A), Stop(A), Start(NEW, A), AwaitReady(A))),
    ("start-first without persist", True, Strategy.START_FIRST, False,
     (Start(NEW, C), AwaitReady(C), Switch(), Drain(C), Stop(C))),
]


@pytest.mark.parametrize(("serving", "strategy", "persist", "steps"), [s[1:] for s in STEPS],
                         ids=[s[0] for s in STEPS])
def test_steps_per_strategy(serving: bool, strategy: Strategy, persist: bool,
                            steps: tuple[object, ...]) -> None:
    """Each strategy lays out its steps in the documented order."""
    plan = plan_batch(GOOD, serving, [ch(model="b.gguf")], strategy, persist)
    assert plan.steps == steps
    assert plan.strategy is (strategy if serving else Strategy.STOP_FIRST)


def test_start_first_stores_before_it_switches() -> None:
    """A store failure must reject the change before clients were moved to the new server."""
    steps = plan_batch(GOOD, True, [ch(model="b.gguf")], Strategy.START_FIRST).steps
    assert steps.index(Persist(NEW)) < steps.index(Switch())


def test_stop_first_drains_before_it_stops() -> None:
    """llama-server does not exit on SIGTERM with requests in flight: drain comes first."""
    steps = plan_batch(GOOD, True, [ch(model="b.gguf")], Strategy.STOP_FIRST).steps
    assert steps.index(Drain(A)) < steps.index(Stop(A))


@pytest.mark.parametrize(("sources", "kind"), [
    (["api"], (True, False)), (["fleet"], (False, False)), (["restart"], (False, True)),
    (["fleet", "restart"], (False, True)), (["api", "restart"], (True, True)),
    (["revert", "fleet"], (True, False)), ([], (False, False)),
])
def test_batch_kind(sources: list[str], kind: tuple[bool, bool]) -> None:
    """A fleet config is stored already and a restart stores nothing; any restart runs the plan."""
    assert batch_kind(sources) == kind

