"""Applies under load through the front door: failed requests, latency, the held release.

A real ``corral supervise --listen 127.0.0.1:P --swap <strategy>`` on the real llama-server
and the real gemma-3 270M GGUF (``-c 4096 -np 1``), once per strategy (start-first, then
stop-first). Four client threads send, each in turn, a ``/completion`` (``n_predict`` 4), a
``GET /health``, a streamed ``/completion`` and a ``GET /health`` (each client starts at a
different place in that mix), over keep-alive connections to the listen port, for the whole
run. Meanwhile the bench applies ``{"-np": 2}`` and ``{"-np": 1}`` in turn (each a real
change: a new llama-server every time) with ``POST /v1/params`` (wait for the answer), after a
quiet window of ``--quiet-s`` seconds with no apply (the baseline, interleaved with the
applies so that load drift on the shared machine hits both alike).

Per strategy:

- applies done and their duration (``POST /v1/params`` -> 200 ``restarted``);
- requests ok / failed over the whole run, and those overlapping an apply. A failure is a
  non-2xx answer, a connection error, a timeout (60 s), or a stream without its final chunk
  (``"stop": true``) -- the same rule as ``tests/loadgen.py``;
- latency p50/p99/max per kind (completion, streamed completion, /health): "during" counts
  the requests whose lifetime overlaps an apply's POST, "baseline" the requests that started
  at least 1 s after the previous apply's answer and ended before the next POST;
- the front door's own counters from ``GET /v1/status`` ``front`` (held, released, retried,
  cut, failed), as the difference over the run;
- stop-first only, the release delay: a probe thread reads Corral's log for the new
  llama-server's ``--port`` the moment it is started, then sends ``GET /health`` to that
  loopback port on a fresh connection every ~0.5 ms (1-2 kHz) until the first 200. The
  release delay is the time from sending that first successful probe to the moment the
  first *held* request completed at the client (held: in flight at that instant, when the
  old server is gone and the new one not yet routed to). It is what a client waiting in the
  queue sees: Corral's own probe interval (10 ms) and its probe's latency, the release, the
  forward, llama-server's answer (a /health is ~1 ms; a completion tens of ms), the client
  reading it. The flip to 200 happened between the previous probe and this one
  (``probe_gap``, 1-8 ms when the machine is busy): the delay from the flip is the figure
  plus 0..probe_gap. Against "after Corral sees /health 200" (no log line marks that
  instant; Corral logs "ready" only after min-healthy, 0.3 s later) the figure is high by
  Corral's own probe wait (0-10 ms) and low by at most probe_gap.

Each apply also keeps its steps from Corral's log (``log_ms``: applying, draining, stopped,
started, ready, in ms after the POST) and its three slowest requests; the whole log is
copied to /tmp/corral-bench-front-applies-<strategy>.log, where llama-server's own
``print_timing`` lines tell the servers' per-token time (CPU contention between an old and
a new server) apart from the front door's cost.

Bounded: ``--applies`` per strategy (default 10), ``--seconds`` for the whole run (half per
strategy; the applies stop when it runs out), every wait has a deadline, 127.0.0.1 only.
Writes bench/results/front_applies.json; run alone, it also sets ``front_applies`` in
bench/results/latest.json.

    .venv/bin/python -m bench.front_applies [--applies 10] [--seconds 900] [--quiet-s 3]
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import re
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import http_status
from bench.report import RESULTS, cli, loadavg, log, log_events, merge_into_latest, write_json
from bench.supervisors import Corral, temp_dir
from tests.harness import free_port
from tests.loadgen import Outcome

LLAMA_ARGS = ["-c", "4096", "-np", "1"]
CHANGES: tuple[dict[str, Any], ...] = ({"-np": 2}, {"-np": 1})
STRATEGIES = ("start-first", "stop-first")
MIX = ("completion", "health", "completion_stream", "health")
KINDS = ("completion", "completion_stream", "health")
CLIENTS = 4
N_PREDICT = 4
PROMPT = "Say hi."
TIMEOUT_S = 60.0
AFTER_APPLY_S = 1.0    # requests this soon after an apply are neither "during" nor baseline
PROBE_EVERY_S = 0.0005
FRONT_KEYS = ("held_total", "released_total", "retried", "cut", "failed_total")
MARKS = {"applying": "applying a batch", "draining": "draining ", "stopped": ") stopped (code",
         "sigkill": "ignored SIGTERM", "started": "started llama-server (pid",
         "ready": ") is ready after"}
LOG_COPY = Path("/tmp")  # each run's Corral log is copied here (for reading, not committed)
_STARTED = re.compile(r"started llama-server \(pid (\d+), generation (\d+)\): .*--port (\d+)")


# ---- the clients --------------------------------------------------------------------------

class Failed(Exception):
    pass


class Clients:
    """``n`` threads sending the mix to ``port`` until :meth:`stop`; every outcome kept."""

    def __init__(self, port: int, n: int = CLIENTS) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"front-applies-client-{i}") for i in range(n)]

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + TIMEOUT_S + 10
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"client threads still running: {alive}")

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _run(self, client: int) -> None:
        conn: http.client.HTTPConnection | None = None
        for kind in itertools.islice(itertools.cycle(MIX), client, None):
            if self._stop.is_set():
                break
            start = time.monotonic()
            reason = ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
                self._send(conn, kind)
            except Failed as exc:
                reason = str(exc)[:200]
            except (OSError, http.client.HTTPException, ValueError) as exc:
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            end = time.monotonic()
            with self._lock:
                self.outcomes.append(Outcome(kind, client, start, end, not reason, reason))
            if reason:
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.05)  # pacing: a refused connection fails at once
        if conn is not None:
            conn.close()

    @staticmethod
    def _send(conn: http.client.HTTPConnection, kind: str) -> None:
        if kind == "health":
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}: {body[:200]!r}")
            return
        stream = kind == "completion_stream"
        conn.request("POST", "/completion",
                     json.dumps({"prompt": PROMPT, "n_predict": N_PREDICT, "stream": stream}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if not 200 <= resp.status < 300:
            raise Failed(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        if not stream:
            answer = json.loads(resp.read())
            if answer.get("stop") is not True:
                raise Failed(f"no stop in {str(answer)[:200]}")
            return
        last: dict[str, Any] = {}
        for line in resp:  # reads the chunked body to its end, so the connection is reusable
            if line.startswith(b"data: ") and line[6:].strip() not in (b"", b"[DONE]"):
                last = json.loads(line[6:])
        if last.get("stop") is not True:
            raise Failed(f"stream ended without its final chunk (last: {str(last)[:200]})")


# ---- the new server's first /health 200 -----------------------------------------------------

class FirstHealthy(threading.Thread):
    """Finds the next llama-server Corral starts (its log line, from ``offset`` on) and
    probes its /health on a fresh connection every ~0.5 ms until the first 200."""

    def __init__(self, log_path: Path, offset: int, old_pid: int, timeout: float) -> None:
        super().__init__(daemon=True, name="front-applies-probe")
        self.log_path, self.offset, self.old_pid = log_path, offset, old_pid
        self.deadline = time.monotonic() + timeout
        self.port: int | None = None
        self.port_seen: float | None = None   # monotonic, when the log line was read
        self.t200: float | None = None        # monotonic, the first 200 probe was sent
        self.t200_answered: float | None = None
        self.prev_sent: float | None = None   # the probe before it (no 200)
        self.probes = 0
        self.gaps: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._find_port()
            self._probe()
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            self.error = repr(exc)

    def _find_port(self) -> None:
        text = ""
        with open(self.log_path, errors="replace") as f:
            f.seek(self.offset)
            while time.monotonic() < self.deadline:
                text += f.read()
                for m in _STARTED.finditer(text):
                    if int(m.group(1)) != self.old_pid:
                        self.port, self.port_seen = int(m.group(3)), time.monotonic()
                        return
                time.sleep(0.001)
        raise TimeoutError("no 'started llama-server' line in Corral's log")

    def _probe(self) -> None:
        assert self.port is not None
        last_sent: float | None = None
        while time.monotonic() < self.deadline:
            sent = time.monotonic()
            status = http_status(self.port, "/health", timeout=1.0)
            answered = time.monotonic()
            self.probes += 1
            if last_sent is not None:
                self.gaps.append(sent - last_sent)
            if status == 200:
                self.t200, self.t200_answered, self.prev_sent = sent, answered, last_sent
                return
            last_sent = sent
            time.sleep(PROBE_EVERY_S)
        raise TimeoutError(f"port {self.port}: no /health 200 in time")


# ---- one strategy -------------------------------------------------------------------------

def _front(c: Corral) -> dict[str, Any]:
    front = c.status().get("front")
    if not front:
        raise RuntimeError("GET /v1/status has no 'front' (is --listen on?)")
    return dict(front)


def _warm(port: int) -> None:
    """One completion through the front door, so the first measured one is not a cold one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        Clients._send(conn, "completion")
    finally:
        conn.close()


