"""The one way a test waits: poll a condition until it holds, or fail at a deadline.

:func:`wait_for` for threads and processes, :func:`until` (its twin) inside an event loop.
Both return what the condition returned, so a wait can hand back what it found (a record, a
status). A condition that raises counts as "not yet" (things fail while they start) and the
last error is in the failure message; ``explain`` adds what the test knows at that moment.
Nothing here sleeps a fixed time to "let things settle": the interval only paces the polls.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _failure(timeout: float, what: str, last_exc: Exception | None,
             explain: Callable[[], str] | None) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what}"
                          + (f" (last error: {last_exc!r})" if last_exc else "")
                          + (f"\n{explain()}" if explain else ""))


def wait_for(condition: Callable[[], T], timeout: float, what: str,
             interval: float = 0.02, *, explain: Callable[[], str] | None = None) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:  # noqa: BLE001 - conditions may fail while things start
            last_exc, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise _failure(timeout, what, last_exc, explain)


async def until(condition: Callable[[], Any], timeout: float, what: str,
                interval: float = 0.01, *, explain: Callable[[], str] | None = None) -> Any:
    """:func:`wait_for` inside an event loop (the loop's clock, so virtual time works too);
    ``condition`` may return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_exc: Exception | None = None
    while loop.time() < deadline:
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # noqa: BLE001 - conditions may fail while things start
            last_exc, value = exc, None
        if value:
            return value
        await asyncio.sleep(interval)
    raise _failure(timeout, what, last_exc, explain)
