"""Coalescing: a flood of config changes faster than llama-server can restart.

N POSTs (default 200) spread evenly over T seconds (default 5) from several threads, each
a different value (``--alias flood-<i>``), sent with ``?wait=false`` so the flood keeps its
pace. Counted: restarts (the status ``generation`` delta), against the optimum for an
applier that can run one restart at a time, and whether the last write won.

Optimum: one restart takes R (stop + start + ready, measured here with one change). A
serial applier that restarts as soon as there is something new starts restarts at 0, R,
2R, ... while the flood lasts, i.e. ceil(T / R) of them, and then one more for the changes
that arrived during the last one: ceil(T / R) + 1. Fewer is possible only by holding
changes back longer (at the extreme, one restart after the flood ends, if one knew when).
Corral's batch window (debounce 200 ms, max batch age 2 s) delays the first restart of a
continuous flood to 2 s after its first change.

    .venv/bin/python -m bench.coalesce [--requests 200 --seconds 5 --threads 4]
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any

import httpx

from bench.procs import rss_during
from bench.report import cli, loadavg, log, log_events, ms, stats
from bench.supervisors import Corral, temp_dir
from tests.harness import wait_for

DEBOUNCE_S = 0.2
MAX_AGE_S = 2.0
MIN_HEALTHY_S = 0.3


def flood(api_port: int, n: int, seconds: float, threads: int, prefix: str = "flood"
          ) -> dict[str, Any]:
    """Send ``n`` POSTs evenly over ``seconds``; return codes and the accepted change ids."""
    start = time.perf_counter() + 0.05
    codes: dict[int, int] = {}
    accepted: list[tuple[int, str]] = []  # (change number, alias)
    errors: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            for i in range(k, n, threads):
                delay = start + i * seconds / n - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                alias = f"{prefix}-{i}"
                t = time.perf_counter()
                try:
                    r = http.post("/v1/params", params={"wait": "false"},
                                  json={"args": {"--alias": alias}})
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                took = time.perf_counter() - t
                with lock:
                    latencies.append(took)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 202:
                        accepted.append((int(r.json()["change_id"].lstrip("c")), alias))

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"codes": codes, "accepted": accepted, "errors": errors,
            "sent_over_s": round(time.perf_counter() - start, 3),
            "post_latency_ms": stats(latencies)}


def wait_applied(c: Corral, alias: str | None, timeout: float = 120) -> dict[str, Any]:
    """The status once nothing is pending and ``--alias`` is ``alias`` (the flood's last)."""
    def settled() -> dict[str, Any] | None:
        s = c.status()
        done = (s["state"] == "RUNNING" and s["pending_changes"] == 0
                and s["config"]["args"].get("--alias") == alias)
        return s if done else None

    status = wait_for(settled, timeout, "the flood's last change applied")
    assert status is not None
    return status


def _restart_times(log_text: str, since: float) -> list[float]:
    """Busy time of each restart after ``since`` (Corral's log): 'applying' -> 'ready' +
    the 0.3 s min-healthy wait that follows it."""
    events = [(t, k) for t, k in log_events(log_text, {
        "applying": "applying a batch", "ready": ") is ready after"}) if t >= since]
    out, start = [], None
    for t, kind in events:
        if kind == "applying":
            start = t
        elif start is not None:
            out.append(t - start + MIN_HEALTHY_S)
            start = None
    return out


def run(requests: int = 200, seconds: float = 5.0, threads: int = 4) -> dict[str, Any]:
    n = requests
    la = loadavg()
    with temp_dir("coalesce") as tmp, Corral(tmp) as c:
        # R: one restart, measured with one change (minus the debounce it waits first)
        singles = []
        for i in range(3):
            t = time.perf_counter()
            r = c.sup.post({"--alias": f"single-{i}"})
            singles.append(time.perf_counter() - t - DEBOUNCE_S)
            assert r.status_code == 200, r.text
        restart_s = statistics.median(singles)
        gen0 = c.status()["generation"]
        log(f"coalesce: {n} changes over {seconds:g} s from {threads} threads "
            f"(one restart takes {restart_s:.2f} s)")
        with rss_during(c.pid) as rss:
            t0 = time.perf_counter()
            wall0 = time.time()
            f = flood(c.sup.api_port, n, seconds, threads)
            t_sent = time.perf_counter()
            expected = max(f["accepted"])[1] if f["accepted"] else None
            final = wait_applied(c, expected)
            t_done = time.perf_counter()
        server_errors = sum(v for k, v in f["codes"].items() if k >= 500)
        in_flood = _restart_times(c.sup.log(), wall0)
    restarts = final["generation"] - gen0
    if in_flood:  # what the flood actually faced (load on this machine varies)
        restart_s = statistics.median(in_flood)
    optimum = math.ceil(seconds / restart_s) + 1
    # Corral's own expectation: first batch closes at MAX_AGE, then back to back, plus one
    corral_model = (math.ceil(max(0.0, seconds - MAX_AGE_S) / restart_s) + 1
                    if seconds > MAX_AGE_S else 1)
    return {
        "requests": n, "seconds": seconds, "threads": threads,
        "answers": {str(k): v for k, v in sorted(f["codes"].items())},
        "client_errors": len(f["errors"]), "server_errors_5xx": server_errors,
        "post_wait_false_latency_ms": f["post_latency_ms"],
        "restart_time_s": round(restart_s, 3),
        "restart_time_source": "median busy time of the flood's own restarts (Corral's log: "
                               "'applying' -> 'ready' + 0.3 s min-healthy)" if in_flood else
                               "median of 3 single changes (POST->200 minus the debounce)",
        "restart_times_in_flood_s": [round(x, 3) for x in in_flood],
        "restart_time_single_changes_s": [round(x, 3) for x in singles],
        "restarts": restarts, "optimum": optimum,
        "optimum_formula": "ceil(T / R) + 1: a serial applier restarting as soon as there "
                           "is something new starts ceil(T/R) restarts during the flood and "
                           "one more for what arrived during the last; R = one restart's busy "
                           "time (stop + start + ready + min-healthy)",
        "corral_expected": corral_model,
        "corral_expected_formula": "ceil((T - 2 s) / R) + 1: a continuous flood's first batch "
                                   "closes at the 2 s max batch age, then restarts run back "
                                   "to back, plus one for the tail",
        "last_write_won": final["config"]["args"].get("--alias") == expected,
        "expected_final_alias": expected,
        "flood_end_to_applied_s": round(t_done - t_sent, 3),
        "flood_start_to_applied_s": round(t_done - t0, 3),
        "supervisor_rss_mib_during_flood": {
            "samples": len(rss), "peak": round(max(rss) / 2**20, 1) if rss else None,
            "first": round(rss[0] / 2**20, 1) if rss else None},
        "loadavg_before": la, "loadavg_after": loadavg(),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{r['requests']} POSTs over {r['seconds']:g} s ({r['threads']} threads, wait=false)",
         f"answers {r['answers']}, 5xx {r['server_errors_5xx']}, client errors "
         f"{r['client_errors']}"),
        ("one restart R (median of the flood's own)", f"{r['restart_time_s']:.2f} s "
         f"(single changes before: {r['restart_time_single_changes_s']})"),
        ("restarts (generation delta) vs optimum",
         f"{r['restarts']} vs {r['optimum']} = ceil(T/R)+1 = ceil({r['seconds']:g}/"
         f"{r['restart_time_s']:.2f})+1"),
        ("Corral's own expectation (2 s max batch age)",
         f"{r['corral_expected']} = ceil((T-2)/R)+1"),
        ("last write won", f"{r['last_write_won']} ({r['expected_final_alias']})"),
        ("flood end -> last change running", f"{r['flood_end_to_applied_s']:.2f} s"),
        ("POST ?wait=false latency during the flood",
         f"median {ms(r['post_wait_false_latency_ms'].get('median'))}, max "
         f"{ms(r['post_wait_false_latency_ms'].get('max'))}"),
    ]


def main() -> int:
    return cli(__doc__, run, rows, "coalescing", requests=200, seconds=5.0, threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
