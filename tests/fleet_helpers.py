"""What the fleet tests share: supervisors on one etcd, the keys they read, and watchers.

The state a fleet test asserts on: the config and rollout keys in etcd, ``corral fleet
--json``, each supervisor's status, each llama-server's /health (:class:`Probes`), and the
llama-servers running a command line (:class:`ProcWatch`, scanning /proc; the fake
llama-server also keeps a record of its runs, ``SupervisorProcess.started_with``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures_etcd import EtcdServer
from tests.harness import FAKE, SupervisorProcess


def etcd_args(etcd: EtcdServer, name: str = "fleet", *, local_port: bool = True,
              canary_s: float = 0.2) -> list[str]:
    """Several supervisors on one machine: each keeps its own port (--local-port)."""
    return ["--config-driver", json.dumps({"type": "etcd", "addr": etcd.addr, "name": name}),
            "--canary-seconds", str(canary_s), *(["--local-port"] if local_port else [])]


def stored(etcd: EtcdServer, name: str = "fleet") -> dict | None:
    """The fleet's config key, parsed, or None."""
    out = etcd.etcdctl("get", f"/corral/configs/{name}", "--print-value-only").strip()
    return json.loads(out) if out else None


def fleet_json(etcd: EtcdServer, name: str = "fleet") -> dict:
    """What ``corral fleet --json`` reports."""
    out = subprocess.run([sys.executable, "-m", "corral", "fleet", "--etcd", etcd.addr,
                          "--name", name, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def record(etcd: EtcdServer, name: str = "fleet") -> dict[str, Any] | None:
    """The fleet's rollout record, parsed, or None."""
    out = etcd.etcdctl("get", f"/corral/rollouts/{name}", "--print-value-only").strip()
    return json.loads(out) if out else None


def phase(etcd: EtcdServer, wanted: str, name: str = "fleet") -> dict[str, Any] | None:
    """The rollout record if it is in phase ``wanted``."""
    r = record(etcd, name)
    return r if r is not None and r["phase"] == wanted else None


def put_config(etcd: EtcdServer, args: list[list[str]], name: str = "fleet") -> None:
    """``etcdctl put`` of a fake llama-server config, as an operator would."""
    etcd.etcdctl("put", f"/corral/configs/{name}",
                 json.dumps({"binary": str(FAKE), "args": args}))


def instance_of(sup: SupervisorProcess) -> str:
    """The supervisor's instance id in the fleet."""
    return str(sup.status()["fleet"]["instance_id"])


@dataclass
class Probes:
    """Each instance's llama-server /health every 50 ms, from a thread, with timestamps."""

    ports: list[int]
    samples: list[tuple[float, list[bool]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=0.5, trust_env=False) as http:
            for _ in range(3000):  # bounded: 150 s at most
                if self.stop.is_set():
                    return
                up = []
                for port in self.ports:
                    try:
                        up.append(http.get(f"http://127.0.0.1:{port}/health").status_code
                                  == 200)
                    except httpx.HTTPError:
                        up.append(False)
                self.samples.append((time.monotonic(), up))
                self.stop.wait(0.05)

    def min_serving(self) -> int:
        return min(sum(up) for _, up in self.samples)

    def first_down(self, i: int) -> float | None:
        return next((t for t, up in self.samples if not up[i]), None)

    def back_up(self, i: int) -> float | None:
        down = self.first_down(i)
        return next((t for t, up in self.samples if down and t > down and up[i]), None)


@contextmanager
def probing(ports: list[int]) -> Iterator[Probes]:
    """:class:`Probes` running for the ``with`` block."""
    probes = Probes(ports)
    thread = threading.Thread(target=probes.run, daemon=True)
    thread.start()
    try:
        yield probes
    finally:
        probes.stop.set()
        thread.join(5)


class ProcWatch:
    """Every llama-server whose command line mentions ``marker``, seen by scanning /proc
    every 20 ms (other programs that read the model, such as the memory estimate's
    llama-fit-params, are not servers). A sample: a process that lives less than a scan can
    be missed, so it suits the real llama-server, which takes seconds to load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.pids: set[int] = set()
        self.others: set[tuple[int, str]] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        for _ in range(10_000):  # bounded: 200 s at most
            if self.stop.is_set():
                return
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        argv = (entry / "cmdline").read_bytes().split(b"\0")
                        if self.marker in b" ".join(argv):
                            program = Path(argv[0].decode()).name
                            if program == "llama-server":
                                self.pids.add(int(entry.name))
                            else:
                                self.others.add((int(entry.name), program))
                    except OSError:
                        continue
            self.stop.wait(0.02)


@contextmanager
def watching_proc(marker: str) -> Iterator[ProcWatch]:
    """:class:`ProcWatch` running for the ``with`` block."""
    watch = ProcWatch(marker)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch.stop.set()
        thread.join(5)


def fleet_applies(changes: list[dict[str, Any]], outcome: str | None = None,
                  **args: str) -> list[dict[str, Any]]:
    """The audit log's changes (``/v1/changes``) that took a fleet write here, oldest first:
    source "fleet", with ``outcome`` if given, and ``args`` among the flags of the config in
    effect after it (a rejected change leaves the last good one in effect)."""
    return [c for c in reversed(changes) if c["kind"] == "change" and c["source"] == "fleet"
            and outcome in (None, c["outcome"])
            and all((c["after"] or {}).get("args", {}).get(k) == v for k, v in args.items())]
