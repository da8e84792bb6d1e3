"""Fleet rollouts through etcd: wall time, instances serving, coordination cost, etcd traffic.

A private etcd (tests.fixtures_etcd.EtcdServer, loopback ports) and fleets of
``corral supervise`` processes on one machine, each with its own ``--port`` and
``--local-port``, Corral's default timings (200 ms debounce, 0.3 s min-healthy). A rollout
is a new config written to ``/corral/configs/<name>`` through etcd's JSON gateway (the bench
reads the stored config and flips ``--parallel``); it ends when the bench's own watch on
``/corral/`` sees ``/corral/rollouts/<name>`` at that revision with phase ``done`` (or
``failed``). Meanwhile a thread probes every instance's llama-server ``GET /health`` (fresh
connection) every 50 ms (250 ms at scale) and keeps the lowest count of 200s in a round.

1. Fleet of 3, the fake llama-server (``--fake-load-s 1``), then the real llama-server
   (gemma-3 270M, ``-c 4096 -np 1``) if installed: ``--max-unavailable 1``, ``100%``
   (both ``--canary-seconds 0``) and ``1`` with ``--canary-seconds 1`` (the canary's cost).
   References measured in the same run: "one apply" = ``POST /v1/params`` -> 200 (restarted)
   on a standalone supervisor (file store, same args), and a fleet of 1 (put -> done).
   Coordination = rollout time minus the time during which at least one instance was
   applying (each instance's apply span from its log: "applying revision R here" ->
   "is ready after"), i.e. the time nobody was applying: start latency (put -> first
   apply), hand-offs (a slot freed -> the next apply starts) and the finish (last ready ->
   phase done). Also the naive figure asked by the issue: rollout - waves x one apply.
2. Scale: 30 supervisors (fake, 1 s load), ``--max-unavailable 20%`` (6 slots),
   ``--canary-seconds 0``: rollout time against ceil(30/6) x one apply, the supervisors'
   total RSS and CPU, and etcd's request rate from its Prometheus ``/metrics``
   (``grpc_server_started_total`` per method: Range, Txn, Put, DeleteRange, LeaseGrant,
   LeaseKeepAlive, Watch) over a 10 s idle window and across the rollout. Goal: idle
   traffic per instance <= one lease keep-alive per TTL/3 (TTL 5 s: 0.6/s), coordination
   <= 50 ms per instance.

Bounded: every wait has a deadline, the whole run has a budget (``--budget-s``, default
330 s; sections that no longer fit are skipped, the real-server one first), and every
process (etcd, supervisors, llama-servers) is stopped on exit, also after a failure, Ctrl-C
or SIGTERM. The supervisors' logs are copied to /tmp/corral-bench-rollout/<section>/.
Run alone, it sets ``rollout`` in bench/results/latest.json (and writes
bench/results/rollout.json).

    .venv/bin/python -m bench.rollout [--no-fake] [--scale 30 (0: none)] [--no-real]
                                      [--rollouts 2] [--idle-s 10] [--budget-s 330]
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.report import RESULTS, cli, loadavg, log, merge_into_latest, stats, write_json
from bench.supervisors import temp_dir
from tests.fixtures_etcd import EtcdServer
from tests.harness import FAKE, SupervisorProcess, make_fake_model, stamped_lines

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
LOGS = Path("/tmp/corral-bench-rollout")
FAKE_ARGS = ["--fake-load-s", "1"]
REAL_ARGS = ["-c", "4096", "-np", "1"]
TTL_S = 5  # corral.store.etcd.registration.DEFAULT_TTL
KEEPALIVE_GOAL = 3 / TTL_S  # one keep-alive per TTL/3, per instance and second
OVERHEAD_GOAL_MS = 50.0
PARALLEL = ("-np", "--parallel")
METHODS = ("Range", "Txn", "Put", "DeleteRange", "LeaseGrant", "LeaseKeepAlive",
           "LeaseRevoke", "Watch")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def cap(self, timeout: float) -> float:
        """``timeout``, cut to what is left of the budget (at least 1 s: cleanup waits)."""
        return max(1.0, min(timeout, self.left()))


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _prefix_end(s: str) -> str:
    return s[:-1] + chr(ord(s[-1]) + 1)


# ---- etcd: the gateway, the bench's own watch, the metrics ----------------------------------

class Etcd:
    """The bench's view of etcd: puts and reads through the JSON gateway, one watch on the
    whole ``/corral/`` prefix in a thread (every event stamped with ``time.time()`` on
    arrival), and ``/metrics`` snapshots."""

    def __init__(self, server: EtcdServer) -> None:
        self.server = server
        self.url = server.url
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.events: list[tuple[float, str, str, dict[str, Any] | None, int]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._watch_client: httpx.Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    def get(self, key: str) -> tuple[str | None, int]:
        """(value, mod_revision) of ``key``."""
        r = self.http.post("/v3/kv/range", json={"key": _b64(key)}).json()
        kvs = r.get("kvs") or []
        if not kvs:
            return None, 0
        return base64.b64decode(kvs[0]["value"]).decode(), int(kvs[0]["mod_revision"])

    def count(self, prefix: str) -> int:
        r = self.http.post("/v3/kv/range", json={"key": _b64(prefix),
                                                 "range_end": _b64(_prefix_end(prefix)),
                                                 "count_only": True}).json()
        return int(r.get("count", 0))

    def revision(self) -> int:
        r = self.http.post("/v3/kv/range", json={"key": _b64("/corral-bench-none"),
                                                 "count_only": True}).json()
        return int(r["header"]["revision"])

    def put(self, key: str, value: str) -> tuple[float, int]:
        """(time.time() just before sending, the put's revision)."""
        t = time.time()
        r = self.http.post("/v3/kv/put", json={"key": _b64(key), "value": _b64(value)})
        r.raise_for_status()
        return t, int(r.json()["header"]["revision"])

    def metrics(self) -> dict[str, float]:
        """The counters of interest, flattened: ``started:Range``, ``sent:Watch`` ..."""
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            m = re.match(r'grpc_server_(started|handled|msg_received|msg_sent)_total\{.*'
                         r'grpc_method="(\w+)"', name)
            if m:
                key = f"{m.group(1)}:{m.group(2)}"
                out[key] = out.get(key, 0.0) + float(value)
            elif name in ("etcd_debugging_lease_renewed_total", "etcd_mvcc_range_total",
                          "etcd_mvcc_put_total", "etcd_mvcc_txn_total",
                          "etcd_mvcc_delete_total",
                          "etcd_network_client_grpc_received_bytes_total",
                          "etcd_network_client_grpc_sent_bytes_total"):
                out[name] = out.get(name, 0.0) + float(value)
        return out

    # the watch
    def start_watch(self) -> None:
        start = self.revision() + 1
        self._watch_client = httpx.Client(base_url=self.url, trust_env=False,
                                          timeout=httpx.Timeout(10, read=None))
        ready = threading.Event()

        def run() -> None:
            assert self._watch_client is not None
            req = {"create_request": {"key": _b64("/corral/"),
                                      "range_end": _b64(_prefix_end("/corral/")),
                                      "start_revision": str(start)}}
            with contextlib.suppress(Exception), self._watch_client.stream(
                    "POST", "/v3/watch", json=req) as resp:
                ready.set()
                for line in resp.iter_lines():
                    if self._stop:
                        return
                    t = time.time()
                    if not line.strip():
                        continue
                    for ev in json.loads(line).get("result", {}).get("events") or []:
                        kv = ev["kv"]
                        key = base64.b64decode(kv["key"]).decode()
                        kind = ev.get("type", "PUT")
                        value = None
                        if "/rollouts/" in key and kind == "PUT":
                            with contextlib.suppress(ValueError):
                                value = json.loads(base64.b64decode(kv.get("value", "")))
                        with self.changed:
                            self.events.append((t, key, kind, value,
                                                int(kv.get("mod_revision", 0))))
                            self.changed.notify_all()
            ready.set()

        self._thread = threading.Thread(target=run, daemon=True, name="etcd watch")
        self._thread.start()
        ready.wait(5)

    def wait_event(self, pred: Any, since: int, timeout: float) -> tuple[int, Any] | None:
        """The index and event of the first event at index >= ``since`` matching ``pred``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for i in range(since, len(self.events)):
                    if pred(self.events[i]):
                        return i, self.events[i]
                since = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop = True
        if self._watch_client is not None:
            with contextlib.suppress(Exception):
                self._watch_client.close()
        if self._thread is not None:
            self._thread.join(2)
        self.http.close()


def rates(before: dict[str, float], after: dict[str, float], seconds: float,
          instances: int) -> dict[str, Any]:
    """Per-method request rates between two /metrics snapshots."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    started = {m: d(f"started:{m}") for m in METHODS if d(f"started:{m}")}
    unary = sum(v for m, v in started.items() if m != "Watch")
    per_s = {m: round(v / seconds, 2) for m, v in started.items()}
    return {
        "seconds": round(seconds, 2), "instances": instances,
        "calls": {m: int(v) for m, v in started.items()},
        "calls_per_s": per_s,
        "calls_per_s_per_instance": {m: round(v / seconds / instances, 3)
                                     for m, v in started.items()},
        "requests_per_s": round(unary / seconds, 2),
        "requests_per_s_per_instance": round(unary / seconds / instances, 3),
        "keepalives_per_s_per_instance": round(d("started:LeaseKeepAlive") / seconds
                                               / instances, 3),
        "lease_renewed_per_s": round(d("etcd_debugging_lease_renewed_total") / seconds, 2),
        "watch_messages_sent": int(d("msg_sent:Watch")),
        "watch_messages_sent_per_s": round(d("msg_sent:Watch") / seconds, 1),
        "mvcc": {k.split("_")[2]: int(d(k)) for k in ("etcd_mvcc_range_total",
                                                      "etcd_mvcc_put_total",
                                                      "etcd_mvcc_txn_total",
                                                      "etcd_mvcc_delete_total")},
        "grpc_bytes_received_per_s": round(
            d("etcd_network_client_grpc_received_bytes_total") / seconds),
        "grpc_bytes_sent_per_s": round(d("etcd_network_client_grpc_sent_bytes_total")
                                       / seconds),
    }


# ---- processes --------------------------------------------------------------------------

def _kill_tree(procs: list[psutil.Process], timeout: float) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


class Fleet:
    """``n`` supervisors of one fleet name, started in parallel (at most ``window`` starting
    at once: on 2 cores, 30 Python start-ups at once starve each other into their own
    timeouts); all stopped on exit. Ports are picked right before each start, and a
    supervisor that lost its port to another process meanwhile is replaced (3 times)."""

    def __init__(self, tmp: Path, etcd: Etcd, name: str, n: int, binary: Path, model: Path,
                 llama_args: list[str], extra: list[str], section: str,
                 window: int = 8) -> None:
        self.tmp, self.etcd, self.name, self.section, self.n = tmp, etcd, name, section, n
        self.window = window
        self.binary, self.model, self.llama_args = binary, model, llama_args
        self.driver = json.dumps({"type": "etcd", "addr": etcd.server.addr, "name": name})
        self.extra = ["--local-port", *extra]
        self.sups: list[SupervisorProcess] = []  # started, not given up on
        self.pids: dict[int, SupervisorProcess] = {}  # supervisor pid -> it (the live ones)
        self._all: list[SupervisorProcess] = []  # every one started, for the cleanup
        self._children: set[psutil.Process] = set()
        self.replaced = 0
        self.ids: dict[int, str] = {}  # supervisor pid -> its fleet instance id

    def __enter__(self) -> Fleet:
        try:
            for _ in range(min(self.window, self.n)):
                self._start_next()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_next(self) -> SupervisorProcess:
        d = self.tmp / f"{self.name}-{len(self._all)}"
        d.mkdir()
        s = SupervisorProcess(d, self.binary, self.model, self.llama_args,
                              store_args=["--config-driver", self.driver],
                              extra_cli=self.extra)
        self._all.append(s)
        s.start()
        s.http.timeout = httpx.Timeout(5.0)
        assert s.proc is not None
        self.sups.append(s)
        self.pids[s.proc.pid] = s
        return s

    def _given_up(self, s: SupervisorProcess) -> bool:
        """``s`` exited at start: replace it if it lost a port race, else False."""
        assert s.proc is not None
        if "Address already in use" not in s.log() or self.replaced >= 3:
            return False
        self.replaced += 1
        self.sups.remove(s)
        del self.pids[s.proc.pid]
        log(f"{self.section}: supervisor {s.proc.pid} lost a port to another process; "
            f"starting another")
        return True

    def snapshot_children(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                self._children.update(psutil.Process(pid).children(recursive=True))

    def __exit__(self, *exc: object) -> None:
        self.snapshot_children()
        procs = []
        for s in self._all:
            with contextlib.suppress(psutil.Error):
                if s.proc is not None and s.proc.poll() is None:
                    procs.append(psutil.Process(s.proc.pid))
        _kill_tree(procs, 20)
        for s in self._all:
            with contextlib.suppress(Exception):
                s.close()  # kills and reaps the Popen if still alive
        _kill_tree([c for c in self._children if c.is_running()], 5)
        dest = LOGS / self.section
        with contextlib.suppress(OSError):
            dest.mkdir(parents=True, exist_ok=True)
            for s in self._all:
                shutil.copy(s.log_path, dest / f"{self.name}-{s.log_path.name}")

    def wait_ready(self, timeout: float) -> float:
        """Every supervisor RUNNING and in sync, registered, the record done, etcd quiet."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        pending = list(self.sups)
        while pending or len(self.sups) < self.n:
            while len(pending) < self.window and len(self.sups) < self.n:
                pending.append(self._start_next())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(pending)} started and "
                                   f"{self.n - len(self.sups)} not started of "
                                   f"{self.n} supervisors not RUNNING in sync "
                                   f"within {timeout:.0f} s")
            for s in list(pending):
                assert s.proc is not None
                if s.proc.poll() is not None:
                    if self._given_up(s):
                        pending.remove(s)
                        continue
                    raise RuntimeError(f"supervisor {s.proc.pid} exited "
                                       f"({s.proc.returncode}):\n{s.log()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    st = s.status()
                    if st["state"] == "RUNNING" and (st.get("fleet") or {}).get("in_sync"):
                        self.ids[s.proc.pid] = str(st["fleet"]["instance_id"])
                        pending.remove(s)
            time.sleep(0.1)
        n = len(self.sups)

        def settled() -> bool:
            raw, _ = self.etcd.get(f"/corral/rollouts/{self.name}")
            record = json.loads(raw) if raw else {}
            return (self.etcd.count(f"/corral/instances/{self.name}/") == n
                    and record.get("phase") == "done")

        while not settled():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not {n} registrations and a done record")
            time.sleep(0.1)
        # quiet: no write to etcd for 1.5 s (registration updates after start are over)
        last, since = self.etcd.revision(), time.monotonic()
        while time.monotonic() - since < 1.5 and time.monotonic() < deadline:
            time.sleep(0.25)
            rev = self.etcd.revision()
            if rev != last:
                last, since = rev, time.monotonic()
        self.snapshot_children()
        return time.monotonic() - t0

    def ports(self) -> list[int]:
        return [s.port for s in self.sups]

    def resources(self) -> dict[str, Any]:
        """RSS of the supervisors (corral processes) and of their llama-servers."""
        sup_rss, child_rss = [], []
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                sup_rss.append(p.memory_info().rss)
                for c in p.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child_rss.append(c.memory_info().rss)
        mib = 2 ** 20
        return {"supervisors": len(sup_rss),
                "supervisors_rss_total_mib": round(sum(sup_rss) / mib, 1),
                "supervisor_rss_mib": stats([r / mib for r in sup_rss], scale=1, digits=1),
                "llama_servers_rss_total_mib": round(sum(child_rss) / mib, 1)}

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total


# ---- probing /health ------------------------------------------------------------------

def health(port: int, timeout: float = 0.5) -> int | None:
    """``GET /health`` on a fresh connection, the answer read to its end (a probe that
    hangs up early makes the fake llama-server log a BrokenPipe traceback); the status."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
                if len(data) > 65536:
                    break
        return int(data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


class HealthProbe:
    """Rounds of ``GET /health`` over every port; the count of 200s per round."""

    def __init__(self, ports: list[int], period: float) -> None:
        self.ports, self.period = ports, period
        self.rounds: list[tuple[float, int]] = []  # (time.time() at round start, ok)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health probe")

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            ok = sum(1 for p in self.ports if health(p) == 200)
            self.rounds.append((t, ok))
            self._stop.wait(max(0.0, self.period - (time.time() - t)))

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        r = [ok for t, ok in self.rounds if t0 <= t <= t1]
        return {"rounds": len(r), "min_serving": min(r) if r else None,
                "serving_counts": dict(sorted(Counter(r).items()))}


# ---- one rollout ------------------------------------------------------------------------

def _with_parallel(config: dict[str, Any], value: str) -> dict[str, Any]:
    args = [a for a in config["args"] if a[0] not in PARALLEL]
    return {**config, "args": [*args, ["--parallel", value]]}


def apply_spans(fleet: Fleet, name: str, revision: int, t0: float
                ) -> dict[str, tuple[float, float]]:
    """Each supervisor's apply of ``revision``: (its log's "applying revision R here",
    the next "is ready after"); keyed by supervisor pid."""
    out = {}
    mark = f"fleet {name!r}: applying revision {revision} here"
    for pid, s in fleet.pids.items():
        start = None
        for t, line in stamped_lines(s.log()):
            if start is None and mark in line and t >= t0 - 0.01:
                start = t
            elif start is not None and ") is ready after" in line:
                out[str(pid)] = (start, t)
                break
    return out


def coordination(spans: list[tuple[float, float]], t_put: float, t_done: float,
                 released: dict[str, float] | None = None,
                 ready: dict[str, float] | None = None) -> dict[str, Any]:
    """Time in [t_put, t_done] when no instance was applying, and where it went.

    With ``released`` (instance -> when the bench's watch saw its slot key deleted) and
    ``ready`` (instance -> its "is ready" log line), a hand-off splits into release (ready
    -> slot deleted: mark done + release, two etcd writes and their echoes) and pick-up
    (slot deleted -> the next instance's "applying revision": it sees the delete, reads
    its slot afresh, starts)."""
    spans = sorted(spans)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s  # type: ignore[operator]
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s  # type: ignore[operator]
    ends = sorted(e for _, e in spans)
    handoffs = []
    for s, _ in spans:
        before = [e for e in ends if e <= s]
        if before:
            handoffs.append(s - before[-1])
    idle = (t_done - t_put) - busy
    release, pickup = [], []
    if released and ready:
        release = [released[i] - ready[i] for i in released if i in ready]
        frees = sorted(released.values())
        for s, _ in spans:
            before = [f for f in frees if f <= s]
            if before:
                pickup.append(s - before[-1])
    wall = t_done - t_put
    return {"applying_s": round(busy, 3), "idle_ms": round(idle * 1000, 1),
            "mean_applying": round(sum(e - s for s, e in spans) / wall, 2) if wall > 0
            else None,
            "release_ms": stats(release, digits=1), "pickup_ms": stats(pickup, digits=1),
            "start_ms": round((spans[0][0] - t_put) * 1000, 1) if spans else None,
            "handoff_ms": stats(handoffs, digits=1),
            "finish_ms": round((t_done - ends[-1]) * 1000, 1) if ends else None,
            "apply_span_ms": stats([e - s for s, e in spans], digits=0)}


def one_rollout(etcd: Etcd, fleet: Fleet, value: str, probe_period: float,
                timeout: float, cut: bool = False) -> dict[str, Any]:
    key = f"/corral/configs/{fleet.name}"
    raw, _ = etcd.get(key)
    assert raw is not None, f"nothing stored at {key}"
    config = _with_parallel(json.loads(raw), value)
    config.pop("applied_at", None)
    config.pop("applied_by", None)
    n = len(fleet.sups)
    since = len(etcd.events)
    m0 = etcd.metrics()
    cpu0 = fleet.cpu_seconds()
    with HealthProbe(fleet.ports(), probe_period) as probe:
        time.sleep(probe_period * 2)
        t_put, rev = etcd.put(key, json.dumps(config))
        hit = etcd.wait_event(
            lambda ev: ev[1] == f"/corral/rollouts/{fleet.name}" and ev[3] is not None
            and ev[3].get("revision") == rev and ev[3].get("phase") in ("done", "failed"),
            since, timeout)
        t_end = time.time() if hit is None else hit[1][0]
        time.sleep(probe_period * 2)
    m1 = etcd.metrics()
    cpu1 = fleet.cpu_seconds()
    wall = t_end - t_put
    out: dict[str, Any] = {"revision": rev, "parallel": value}
    if hit is None:
        raw, _ = etcd.get(f"/corral/rollouts/{fleet.name}")
        why = " (cut short by the time budget)" if cut else ""
        out.update(error=f"no phase done/failed within {timeout:.0f} s{why}", record=raw)
        log(f"{fleet.section}: rollout of revision {rev} did not end within {timeout:.0f} s"
            f"{why}")
        return out
    record = hit[1][3]
    spans = apply_spans(fleet, fleet.name, rev, t_put)
    window = [ev for ev in etcd.events[since:] if t_put <= ev[0] <= t_end]
    slot_prefix = f"/corral/slots/{fleet.name}/"
    released = {ev[1][len(slot_prefix):]: ev[0] for ev in window
                if ev[1].startswith(slot_prefix) and ev[2] == "DELETE"}
    ready = {fleet.ids.get(int(pid), pid): e for pid, (_, e) in spans.items()}
    with contextlib.suppress(OSError):
        dest = LOGS / fleet.section
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"events-{fleet.name}-r{rev}.jsonl").write_text("".join(
            json.dumps({"t": round(ev[0] - t_put, 4), "key": ev[1], "type": ev[2],
                        "mod_revision": ev[4],
                        **({"phase": ev[3].get("phase"), "progress": ev[3].get("progress")}
                           if ev[3] else {})}) + "\n" for ev in window))
    writes = Counter(f"{ev[1].split('/')[2]}:{ev[2]}" for ev in window)
    out.update({
        "phase": record["phase"], "reason": record.get("reason"),
        "wall_s": round(wall, 3),
        "record_s": _iso_span(record.get("started_at"), record.get("ended_at")),
        "instances_done": sum(1 for p in record.get("progress", {}).values() if p == "done"),
        "instances_applied": len(spans),
        "serving": probe.between(t_put, t_end),
        "coordination": coordination(list(spans.values()), t_put, t_end, released, ready),
        "etcd": rates(m0, m1, wall, n),
        "etcd_writes_seen": dict(sorted(writes.items())),
        "supervisors_cpu_s": round(cpu1 - cpu0, 2),
    })
    if record["phase"] == "done" and len(spans) < n:
        out["warning"] = (f"phase done but only {len(spans)} of {n} instances applied "
                          f"(registrations lost meanwhile? see etcd_writes_seen)")
        log(f"{fleet.section}: {out['warning']}")
    return out


def _iso_span(a: str | None, b: str | None) -> float | None:
    import datetime as dt
    if not a or not b:
        return None
    return round((dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a))
                 .total_seconds(), 3)


# ---- references: one apply, a fleet of one ---------------------------------------------

def one_applies(tmp: Path, binary: Path, model: Path, llama_args: list[str], runs: int,
                budget: Budget) -> dict[str, Any]:
    """POST /v1/params {-np} -> 200 (restarted), on a standalone supervisor (file store)."""
    d = Path(tempfile.mkdtemp(prefix="standalone-", dir=tmp))
    sup = SupervisorProcess(d, binary, model, llama_args)
    sup.start()
    try:
        sup.wait_running(budget.cap(120))
        took = []
        for i in range(runs):
            t = time.perf_counter()
            r = sup.post({"-np": str(2 + i % 2)})
            dt_ = time.perf_counter() - t
            body = r.json()
            if r.status_code != 200 or not body.get("restarted"):
                raise AssertionError(f"POST -> {r.status_code} {body}")
            took.append(dt_)
        return {"runs": runs, "ms": stats(took, digits=0),
                "median_s": round(statistics.median(took), 3)}
    finally:
        pids = set(sup.seen_pids)
        with contextlib.suppress(Exception):
            sup.stop(signal.SIGTERM, 15)
        sup.close()
        for p in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(p).kill()


VARIANTS = (  # key, label, n, --max-unavailable, --canary-seconds
    ("one", "fleet of 1", 1, "1", "0"),
    ("mu1", "3, --max-unavailable 1", 3, "1", "0"),
    ("mu100", "3, --max-unavailable 100%", 3, "100%", "0"),
    ("mu1_canary1", "3, --max-unavailable 1, --canary-seconds 1", 3, "1", "1"),
)


def _waves(n: int, max_unavailable: str, canary: float) -> int:
    slots = (max(1, math.floor(float(max_unavailable[:-1]) * n / 100))
             if max_unavailable.endswith("%") else int(max_unavailable))
    if canary > 0:
        return 1 + math.ceil((n - 1) / slots)
    return math.ceil(n / slots)


def _summary(rollouts: list[dict[str, Any]], n: int, waves: int, canary: float,
             one_apply_s: float | None) -> dict[str, Any]:
    ok = [r for r in rollouts if "wall_s" in r and r.get("phase") == "done"]
    if not ok:
        return {"error": "no rollout ended done", "rollouts": rollouts}
    wall = statistics.median(r["wall_s"] for r in ok)
    idle = statistics.median(r["coordination"]["idle_ms"] for r in ok)
    min_serving = min(r["serving"]["min_serving"] for r in ok
                      if r["serving"]["min_serving"] is not None)
    out: dict[str, Any] = {
        "instances": n, "waves": waves, "canary_seconds": canary,
        "wall_s_median": round(wall, 3), "wall_s": [r["wall_s"] for r in ok],
        "min_serving": min_serving,
        "coordination_ms_median": round(idle, 1),
        "coordination_beyond_canary_ms_per_instance": round((idle - canary * 1000) / n, 1),
        "rollouts": rollouts,
    }
    if one_apply_s:
        expected = waves * one_apply_s + canary
        out["expected_s"] = round(expected, 3)
        out["vs_one_apply"] = round(wall / one_apply_s, 2)
        out["naive_overhead_ms"] = round((wall - expected) * 1000, 1)
        out["naive_overhead_ms_per_instance"] = round((wall - expected) * 1000 / n, 1)
    return out


def three(etcd: Etcd, tmp: Path, section: str, binary: Path, model: Path,
          llama_args: list[str], rollouts: int, budget: Budget, start_timeout: float,
          rollout_timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"llama_server": str(binary), "args": llama_args}
    log(f"{section}: one apply on a standalone supervisor ({rollouts + 1} runs)")
    one = one_applies(tmp, binary, model, llama_args, rollouts + 1, budget)
    result["one_apply"] = one
    for key, label, n, mu, canary in VARIANTS:
        if budget.left() < 25:
            result[key] = {"skipped": "out of time budget"}
            continue
        name = f"{section}-{key}"
        log(f"{section}: {label}, --canary-seconds {canary}: starting {n} supervisors")
        with Fleet(tmp, etcd, name, n, binary, model, llama_args,
                   ["--max-unavailable", mu, "--canary-seconds", canary], section) as fleet:
            fleet.wait_ready(budget.cap(start_timeout))
            done = []
            for i in range(rollouts):
                if budget.left() < 10:
                    break
                done.append(one_rollout(etcd, fleet, str(2 + i % 2), 0.05,
                                        budget.cap(rollout_timeout),
                                        budget.left() < rollout_timeout))
                log(f"{section}: {label}: rollout {i + 1}: {done[-1].get('wall_s')} s, "
                    f"min serving {done[-1].get('serving', {}).get('min_serving')}")
        result[key] = {"label": label, "max_unavailable": mu,
                       **_summary(done, n, _waves(n, mu, float(canary)), float(canary),
                                  one["median_s"])}
    return result


def scale(etcd: Etcd, tmp: Path, n: int, idle_s: float, budget: Budget,
          one: dict[str, Any] | None) -> dict[str, Any]:
    model = make_fake_model(tmp / "scale.gguf")
    mu = "20%"
    if one is None:
        log("scale: one apply on a standalone supervisor (3 runs)")
        one = one_applies(tmp, FAKE, model, FAKE_ARGS, 3, budget)
    else:
        one = {**one, "from": "the fake section of this run"}
    log(f"scale: starting {n} supervisors (fake llama-server, 1 s load)")
    result: dict[str, Any] = {"instances": n, "max_unavailable": mu, "one_apply": one,
                              "start_window": 8}
    with Fleet(tmp, etcd, "scale", n, FAKE, model, FAKE_ARGS,
               ["--max-unavailable", mu, "--canary-seconds", "0"], "scale") as fleet:
        result["start_s"] = round(fleet.wait_ready(budget.cap(240)), 1)
        log(f"scale: {n} RUNNING and in sync after {result['start_s']} s; "
            f"idle window {idle_s:g} s")
        result["resources_idle"] = fleet.resources()
        etcd_proc = psutil.Process(etcd.server.proc.pid)  # type: ignore[union-attr]
        e_cpu0 = sum(etcd_proc.cpu_times()[:2])
        cpu0, m0, t0 = fleet.cpu_seconds(), etcd.metrics(), time.monotonic()
        time.sleep(min(idle_s, max(1.0, budget.left() - 60)))
        m1, dt_ = etcd.metrics(), time.monotonic() - t0
        idle = rates(m0, m1, dt_, n)
        idle["supervisors_cpu_percent"] = round((fleet.cpu_seconds() - cpu0) / dt_ * 100, 1)
        idle["etcd_cpu_percent"] = round((sum(etcd_proc.cpu_times()[:2]) - e_cpu0) / dt_ * 100,
                                         1)
        result["idle"] = idle
        log(f"scale: idle {idle['requests_per_s_per_instance']} requests/s per instance; "
            f"rollout")
        r = one_rollout(etcd, fleet, "2", 0.25, budget.cap(120), budget.left() < 120)
        r["resources_after"] = fleet.resources()
        result["rollout"] = r
    waves = _waves(n, mu, 0)
    result["waves"] = waves
    if "wall_s" in r and r.get("phase") == "done":
        expected = waves * one["median_s"]
        result["expected_s"] = round(expected, 3)
        result["naive_overhead_ms_per_instance"] = round((r["wall_s"] - expected) * 1000 / n, 1)
        result["coordination_ms_per_instance"] = round(r["coordination"]["idle_ms"] / n, 1)
        result["max_down_allowed"] = max(1, math.floor(20 * n / 100))
    return result


# ---- the run ----------------------------------------------------------------------------

@contextlib.contextmanager
def private_etcd(tmp: Path) -> Iterator[Etcd]:
    server = EtcdServer(ETCD, tmp / "etcd" / "data", log_path=tmp / "etcd.log")
    server.start()
    etcd = Etcd(server)
    try:
        etcd.start_watch()
        yield etcd
    finally:
        etcd.close()
        server.kill()


def _real() -> tuple[Path, Path] | None:
    try:
        from scripts.llama_paths import llama_server, model
        return llama_server(), model()
    except (ImportError, OSError) as exc:
        log(f"rollout: no real llama-server ({exc!r}): skipping that part")
        return None


def run(fake: bool = True, scale_n: int = 30, real: bool = True, rollouts: int = 2,
        idle_s: float = 10.0, budget_s: float = 330.0) -> dict[str, Any]:
    budget = Budget(budget_s)
    started = time.monotonic()
    result: dict[str, Any] = {"loadavg_before": loadavg(), "etcd": ETCD, "ttl_s": TTL_S,
                              "keepalive_goal_per_s": KEEPALIVE_GOAL,
                              "overhead_goal_ms_per_instance": OVERHEAD_GOAL_MS,
                              "timings": "Corral defaults: debounce 200 ms, min-healthy 0.3 s"}
    shutil.rmtree(LOGS, ignore_errors=True)
    with temp_dir("rollout") as tmp, private_etcd(tmp) as etcd:
        sections: list[tuple[str, Any, float]] = []
        if fake:
            sections.append(("fake", lambda: three(
                etcd, tmp, "fake", FAKE, make_fake_model(tmp / "f.gguf"), FAKE_ARGS, rollouts,
                budget, 60, 60), 40))
        if scale_n > 0:
            sections.append(("scale", lambda: scale(
                etcd, tmp, scale_n, idle_s, budget,
                result.get("fake", {}).get("one_apply")), 60))
        found = _real() if real else None
        if found is not None:
            sections.append(("real", lambda: three(etcd, tmp, "real", found[0], found[1],
                                                   REAL_ARGS, rollouts, budget, 120, 120), 60))
        for key, fn, needs in sections:
            if budget.left() < needs:
                result[key] = {"skipped": "out of time budget"}
                log(f"rollout: {key} skipped (budget)")
                continue
            t = time.monotonic()
            try:
                result[key] = fn()
            except Exception as exc:  # noqa: BLE001 - record it, run the other sections
                log(f"rollout: {key} FAILED: {exc!r}")
                import traceback
                result[key] = {"error": repr(exc), "traceback": traceback.format_exc()}
            result.setdefault("section_seconds", {})[key] = round(time.monotonic() - t, 1)
    result["loadavg_after"] = loadavg()
    result["total_seconds"] = round(time.monotonic() - started, 1)
    write_json(RESULTS / "rollout.json", result)
    return result


# ---- the table --------------------------------------------------------------------------

def _f(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for section, label in (("fake", "fake llama-server (1 s load)"),
                           ("real", "real llama-server (gemma-3 270M)")):
        s = r.get(section)
        if not s:
            continue
        if "error" in s or "skipped" in s:
            out.append((label, s.get("error") or s.get("skipped")))
            continue
        one = s["one_apply"]
        out.append((f"{label}: one apply (POST -> 200, standalone)",
                    f"median {one['ms']['median']:.0f} ms ({one['ms']['min']:.0f}-"
                    f"{one['ms']['max']:.0f}, n={one['runs']})"))
        for key, vlabel, n, _, canary in VARIANTS:
            v = s.get(key)
            if not v:
                continue
            if "error" in v or "skipped" in v:
                out.append((f"  {vlabel}", v.get("error") or v.get("skipped")))
                continue
            c = [x["coordination"] for x in v["rollouts"] if "coordination" in x]
            hand = [h["handoff_ms"].get("median") for h in c if h["handoff_ms"].get("n")]
            out.append((f"  {vlabel}" + (f", canary {canary} s" if float(canary) else ""),
                        f"rollout {_f(v['wall_s_median'], ' s')} = "
                        f"{_f(v.get('vs_one_apply'), 'x')} one apply (expected "
                        f"{v['waves']}x{'+' + canary + ' s' if float(canary) else ''} = "
                        f"{_f(v.get('expected_s'), ' s')}); min serving "
                        f"{v['min_serving']}/{n}"))
            out.append(("      coordination (nobody applying)",
                        f"{_f(v['coordination_ms_median'], ' ms', 0)} total, "
                        f"{_f(v['coordination_beyond_canary_ms_per_instance'], ' ms', 1)}"
                        f"/instance{' beyond the canary wait' if float(canary) else ''}; "
                        f"start {_f(c[0]['start_ms'], ' ms', 0)}, hand-off "
                        f"{_f(hand[0] if hand else None, ' ms', 0)}, finish "
                        f"{_f(c[0]['finish_ms'], ' ms', 0)} (1st rollout: release "
                        f"{_f(c[0]['release_ms'].get('median'), ' ms', 0)} + pick-up "
                        f"{_f(c[0]['pickup_ms'].get('median'), ' ms', 0)}); naive "
                        f"(rollout - expected) "
                        f"{_f(v.get('naive_overhead_ms_per_instance'), ' ms', 0)}/instance"))
    s = r.get("scale")
    if s:
        if "error" in s or "skipped" in s:
            out.append(("scale", s.get("error") or s.get("skipped")))
            return out
        n = s["instances"]
        ro, idle, res = s["rollout"], s["idle"], s["resources_idle"]
        one = s["one_apply"]
        out.append(("scale: one apply (fake, standalone)",
                    f"median {one['ms']['median']:.0f} ms"
                    + (f" ({one['from']})" if one.get("from") else "")))
        out.append((f"scale: {n} supervisors start (parallel) -> all RUNNING in sync",
                    f"{s['start_s']} s"))
        out.append(("scale: supervisors' RSS (idle)",
                    f"total {res['supervisors_rss_total_mib']} MiB, median "
                    f"{res['supervisor_rss_mib'].get('median')} MiB each (fake llama-servers "
                    f"{res['llama_servers_rss_total_mib']} MiB)"))
        if "wall_s" in ro:
            out.append((f"scale: rollout, --max-unavailable 20% ({s['waves']} waves)",
                        f"{_f(ro['wall_s'], ' s')} vs {s['waves']} x one apply "
                        f"{_f(s.get('expected_s'), ' s')}; min serving "
                        f"{ro['serving']['min_serving']}/{n} (allowed down "
                        f"{s.get('max_down_allowed')}); phase {ro.get('phase')}"
                        + (f"; WARNING {ro['warning']}" if ro.get("warning") else "")))
            co = ro["coordination"]
            out.append(("scale: coordination (nobody applying)",
                        f"{_f(co['idle_ms'], ' ms', 0)} total = "
                        f"{_f(s.get('coordination_ms_per_instance'), ' ms', 1)}/instance; "
                        f"naive (rollout - expected) "
                        f"{_f(s.get('naive_overhead_ms_per_instance'), ' ms', 0)}/instance"))
            out.append(("scale: slots in use, hand-offs (median / max)",
                        f"mean {co['mean_applying']} applying of {s.get('max_down_allowed')} "
                        f"allowed; hand-off {_f(co['handoff_ms'].get('median'), ' ms', 0)} / "
                        f"{_f(co['handoff_ms'].get('max'), ' ms', 0)} = release (ready -> "
                        f"slot deleted) {_f(co['release_ms'].get('median'), ' ms', 0)} / "
                        f"{_f(co['release_ms'].get('max'), ' ms', 0)} + pick-up (-> next "
                        f"applying) {_f(co['pickup_ms'].get('median'), ' ms', 0)} / "
                        f"{_f(co['pickup_ms'].get('max'), ' ms', 0)}; apply span "
                        f"{_f(co['apply_span_ms'].get('median'), ' ms', 0)}"))
        else:
            out.append(("scale: rollout", ro.get("error", "?")))
        per = idle["calls_per_s_per_instance"]
        out.append((f"scale: etcd idle ({idle['seconds']:.0f} s), per instance",
                    f"{idle['requests_per_s_per_instance']} requests/s (goal <= "
                    f"{KEEPALIVE_GOAL:.1f}): " + ", ".join(
                        f"{m} {v}" for m, v in sorted(per.items(), key=lambda x: -x[1]))))
        out.append(("scale: etcd idle, whole fleet",
                    f"{idle['requests_per_s']} requests/s, {idle['watch_messages_sent_per_s']} "
                    f"watch messages/s; etcd CPU {idle['etcd_cpu_percent']} %, supervisors "
                    f"CPU {idle['supervisors_cpu_percent']} % (of one core)"))
        if "etcd" in ro:
            e = ro["etcd"]
            out.append(("scale: etcd during the rollout",
                        f"{e['requests_per_s']} requests/s ({e['requests_per_s_per_instance']}"
                        f"/instance): " + ", ".join(f"{m} {v}" for m, v in sorted(
                            e["calls"].items(), key=lambda x: -x[1])) + " calls; "
                        f"{e['watch_messages_sent']} watch messages sent"))
            out.append(("scale: writes seen by a watcher during the rollout",
                        ", ".join(f"{k} {v}" for k, v in ro["etcd_writes_seen"].items())))
    return out


def run_and_merge(**kwargs: Any) -> dict[str, Any]:
    """``run``, then ``rollout`` in bench/results/latest.json (the key run_all uses)."""
    return merge_into_latest("rollout", run(**kwargs))


def main() -> int:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    return cli(__doc__, lambda **kw: run_and_merge(
        fake=kw["fake"], scale_n=kw["scale"], real=kw["real"], rollouts=kw["rollouts"],
        idle_s=kw["idle_s"], budget_s=kw["budget_s"]), rows, "Fleet rollouts through etcd",
        fake=True, scale=30, real=True, rollouts=2, idle_s=10.0, budget_s=330.0)


if __name__ == "__main__":
    raise SystemExit(main())
