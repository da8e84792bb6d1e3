"""Issue 23's many-models workload and the single-flight watch, for ``tests/test_serve_real.py``
and ``bench/models.py`` (which imports it as ``tests.serve_workload``).

The workload: client threads, each bound to one model, sending short OpenAI chat
completions (``max_tokens`` 12) to one endpoint (``corral serve``'s or llama.cpp's router)
until told to stop. Issue 23's mix is :data:`ISSUE_23`: two clients on ``alpha`` (one
streaming), back to back, and one on ``beta`` with 0.5 s between requests. A request
*failed* when it got a non-2xx answer, a connection error, a timeout, or a stream that ended
without a chunk carrying ``finish_reason``.

:class:`ResidentWatch` scans /proc every 50 ms for the llama-server processes that are
children of one process (corral serve, or the router) and load a model (``--model`` in
their command line: the short ``--help`` runs that read the flag catalog do not count) and
keeps the highest count it saw, with when.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests import procfs


@dataclass(frozen=True)
class Client:
    model: str
    stream: bool = False
    pause_s: float = 0.0  # between one answer and the next request


ISSUE_23 = (Client("alpha"), Client("alpha", stream=True), Client("beta", pause_s=0.5))


@dataclass(frozen=True)
class Outcome:
    model: str
    client: int
    start: float  # time.monotonic() just before the request was sent
    end: float    # ... when its answer (or its failure) was complete
    ok: bool
    reason: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Workload:
    """``clients`` threads sending chat completions to ``base_url`` until :meth:`stop`."""

    def __init__(self, base_url: str, clients: tuple[Client, ...] = ISSUE_23, *,
                 max_tokens: int = 12, timeout: float = 180.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.clients = clients
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.started = 0.0
        self.stopped = 0.0
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"workload-{i}") for i in range(len(clients))]

    def start(self) -> Workload:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        """Send nothing new; wait (at most the request timeout + 10 s) for what is in
        flight (held requests included) to end; every outcome."""
        self._stop.set()
        deadline = time.monotonic() + self.timeout + 10
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stopped = time.monotonic()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"workload threads still running: {alive}"
        return self.outcomes()

    def run_for(self, seconds: float) -> list[Outcome]:
        """Start, let the clients run ``seconds`` (the run's length, not a wait for a
        condition), stop."""
        self.start()
        self._stop.wait(seconds)
        return self.stop()

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def _run(self, index: int) -> None:
        client = self.clients[index]
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as http:
            while not self._stop.is_set():
                ok = self._one(http, index, client)
                # Pacing, not synchronisation: the client's think time; after a failure a
                # little, so a refused connection does not become a tight loop.
                pause = client.pause_s if ok else max(client.pause_s, 0.05)
                if pause:
                    self._stop.wait(pause)

    def _one(self, http: httpx.Client, index: int, client: Client) -> bool:
        start = time.monotonic()
        try:
            self._send(http, client)
            reason = ""
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        outcome = Outcome(client.model, index, start, time.monotonic(), not reason, reason)
        with self._lock:
            self._outcomes.append(outcome)
        return outcome.ok

    def _send(self, http: httpx.Client, client: Client) -> None:
        body = {"model": client.model, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": "Say hi."}], "stream": client.stream}
        if not client.stream:
            r = http.post("/v1/chat/completions", json=body)
            if not 200 <= r.status_code < 300:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            if r.json()["choices"][0].get("finish_reason") is None:
                raise RuntimeError(f"no finish_reason in {r.text[:300]}")
            return
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if not 200 <= r.status_code < 300:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            finished = False
            for line in r.iter_lines():
                data = line.removeprefix("data: ").strip()
                if line.startswith("data: ") and data != "[DONE]":
                    choices = json.loads(data).get("choices") or [{}]
                    finished = finished or choices[0].get("finish_reason") is not None
            if not finished:
                raise RuntimeError("the stream ended without a finish_reason")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def per_model(outcomes: list[Outcome], started: float, stopped: float) -> dict[str, Any]:
    """Per model: requests served and failed, latency p50/p99/max (ms), and the longest
    gap (s) in which it served nothing (from the start, between answers, to the end)."""
    out: dict[str, Any] = {}
    for model in sorted({o.model for o in outcomes}):
        mine = [o for o in outcomes if o.model == model]
        ok = sorted((o for o in mine if o.ok), key=lambda o: o.end)
        lat = [o.seconds for o in ok]
        marks = [started, *(o.end for o in ok), stopped]
        out[model] = {
            "served": len(ok), "failed": len(mine) - len(ok),
            "p50_ms": _ms(statistics.median(lat) if lat else None),
            "p99_ms": _ms(percentile(lat, 99)), "max_ms": _ms(max(lat, default=None)),
            "longest_gap_s": round(max(b - a for a, b in zip(marks, marks[1:], strict=False)),
                                   2),
            "failures": sorted({o.reason for o in mine if not o.ok})[:5],
        }
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class ResidentWatch:
    """The llama-server processes loading a model under ``parent``, sampled every 50 ms."""

    def __init__(self, parent: int, binary: str | Path, interval: float = 0.05) -> None:
        self.parent = parent
        self.binary = os.path.realpath(binary)
        self.interval = interval
        self.samples = 0
        self.most = 0
        self.overlaps: list[tuple[float, list[int]]] = []  # (monotonic, pids) when > 1
        self.seen: dict[int, tuple[float, float, str]] = {}  # pid -> (first, last, model)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="resident-watch")

    def resident(self) -> list[int]:
        found = []
        for name in os.listdir("/proc"):
            if (name.isdigit() and procfs.parent_pid(name) == self.parent
                    and procfs.exe(name) == self.binary and procfs.is_alive(name)
                    and _loads_a_model(name)):
                found.append(int(name))
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = self.resident()
            self.samples += 1
            now = time.monotonic()
            for pid in pids:
                first, _, name = self.seen.get(pid) or (now, now, _model_of(pid))
                self.seen[pid] = (first, now, name)
            self.most = max(self.most, len(pids))
            if len(pids) > 1 and len(self.overlaps) < 100:
                self.overlaps.append((time.monotonic(), pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> ResidentWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "most_resident": self.most,
                "overlap_samples": len(self.overlaps), "servers_seen": len(self.seen),
                "overlaps": self.describe_overlaps()}

    def describe_overlaps(self) -> list[str]:
        """The first few times two servers were seen at once: which, and since when."""
        out = []
        for t, pids in self.overlaps[:3]:
            out.append(f"at {t:.2f}: " + ", ".join(
                f"pid {p} ({self.seen[p][2]}, seen {self.seen[p][0]:.2f}..{self.seen[p][1]:.2f})"
                for p in pids if p in self.seen))
        return out


def _model_of(pid: int) -> str:
    """The file stem after ``--model``/``-m`` in ``pid``'s command line ("?" if unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        flag = "--model" if "--model" in argv else "-m"
        return Path(argv[argv.index(flag) + 1]).stem
    return "?"


def _loads_a_model(pid: str) -> bool:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return (b"--model" in argv or b"-m" in argv) and b"--help" not in argv
    return False