def one_strategy(strategy: str, applies: int, budget_s: float, quiet_s: float,
                 tmp: Path) -> dict[str, Any]:
    listen = free_port()
    started = time.monotonic()
    windows: list[dict[str, Any]] = []
    errors: list[str] = []
    with Corral(tmp, LLAMA_ARGS, extra_cli=["--listen", f"127.0.0.1:{listen}",
                                            "--swap", strategy]) as c:
        _warm(listen)
        front0 = _front(c)
        with Clients(listen) as clients:
            for i in range(applies):
                if i and time.monotonic() - started > budget_s:
                    log(f"front_applies: {strategy}: {budget_s:.0f} s spent; stopping after "
                        f"{i} applies")
                    break
                time.sleep(quiet_s)  # the baseline window: clients running, no apply
                change = CHANGES[i % len(CHANGES)]
                log(f"front_applies: {strategy}: apply {i + 1}/{applies} {change}")
                windows.append(_apply(c, strategy, change, errors))
            time.sleep(quiet_s)  # a last baseline window
            clients.stop()
            outcomes = clients.snapshot()
        front1 = _front(c)
        sup_log = c.sup.log()
    copy = LOG_COPY / f"corral-bench-front-applies-{strategy}.log"
    with contextlib.suppress(OSError):
        copy.write_text(sup_log)
    _phases(windows, sup_log)
    return _summarize(strategy, applies, windows, outcomes, front0, front1, errors,
                      sup_log, time.monotonic() - started)


