"""A real HAProxy for the balancer tests, started on loopback ports with its admin socket in
the test's directory, and ``corral balance`` beside it as a process.

The state a balancer test asserts on: HAProxy's own ``show servers state`` (read through
the admin socket here, independently of Corral's client) and requests sent through it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.harness import death_signal_prefix, free_port
from tests.waiting import wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CHECK = "check inter 300 fastinter 100 downinter 200 rise 1 fall 2"

CONFIG = """\
global
    stats socket {sock} mode 600 level admin
    pidfile {pidfile}

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout queue 30s
    timeout check 1s
    option redispatch
    retries 2
    retry-on conn-failure empty-response response-timeout

frontend fe
    bind 127.0.0.1:{port}
    default_backend {backend}

backend {backend}
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


@dataclass
class Server:
    name: str
    address: str
    port: int
    op: int  # 0 stopped (down), 2 running (up)
    admin: int  # 1 maint, 8 drain, 0 ready


class HAProxy:
    def __init__(self, tmp: Path, backend: str = "llama",
                 static: list[str] | None = None) -> None:
        """``static``: the backend's ``server`` lines (default: one disabled server that
        corral balance must leave alone)."""
        self.dir = tmp / "haproxy"
        self.dir.mkdir(exist_ok=True)
        self.socket = str(self.dir / "admin.sock")
        self.backend = backend
        self.port = free_port()
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(CONFIG.format(sock=self.socket, pidfile=self.dir / "pid",
                                             port=self.port, backend=backend,
                                             servers="\n".join(f"    {line}" for line in (
                                                 static if static is not None else [
                                                     f"server static1 127.0.0.1:"
                                                     f"{free_port()} disabled"]))))
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HAProxy:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*death_signal_prefix(), HAPROXY, "-db", "-f",
                                          str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for(lambda: self.ask("show info").startswith("Name: HAProxy"), 10,
                 "HAProxy's admin socket", explain=lambda: self.log.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.socket)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, Server]:
        found = {}
        for line in self.ask(f"show servers state {self.backend}").splitlines():
            f = line.split()
            if len(f) > 18 and not line.startswith("#") and f[1] == self.backend:
                found[f[3]] = Server(f[3], f[4], int(f[18]), int(f[5]), int(f[6]))
        return found

    def sessions_total(self) -> dict[str, int]:
        """Server -> sessions it has served since it was added (``stot``)."""
        lines = self.ask(f"show stat {self.backend} 4 -1").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: int(r["stot"] or 0) for r in rows}

    def ours(self) -> dict[str, Server]:
        return {n: s for n, s in self.servers().items() if n.startswith("corral-")}


@contextlib.contextmanager
def haproxy(tmp: Path, static: list[str] | None = None) -> Iterator[HAProxy]:
    """A running HAProxy; stopped (and reaped) afterwards."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed")
    h = HAProxy(tmp, static=static).start()
    try:
        yield h
    finally:
        h.stop()


@contextlib.contextmanager
def balancer(tmp: Path, etcd: EtcdServer | str, h: HAProxy, name: str = "fleet",
             extra: list[str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``corral balance`` for fleet ``name`` into ``h``'s backend (``etcd``: a server or
    an address); stopped afterwards."""
    addr = etcd if isinstance(etcd, str) else etcd.addr
    log = tmp / f"balance-{free_port()}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*death_signal_prefix(), sys.executable, "-m", "corral", "balance", "--etcd",
             addr, "--name", name, "--haproxy-socket", h.socket, "--backend", h.backend,
             "--server-options", CHECK,
             *(extra or [])],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        print(log.read_text()[-4000:])


def registration(etcd: EtcdServer, instance: str, info: str, ttl: int = 2,
                 name: str = "fleet") -> str:
    """A registration written by hand under a fresh lease; returns the lease id."""
    lease = etcd.etcdctl("lease", "grant", str(ttl)).split()[1]
    etcd.etcdctl("put", "--lease", lease, f"/corral/instances/{name}/{instance}", info)
    return lease


@dataclass(frozen=True)
class Sent:
    start: float
    end: float
    ok: bool
    what: str


KINDS = ("completion", "stream", "models")


class Clients:
    """``n`` client threads through HAProxy, each in turn a ``POST /completion``, a streamed
    one (failed unless its last event says ``stop``) and a ``GET /v1/models``, until stopped
    (bounded: ``limit`` requests per client)."""

    def __init__(self, url: str, n: int = 4, limit: int = 20_000) -> None:
        import threading

        self.url, self.limit = url, limit
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self) -> None:
        import time

        import httpx

        with httpx.Client(base_url=self.url, timeout=60, trust_env=False) as http:
            for i in range(self.limit):
                if self._stop.is_set():
                    return
                what = KINDS[i % len(KINDS)]
                start = time.monotonic()
                try:
                    ok = self._send(http, what)
                except httpx.HTTPError:
                    ok = False
                self.sent.append(Sent(start, time.monotonic(), ok, what))

    @staticmethod
    def _send(http: Any, what: str) -> bool:
        if what == "models":
            return bool(http.get("/v1/models").status_code == 200)
        body = {"prompt": "hi", "n_predict": 4, "stream": what == "stream"}
        if what == "completion":
            return bool(http.post("/completion", json=body).status_code == 200)
        with http.stream("POST", "/completion", json=body) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
            return bool(r.status_code == 200 and events
                        and json.loads(events[-1][len("data: "):]).get("stop") is True)

    def between(self, t0: float, t1: float) -> list[Sent]:
        """Requests that were in flight at some time between ``t0`` and ``t1``."""
        return [s for s in list(self.sent) if s.end >= t0 and s.start <= t1]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
