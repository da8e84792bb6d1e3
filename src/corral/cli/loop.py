"""Which event loop runs a long-lived command: uvloop when it is installed (``--loop auto``),
else asyncio's own.

Measured on the front door (README, "Benchmarks"): uvloop spends less CPU per proxied
request than asyncio's selector loop. Everything Corral does on a loop works on both: the
front door's protocols, the pidfd reader that notices a child's exit, signal handlers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from corral.front import COMPILED

__all__ = ["LOOPS", "loop_factory", "run"]

log = logging.getLogger("corral")
T = TypeVar("T")
LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str = "auto") -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(the loop's name, a factory of it) for ``--loop``; ``uvloop`` when it is not
    installed raises ImportError, ``auto`` then falls back to asyncio."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    name, factory = loop_factory(choice)
    log.info("event loop: %s; front door: %s", name,
             "compiled (mypyc)" if COMPILED else "pure Python")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