def _apply(c: Corral, strategy: str, change: dict[str, Any], errors: list[str]
           ) -> dict[str, Any]:
    old_pid = int(c.status()["pid"])
    probe = None
    if strategy == "stop-first":
        probe = FirstHealthy(c.sup.log_path, c.sup.log_path.stat().st_size, old_pid, 120)
        probe.start()
    wall = time.time()
    t0 = time.monotonic()
    r = c.sup.post(change)
    t1 = time.monotonic()
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    w: dict[str, Any] = {"change": change, "sent": t0, "wall_sent": wall, "answered": t1,
                         "status": r.status_code, "restarted": body.get("restarted"),
                         "strategy": body.get("strategy")}
    if r.status_code != 200 or not body.get("restarted") or body.get("strategy") != strategy:
        errors.append(f"POST {change} -> {r.status_code} {str(body)[:300]}")
        w["ok"] = False
    else:
        w["ok"] = True
    if probe is not None:
        probe.join(max(0.0, probe.deadline - time.monotonic()) + 1)
        w.update(new_port=probe.port, port_seen=probe.port_seen, t200=probe.t200,
                 t200_answered=probe.t200_answered, prev_probe_sent=probe.prev_sent,
                 probes=probe.probes,
                 probe_gap_median_ms=(round(statistics.median(probe.gaps) * 1000, 3)
                                      if probe.gaps else None), probe_error=probe.error)
    return w


