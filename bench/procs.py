"""Watching processes from outside: /health probes, /proc scans and RSS samples.

The /proc parsing itself is shared with the tests (``tests.procfs``). Every wait has a
deadline; times are ``time.perf_counter()``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import stats
from tests import procfs


def http_status(port: int, path: str = "/health", timeout: float = 1.0) -> int | None:
    """One HTTP/1.1 GET on a fresh connection; the status code, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            head = s.recv(64)
        return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_health(port: int, timeout: float = 120.0, interval: float = 0.001) -> float:
    """Poll /health until 200; return perf_counter() of the 200."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if http_status(port) == 200:
            return time.perf_counter()
        time.sleep(interval)
    raise TimeoutError(f"/health on port {port} not 200 within {timeout} s")


def is_torn_down(pid: int) -> bool:
    """Gone, or a zombie with no thread left: the kernel has torn the whole process down
    (its memory too) and notified the parent; only the parent's wait is left. (The leader of
    a multi-threaded process shows 'Z' as soon as its own thread exits, while the others,
    and the unmapping of the model, are still going: hence the thread count.)"""
    return len(procfs.threads(pid)) <= 1 and procfs.state(pid) in ("", "Z", "X")


class ChildWatch:
    """Finds a new child of ``ppid`` running ``binary`` by scanning /proc in a tight loop.

    ``wait_new`` returns (pid, t_dead, t_seen, t_exec): when ``old`` was first seen dead (a
    zombie or gone: the kernel finished tearing it down and told the parent), when the new
    pid first showed up under the parent (fork; still the parent's image) and when it was
    seen running ``binary`` (exec). Each is an upper bound whose error is at most one loop
    period (see ``resolution``).
    """

    def __init__(self, ppid: int, binary: Path) -> None:
        self.ppid = ppid
        self.binary = os.path.realpath(binary)
        self.known: set[str] = set()
        self.snapshot()

    def snapshot(self) -> None:
        self.known = set(os.listdir("/proc"))

    def current(self) -> int | None:
        """The parent's child running ``binary`` now, if any (not a zombie)."""
        for name in os.listdir("/proc"):
            if (name.isdigit() and procfs.parent_pid(name) == self.ppid
                    and procfs.exe(name) == self.binary):
                return int(name)
        return None

    def _new_child(self, names: list[str]) -> int | None:
        """The first pid in ``names`` not seen before whose parent is ``ppid``."""
        for name in names:
            if name in self.known or not name.isdigit():
                continue
            self.known.add(name)
            if procfs.parent_pid(name) == self.ppid:
                return int(name)
        return None

    def wait_new(self, old: int, timeout: float = 30.0) -> tuple[int, float, float, float]:
        deadline = time.perf_counter() + timeout
        cand: int | None = None
        t_seen = t_dead = 0.0
        while True:
            names = os.listdir("/proc")
            if not t_dead and is_torn_down(old):
                t_dead = time.perf_counter()
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"no new child of {self.ppid} within {timeout} s")
            if cand is None and (cand := self._new_child(names)) is not None:
                t_seen = now
            if cand is not None:
                exe = procfs.exe(cand)
                if exe == self.binary:
                    return cand, t_dead or t_seen, t_seen, time.perf_counter()
                if exe is None:  # gone (a failed exec?): look again
                    cand = None

    def resolution(self, seconds: float = 0.3) -> dict[str, Any]:
        """The scan loop's own period while nothing happens (the measurement's resolution)."""
        known = set(os.listdir("/proc"))
        gaps = []
        last = time.perf_counter()
        end = last + seconds
        while last < end:
            for name in os.listdir("/proc"):
                if name not in known and name.isdigit():
                    known.add(name)
                    procfs.parent_pid(name)
            is_torn_down(1)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return {"iterations": len(gaps), **stats(gaps, digits=4)}


def rss_sampler(pid: int, stop: Callable[[], bool], interval: float = 0.05) -> list[int]:
    """Sample the RSS of ``pid`` (bytes) until ``stop()``; run it in a thread."""
    import psutil

    proc = psutil.Process(pid)
    out = []
    while not stop():
        with contextlib.suppress(psutil.Error):
            out.append(proc.memory_info().rss)
        time.sleep(interval)
    return out


@contextlib.contextmanager
def rss_during(pid: int, interval: float = 0.05) -> Iterator[list[int]]:
    """Sample the RSS of ``pid`` in a thread while the block runs; the list it yields holds
    the samples (bytes) once the block is left."""
    samples: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=lambda: samples.extend(rss_sampler(pid, stop.is_set,
                                                                        interval)), daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)
