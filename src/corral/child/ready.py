"""Waiting for a started llama-server to become ready.

Ready means ``GET /health`` answered 200 (llama-server answers 503 while it loads the
model) and the process then stayed alive for ``min_healthy_s``. The wait races the health
probes against the process exit, so an early crash is reported at once, not at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from corral.errors import StartFailed
from corral.supervisor.seams import Server

log = logging.getLogger("corral.child")

# Held requests are released at the first /health 200, so the probe interval is their delay.
PROBE_INTERVAL_S = 0.01
FIRST_PROGRESS_S = 1.0  # a user watching a big model load hears from us after 1 s ...
PROGRESS_EVERY_S = 5.0  # ... and then every 5 s


async def wait_ready(
    child: Server,
    health_url: str,
    client: httpx.AsyncClient,
    timeout_s: float,
    min_healthy_s: float,
    on_healthy: Callable[[], None] | None = None,
) -> float:
    """Return the seconds it took to become ready, or raise :class:`StartFailed`.

    ``on_healthy`` runs at the first 200 (the front door releases held requests then);
    the start still counts only after ``min_healthy_s`` more of staying alive.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    next_progress = start + FIRST_PROGRESS_S
    last_status = "no answer yet"
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise StartFailed(
                f"llama-server did not become ready within {timeout_s:g} s "
                f"(last /health: {last_status})", child.output.tail())
        if now >= next_progress:
            log.info("llama-server (pid %d) still loading: %.1f s elapsed, /health: %s",
                     child.pid, now - start, last_status)
            next_progress += PROGRESS_EVERY_S
        last_status = await _probe(client, health_url)
        if last_status == "200":
            if on_healthy is not None:
                on_healthy()
            break
        await _sleep_or_exit(child, min(PROBE_INTERVAL_S, max(0.0, deadline - now)), start)
    await _sleep_or_exit(child, min_healthy_s, start)
    return time.monotonic() - start


# Words of llama-server's own lines that say why it gave up, most telling first.
TELLING = ("out of memory", "failed to allocate", "error", "failed", "invalid", "unknown")


def telling_line(lines: list[str]) -> str | None:
    """The last output line that says why a start failed (trimmed), if any does: the reason
    then reads "exited with code 1 after 0.3 s: ...failed to allocate ..." in every answer
    and event, not only in the log."""
    for words in TELLING:
        for line in reversed(lines):
            if words in line.lower():
                return line.strip()[:300]
    return None


async def _probe(client: httpx.AsyncClient, url: str) -> str:
    try:
        response = await client.get(url, timeout=2.0)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return str(response.status_code)


async def _sleep_or_exit(child: Server, seconds: float, start: float) -> None:
    done, _ = await asyncio.wait({child.exited}, timeout=seconds)
    if done:
        tail = child.output.tail()
        why = telling_line(tail)
        raise StartFailed(
            f"llama-server exited with code {child.exited.result()} "
            f"after {time.monotonic() - start:.1f} s" + (f": {why}" if why else ""), tail)


async def probe_health(client: httpx.AsyncClient, url: str) -> bool:
    """One liveness probe, for hang detection: does /health answer 200?"""
    return await _probe(client, url) == "200"
