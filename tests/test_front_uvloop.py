"""Every in-process front door test again on uvloop: the front door works on either loop
(uvloop differs where it matters here: a write to a closed transport raises)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest

from tests import test_front_edge, test_front_forward, test_front_routing

uvloop = pytest.importorskip("uvloop")

def cases(test: Callable[..., Awaitable[None]]) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The test, or one case per parameter set of its ``pytest.mark.parametrize``."""
    marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
    if not marks:
        return [("", test)]
    names, values = marks[0].args[0], marks[0].args[1]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    return [(f"[{i}]", functools.partial(test, **dict(zip(names, v if len(names) > 1 else [v],
                                                            strict=True))))
            for i, v in enumerate(values)]


SCENARIOS: dict[str, Callable[[], Awaitable[None]]] = {
    f"{mod.__name__.rsplit('_', 1)[1]}:{name}{suffix}": case
    for mod in (test_front_forward, test_front_routing, test_front_edge)
    for name in sorted(dir(mod)) if name.startswith("test_")
    for suffix, case in cases(getattr(mod, name))
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_uvloop(name: str) -> None:
    """The scenario passes on uvloop as it does on asyncio's own loop."""
    uvloop.run(SCENARIOS[name]())  # type: ignore[arg-type]
