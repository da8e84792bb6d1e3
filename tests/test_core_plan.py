"""corral.core.plan: desired config, no-op detection (only while serving), rollback target."""

from __future__ import annotations

import pytest

from corral.core.args import Change, LlamaConfig
from corral.core.plan import plan_batch

GOOD = LlamaConfig("llama-server", (("--model", "a.gguf"), ("--port", "8081")))


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
    ("change", True, [ch(model="b.gguf")],
     LlamaConfig("llama-server", (("--model", "b.gguf"), ("--port", "8081"))), False),
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
def test_plan_batch(serving: bool, batch: list[Change], desired: LlamaConfig,
                    is_noop: bool) -> None:
    plan = plan_batch(GOOD, serving, batch)
    assert plan.desired == desired
    assert plan.is_noop is is_noop
    assert plan.rollback_to == GOOD  # a failed apply goes back to the last good config


def test_plan_does_not_touch_its_inputs() -> None:
    batch = [ch(model="b.gguf")]
    plan_batch(GOOD, True, batch)
    assert GOOD.get("--model") == "a.gguf"
    assert batch == [ch(model="b.gguf")]