def _phases(windows: list[dict[str, Any]], sup_log: str) -> None:
    """Each apply's steps from Corral's log (1 ms stamps), in ms after the POST was sent."""
    events = log_events(sup_log, MARKS)
    for w in windows:
        end = w["wall_sent"] + (w["answered"] - w["sent"]) + 0.005
        ph: dict[str, float] = {}
        for t, name in events:
            if w["wall_sent"] - 0.005 <= t <= end and name not in ph:
                ph[name] = round((t - w["wall_sent"]) * 1000, 1)
        w["log_ms"] = ph


# ---- figures ------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (seconds), in ms."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, int(-(-q * len(v) // 100)) - 1))] * 1000, 2)


def _lat(outcomes: list[Outcome]) -> dict[str, Any]:
    d = [o.end - o.start for o in outcomes if o.ok]
    return {"n": len(d), "p50_ms": pct(d, 50), "p99_ms": pct(d, 99), "max_ms": pct(d, 100)}


def _release(w: dict[str, Any], outcomes: list[Outcome]) -> dict[str, Any] | None:
    """The first held request to complete after the probe's first 200 (see the doc)."""
    t200 = w.get("t200")
    if t200 is None:
        return None
    held = [o for o in outcomes if o.start < t200 < o.end]
    done = sorted((o for o in held if o.ok), key=lambda o: o.end)
    first_health = next((o for o in done if o.kind == "health"), None)
    return {
        "held_at_200": len(held),
        "held_failed": sum(1 for o in held if not o.ok),
        "first_released_ms": round((done[0].end - t200) * 1000, 2) if done else None,
        "first_released_kind": done[0].kind if done else None,
        "first_health_released_ms": (round((first_health.end - t200) * 1000, 2)
                                     if first_health else None),
        "all_held_done_ms": round((done[-1].end - t200) * 1000, 2) if done else None,
        "probe_gap_ms": (round((t200 - w["prev_probe_sent"]) * 1000, 3)
                         if w.get("prev_probe_sent") is not None else None),
        "probe_rtt_ms": round((w["t200_answered"] - t200) * 1000, 3),
        "port_known_before_200_ms": (round((t200 - w["port_seen"]) * 1000, 1)
                                     if w.get("port_seen") is not None else None),
        "post_to_200_ms": round((t200 - w["sent"]) * 1000, 1),
    }


