"""Observability overhead: GET /v1/status and GET /metrics requests/s, and the supervisor's
RSS before /metrics is ever scraped vs after (prometheus_client is imported at the first
scrape).

One ``corral supervise`` on the fake llama-server started with ``--metrics`` (so each scrape
of Corral's /metrics also fetches and re-exports llama-server's own, the costliest case),
and once more without it. Requests/s with wrk (keep-alive, concurrency 1 and 8) when it is
installed, else Python threads; the RSS of the supervisor process (psutil) sampled every
0.1 s: idle before any scrape, right after the first scrape, under the /metrics load, and
idle again after it.

    .venv/bin/python -m bench.observe [--seconds 5]
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

from bench.api import _python, _wrk
from bench.procs import rss_during
from bench.report import cli, loadavg, log, merge_into_latest, stats
from bench.supervisors import temp_dir
from tests.harness import FAKE, SupervisorProcess, make_fake_model

CONCURRENCY = (1, 8)
MIB = 2 ** 20


def _rss_mib(pid: int, seconds: float = 2.0) -> float:
    """Median RSS of ``pid`` over ``seconds`` (MiB)."""
    with rss_during(pid, 0.1) as samples:
        time.sleep(seconds)
    return round(statistics.median(samples) / MIB, 1)


def _latency(port: int, path: str, n: int = 50) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    took = []
    size = 0
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", path)
        body = conn.getresponse().read()
        took.append(time.perf_counter() - t)
        size = len(body)
    conn.close()
    return {"ms": stats(took), "bytes": size}


def _load(port: int, path: str, conc: int, seconds: float) -> dict[str, Any]:
    if shutil.which("wrk"):
        return _wrk(f"http://127.0.0.1:{port}{path}", conc, seconds, None)
    return _python(port, path, conc, seconds, None)


def _measure(tmp: Path, llama_metrics: bool, seconds: float) -> dict[str, Any]:
    model = make_fake_model(tmp / "model.gguf")
    sup = SupervisorProcess(tmp, FAKE, model, ["--metrics"] if llama_metrics else [])
    sup.start()
    try:
        sup.wait_running(60)
        assert sup.proc is not None
        pid, api = sup.proc.pid, sup.api_port
        out: dict[str, Any] = {"llama_server_metrics": llama_metrics}
        time.sleep(1.0)
        out["rss_mib_idle_never_scraped"] = _rss_mib(pid)
        out["modules_before"] = _prometheus_loaded(pid)
        for conc in CONCURRENCY:
            log(f"observe: GET /v1/status c={conc} for {seconds:g} s")
            out[f"status_c{conc}"] = _load(api, "/v1/status", conc, seconds)
        out["rss_mib_after_status_load"] = _rss_mib(pid)
        first = sup.http.get("/metrics")
        if first.status_code != 200:
            raise RuntimeError(f"GET /metrics answers {first.status_code}: is the route wired "
                               "in this checkout? (corral.api.metrics_routes.metrics_router)")
        out["metrics_bytes"] = len(first.content)
        out["metrics_series"] = sum(1 for line in first.text.splitlines()
                                    if line and not line.startswith("#"))
        out["rss_mib_after_first_scrape"] = _rss_mib(pid)
        out["latency_status"] = _latency(api, "/v1/status")
        out["latency_metrics"] = _latency(api, "/metrics")
        peak: list[int] = []
        for conc in CONCURRENCY:
            log(f"observe: GET /metrics c={conc} for {seconds:g} s")
            with rss_during(pid, 0.1) as samples:
                out[f"metrics_c{conc}"] = _load(api, "/metrics", conc, seconds)
            peak += samples
        out["rss_mib_peak_under_metrics_load"] = round(max(peak) / MIB, 1) if peak else None
        time.sleep(1.0)
        out["rss_mib_idle_after_metrics_load"] = _rss_mib(pid)
        out["cpu_percent_idle_supervisor"] = _cpu_percent(pid, 3.0)
        return out
    finally:
        sup.close()
        with contextlib.suppress(Exception):
            sup.stop()


def _prometheus_loaded(pid: int) -> bool | None:
    """Whether the supervisor has prometheus_client's files mapped (None: cannot tell)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "prometheus_client" in maps


def _cpu_percent(pid: int, seconds: float) -> float:
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    time.sleep(seconds)
    return round(proc.cpu_percent(None), 1)


def run(seconds: float = 5.0) -> dict[str, Any]:
    la = loadavg()
    result: dict[str, Any] = {"seconds": seconds,
                              "client": "wrk" if shutil.which("wrk") else "python threads"}
    for key, llama_metrics in (("with_llama_metrics", True), ("without_llama_metrics", False)):
        with temp_dir("observe") as tmp:
            log(f"observe: supervisor on the fake llama-server, llama --metrics "
                f"{'on' if llama_metrics else 'off'}")
            result[key] = _measure(tmp, llama_metrics, seconds)
    w = result["with_llama_metrics"]
    result["rss_mib_metrics_share"] = round(
        w["rss_mib_idle_after_metrics_load"] - w["rss_mib_after_status_load"], 1)
    result["loadavg_before"] = la
    result["loadavg_after"] = loadavg()
    result["method"] = (
        "wrk keep-alive GETs against the management API of one supervisor on the fake "
        "llama-server (no token, 127.0.0.1); RSS is the supervisor process's own (psutil, "
        "median of 0.1 s samples over 2 s); rss_mib_metrics_share = idle RSS after the "
        "/metrics load - idle RSS after the /v1/status load (before any scrape)")
    return result


def run_and_merge(**kwargs: Any) -> dict[str, Any]:
    """``run``, then ``observe`` in bench/results/latest.json."""
    return merge_into_latest("observe", run(**kwargs))


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, label in (("with_llama_metrics", "llama --metrics on"),
                       ("without_llama_metrics", "llama --metrics off")):
        x = r[key]
        for conc in CONCURRENCY:
            for what, path in (("status", "/v1/status"), ("metrics", "/metrics")):
                y = x[f"{what}_c{conc}"]
                p99 = f", p99 {y['latency_p99']}" if y.get("latency_p99") else ""
                bad = f", non-2xx {y['non_2xx']}" if y.get("non_2xx") else ""
                out.append((f"{label}: GET {path}, c={conc}",
                            f"{y['rps']:.0f} req/s{p99}{bad}"))
        out.append((f"{label}: one request, median (keep-alive)",
                    f"/v1/status {x['latency_status']['ms']['median']:.2f} ms, /metrics "
                    f"{x['latency_metrics']['ms']['median']:.2f} ms "
                    f"({x['metrics_bytes']} bytes, {x['metrics_series']} samples)"))
        out.append((f"{label}: supervisor RSS, MiB",
                     f"idle {x['rss_mib_idle_never_scraped']}, after /v1/status load "
                     f"{x['rss_mib_after_status_load']}, after 1st scrape "
                     f"{x['rss_mib_after_first_scrape']}, peak under /metrics load "
                     f"{x['rss_mib_peak_under_metrics_load']}, idle after "
                     f"{x['rss_mib_idle_after_metrics_load']}"))
    out.append(("metrics' share of the supervisor's RSS",
                f"{r['rss_mib_metrics_share']} MiB"))
    return out


def main() -> int:
    return cli(__doc__, run_and_merge, rows,
               lambda r: f"Observability overhead ({r['client']}, {r['seconds']:g} s each)",
               seconds=5.0)


if __name__ == "__main__":
    raise SystemExit(main())
