"""Helpers for tests/test_reliability.py: counting starts in the supervisor's log, finding fake
llama-servers and their grandchildren, and watching the supervisor from outside.

Everything that waits has a deadline; nothing sleeps a fixed time to let things settle.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.harness import FAKE, SupervisorProcess, pid_alive, wait_for

STARTED = "started llama-server"


def starts(sup: SupervisorProcess) -> int:
    """How many llama-servers this supervisor has started, by its own log."""
    return sup.log().count(STARTED)


def fake_servers(model: Path) -> list[psutil.Process]:
    """Live fake llama-servers (not supervisors, not ``--help`` runs) serving ``model``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            is_fake = any(part.endswith(FAKE.name) for part in cmd[:2])
            is_supervisor = "corral" in cmd[:3]
            if is_fake and not is_supervisor and str(model) in cmd and pid_alive(proc.pid):
                found.append(proc)
    return found


def one_fake_server(model: Path, timeout: float = 5) -> psutil.Process:
    """Exactly one fake server for ``model``, once any stragglers are gone."""
    procs = wait_for(lambda: (p := fake_servers(model)) and len(p) == 1 and p, timeout,
                     f"exactly one fake llama-server for {model}")
    return procs[0]


def pidfile_lines(path: Path) -> list[tuple[int, ...]]:
    """The fake's ``--fake-pidfile``: one line per start, ``child [grandchild]``."""
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()
            if line.strip()]


def grandchildren(path: Path) -> list[int]:
    return [line[1] for line in pidfile_lines(path) if len(line) > 1]


def kill_all(pids: Iterable[int]) -> None:
    """Last-resort cleanup of processes a test started indirectly."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def health_code(port: int) -> int | None:
    """The fake's /health status, or None while nothing answers on ``port``."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    value = call()
    return time.monotonic() - t0, value