def _summarize(strategy: str, asked: int, windows: list[dict[str, Any]],
               outcomes: list[Outcome], front0: dict[str, Any], front1: dict[str, Any],
               errors: list[str], sup_log: str, took: float) -> dict[str, Any]:
    spans = [(w["sent"], w["answered"]) for w in windows]

    def during(o: Outcome) -> bool:
        return any(o.start <= b and o.end >= a for a, b in spans)

    def baseline(o: Outcome) -> bool:
        prev = max((b for _, b in spans if b <= o.start), default=None)
        nxt = min((a for a, _ in spans if a >= o.start), default=None)
        return ((prev is None or o.start >= prev + AFTER_APPLY_S)
                and (nxt is None or o.end < nxt) and not during(o))

    dur = [o for o in outcomes if during(o)]
    base = [o for o in outcomes if baseline(o)]
    failed = [o for o in outcomes if not o.ok]
    lat = {kind: {"baseline": _lat([o for o in base if o.kind == kind]),
                  "during": _lat([o for o in dur if o.kind == kind])} for kind in KINDS}
    lat["all"] = {"baseline": _lat(base), "during": _lat(dur)}
    front = {k: front1.get(k, 0) - front0.get(k, 0) for k in FRONT_KEYS}
    front["failed_by_reason"] = {k: v - front0.get("failed", {}).get(k, 0)
                                 for k, v in front1.get("failed", {}).items()}
    durations = [w["answered"] - w["sent"] for w in windows]
    out: dict[str, Any] = {
        "strategy": strategy, "applies_asked": asked, "applies_done": len(windows),
        "applies_ok": sum(1 for w in windows if w["ok"]),
        "apply_ms": {"median": round(statistics.median(durations) * 1000, 1) if durations
                     else None, "min": pct(durations, 0), "max": pct(durations, 100)},
        "requests": {"total": len(outcomes), "ok": len(outcomes) - len(failed),
                     "failed": len(failed), "during_applies": len(dur),
                     "failed_during_applies": sum(1 for o in dur if not o.ok),
                     "baseline": len(base)},
        "failures": [str(o) for o in failed[:20]],
        "failure_reasons": dict(Counter(o.reason.split(":")[0] for o in failed)),
        "latency": lat, "front": front, "apply_errors": errors,
        "seconds": round(took, 1),
    }
    if strategy == "stop-first":
        rel = [_release(w, outcomes) for w in windows]
        out["release_per_apply"] = rel
        got = [r for r in rel if r is not None]

        def med(key: str) -> float | None:
            vals = [r[key] for r in got if r.get(key) is not None]
            return round(statistics.median(vals), 2) if vals else None

        def top(key: str) -> float | None:
            vals = [r[key] for r in got if r.get(key) is not None]
            return max(vals) if vals else None

        out["release"] = {"n": len(got), "first_released_median_ms": med("first_released_ms"),
                          "first_released_max_ms": top("first_released_ms"),
                          "first_health_released_median_ms": med("first_health_released_ms"),
                          "first_health_released_max_ms": top("first_health_released_ms"),
                          "all_held_done_median_ms": med("all_held_done_ms"),
                          "held_at_200_median": med("held_at_200"),
                          "probe_gap_median_ms": med("probe_gap_ms"),
                          "probe_rtt_median_ms": med("probe_rtt_ms"),
                          "post_to_200_median_ms": med("post_to_200_ms"),
                          "probe_errors": [w.get("probe_error") for w in windows
                                           if w.get("probe_error")]}
    for w in windows:  # the slowest requests overlapping each apply, in ms after its POST
        mine = [o for o in outcomes if o.start <= w["answered"] and o.end >= w["sent"]]
        w["slowest"] = [{"kind": o.kind, "client": o.client, "ok": o.ok,
                         "start_ms": round((o.start - w["sent"]) * 1000, 1),
                         "end_ms": round((o.end - w["sent"]) * 1000, 1)}
                        for o in sorted(mine, key=lambda o: o.start - o.end)[:3]]
    for w in windows:  # monotonic instants are meaningless outside this run: keep offsets
        base_t = w["sent"]
        for k in ("answered", "port_seen", "t200", "t200_answered", "prev_probe_sent"):
            if w.get(k) is not None:
                w[k] = round(w[k] - base_t, 4)
        w["sent"] = 0.0
    for w in windows:
        w.pop("wall_sent", None)
    out["applies"] = windows
    out["log_phases_median_ms"] = {
        k: round(statistics.median(v), 1) for k in MARKS
        if (v := [w["log_ms"][k] for w in windows if k in w.get("log_ms", {})])}
    out["sigkills"] = sum(1 for w in windows if "sigkill" in w.get("log_ms", {}))
    out["corral_log_warnings"] = [line for line in sup_log.splitlines()
                                  if " WARNING " in line or " ERROR " in line][:30]
    return out


# ---- the run ------------------------------------------------------------------------------

