"""Every in-process front door test again on uvloop: the front door works on either loop
(uvloop differs where it matters here: a write to a closed transport raises)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests import test_front_edge, test_front_forward, test_front_routing

uvloop = pytest.importorskip("uvloop")

SCENARIOS: dict[str, Callable[[], Awaitable[None]]] = {
    f"{mod.__name__.rsplit('_', 1)[1]}:{name}": getattr(mod, name)
    for mod in (test_front_forward, test_front_routing, test_front_edge)
    for name in sorted(dir(mod)) if name.startswith("test_")
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_uvloop(name: str) -> None:
    """The scenario passes on uvloop as it does on asyncio's own loop."""
    uvloop.run(SCENARIOS[name]())  # type: ignore[arg-type]