def run(applies: int = 10, seconds: float = 900.0, quiet_s: float = 3.0) -> dict[str, Any]:
    result: dict[str, Any] = {
        "llama_server_args": LLAMA_ARGS, "changes": list(CHANGES), "clients": CLIENTS,
        "mix": list(MIX), "n_predict": N_PREDICT, "quiet_s": quiet_s,
        "applies_asked": applies, "budget_s": seconds, "loadavg_before": loadavg(),
        "strategies": {}}
    for strategy in STRATEGIES:
        log(f"front_applies: {strategy}: starting Corral with --listen")
        with temp_dir(f"applies-{strategy}") as tmp:
            try:
                result["strategies"][strategy] = one_strategy(
                    strategy, applies, seconds / len(STRATEGIES), quiet_s, tmp)
            except Exception as exc:  # noqa: BLE001 - record it, run the other strategy
                log(f"front_applies: {strategy} FAILED: {exc!r}")
                result["strategies"][strategy] = {"error": repr(exc)}
        result["loadavg_after"] = loadavg()
        write_json(RESULTS / "front_applies.json", result)
    return result


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    s = r["strategies"]
    names = list(s)
    out = [("", "  ".join(f"{n:>22}" for n in names))]

    def line(label: str, cell: Any) -> None:
        cells = []
        for n in names:
            try:
                v = "error" if "error" in s[n] else cell(s[n])
            except (KeyError, TypeError):
                v = "-"
            cells.append(f"{'-' if v is None else v:>22}")
        out.append((label, "  ".join(cells)))

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    line("applies done (ok) / asked",
         lambda x: f"{x['applies_done']} ({x['applies_ok']}) / {x['applies_asked']}")
    line("apply POST -> 200 median (min-max) ms",
         lambda x: f"{f(x['apply_ms']['median'])} ({f(x['apply_ms']['min'])}-"
                   f"{f(x['apply_ms']['max'])})")
    line("requests ok / failed (whole run)",
         lambda x: f"{x['requests']['ok']} / {x['requests']['failed']}")
    line("overlapping an apply: n / failed",
         lambda x: f"{x['requests']['during_applies']} / "
                   f"{x['requests']['failed_during_applies']}")
    for kind, label in (("completion", "completion"), ("completion_stream", "stream"),
                        ("health", "/health"), ("all", "all kinds")):
        for which in ("baseline", "during"):
            line(f"{label} p50 / p99 ms, {which}",
                 lambda x, k=kind, w=which: f"{f(x['latency'][k][w]['p50_ms'])} / "
                                            f"{f(x['latency'][k][w]['p99_ms'])}")
        line(f"{label} max ms, during",
             lambda x, k=kind: f(x["latency"][k]["during"]["max_ms"]))
    line("log: applying / stopped / started / ready ms",
         lambda x: " / ".join(f(x["log_phases_median_ms"].get(k))
                              for k in ("applying", "stopped", "started", "ready")))
    line("old server SIGKILLed (ignored SIGTERM)", lambda x: str(x["sigkills"]))
    line("front held / released", lambda x: f"{x['front']['held_total']} / "
                                            f"{x['front']['released_total']}")
    line("front retried / cut / failed",
         lambda x: f"{x['front']['retried']} / {x['front']['cut']} / "
                   f"{x['front']['failed_total']}")
    line("release: first held done median (max) ms",
         lambda x: f"{f(x['release']['first_released_median_ms'])} "
                   f"({f(x['release']['first_released_max_ms'])})")
    line("release: first held /health median (max) ms",
         lambda x: f"{f(x['release']['first_health_released_median_ms'])} "
                   f"({f(x['release']['first_health_released_max_ms'])})")
    line("release: all held done median ms",
         lambda x: f(x["release"]["all_held_done_median_ms"]))
    line("release: held at 200 median / probe gap ms",
         lambda x: f"{f(x['release']['held_at_200_median'])} / "
                   f"{x['release']['probe_gap_median_ms']}")
    return out


def run_and_merge(**kwargs: Any) -> dict[str, Any]:
    """``run``, then ``front_applies`` in bench/results/latest.json (the key run_all uses)."""
    return merge_into_latest("front_applies", run(**kwargs))


def main() -> int:
    return cli(__doc__, run_and_merge, rows,
               lambda r: f"Applies under load through the front door ({r['clients']} clients, "
                         f"up to {r['applies_asked']} applies per strategy)",
               applies=10, seconds=900.0, quiet_s=3.0)


if __name__ == "__main__":
    raise SystemExit(main())
