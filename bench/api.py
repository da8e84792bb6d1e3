"""Management API throughput: GET /v1/status and POST /v1/params?wait=false.

Requests per second at concurrency 1 and 32, 5 s each, with wrk when it is installed (a Lua
script makes the POST) or else a Python client (threads, one keep-alive connection each).
The POST body equals the config in effect, so every batch is a no-op and nothing restarts:
this is the API's own throughput (a wait=false POST that *changes* the config would restart
llama-server once per batch; see the coalescing benchmark). The client's own ceiling is
measured against llama-server's /health (a C++ server) with the same client and settings.

    .venv/bin/python -m bench.api [--seconds 5]
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.procs import rss_during
from bench.report import cli, loadavg, log, stats
from bench.supervisors import Corral, temp_dir

CONCURRENCY = (1, 32)


def _wrk(url: str, conc: int, seconds: float, script: Path | None, close: bool = False
         ) -> dict[str, Any]:
    threads = 1 if conc == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds:g}s", "--latency", url]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, out)
        return m.group(1) if m else None

    non2xx = grab(r"Non-2xx or 3xx responses:\s+(\d+)")
    sock = grab(r"Socket errors:(.*)")
    return {"client": "wrk", "rps": float(grab(r"Requests/sec:\s+([\d.]+)") or 0),
            "requests": int(grab(r"(\d+) requests in") or 0),
            "latency_avg": grab(r"Latency\s+(\S+)"), "latency_p99": grab(r"99%\s+(\S+)"),
            "non_2xx": int(non2xx or 0), "socket_errors": sock.strip() if sock else None}


def _python(port: int, path: str, conc: int, seconds: float, body: bytes | None
            ) -> dict[str, Any]:
    """Fallback: ``conc`` threads, each one keep-alive http.client connection."""
    stop_at = time.perf_counter() + seconds
    counts = [0] * conc
    bad = [0] * conc
    errors = [0] * conc

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"content-type": "application/json"} if body else {}
        while time.perf_counter() < stop_at:
            try:
                conn.request("POST" if body else "GET", path, body=body, headers=headers)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):
                errors[k] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            counts[k] += 1
            if r.status >= 300:
                bad[k] += 1
        conn.close()

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(conc)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - t0
    return {"client": "python http.client threads", "rps": round(sum(counts) / took, 1),
            "requests": sum(counts), "non_2xx": sum(bad), "socket_errors": sum(errors)}


def latency_check(port: int, n: int = 20) -> dict[str, Any]:
    """GET /v1/status n times on one keep-alive connection, then n times on fresh ones.

    A keep-alive median near 40 ms with fresh connections far faster is the signature of
    Nagle's algorithm meeting delayed ACKs (TCP_NODELAY not set on the server's sockets)."""
    keep, fresh = [], []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", "/v1/status")
        conn.getresponse().read()
        keep.append(time.perf_counter() - t)
    conn.close()
    for _ in range(n):
        t = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/v1/status", headers={"connection": "close"})
        c.getresponse().read()
        c.close()
        fresh.append(time.perf_counter() - t)
    k, f = stats(keep), stats(fresh)
    out: dict[str, Any] = {"keep_alive_ms": k, "fresh_connection_ms": f}
    if k["median"] > 30 and f["median"] < k["median"] / 3:
        out["diagnosis"] = ("keep-alive requests stall ~40 ms: Nagle + delayed ACK; the API's "
                            "sockets lack TCP_NODELAY")
    return out


def run(seconds: float = 5.0) -> dict[str, Any]:
    la = loadavg()
    use_wrk = shutil.which("wrk") is not None
    results: dict[str, Any] = {"client": "wrk" if use_wrk else "python", "seconds": seconds}
    with temp_dir("api") as tmp, Corral(tmp) as c:
        api = c.sup.api_port
        current = c.sup.http.get("/v1/params").json()["config"]["args"]
        body = json.dumps({"args": current})
        script = tmp / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = '
                          f'"application/json"\nwrk.body = [==[{body}]==]\n')
        gen0 = c.status()["generation"]
        results["latency_check"] = latency_check(api)
        rss: list[int] = []
        for conc in CONCURRENCY:
            for name, port, path, post in (
                    ("status", api, "/v1/status", False),
                    ("status_fresh_connections", api, "/v1/status", False),
                    ("params_post_noop", api, "/v1/params?wait=false", True),
                    ("client_ceiling_llama_health", c.port, "/health", False)):
                fresh = name == "status_fresh_connections"
                if fresh and not use_wrk:
                    continue
                log(f"api: {name} at concurrency {conc} for {seconds:g} s")
                with rss_during(c.pid, 0.1) as samples:
                    if use_wrk:
                        r = _wrk(f"http://127.0.0.1:{port}{path}", conc, seconds,
                                 script if post else None, close=fresh)
                    else:
                        r = _python(port, path, conc, seconds, body.encode() if post else None)
                rss += samples
                results[f"{name}_c{conc}"] = r
        time.sleep(2.5)  # let the last no-op batch close (max batch age 2 s)
        final = c.status()
        results["restarts_during_posts"] = final["generation"] - gen0
        results["post_body"] = "equal to the config in effect (a no-op: no restart)"
        results["supervisor_rss_mib_peak_under_api_load"] = (
            round(max(rss) / 2**20, 1) if rss else None)
    results["loadavg_before"] = la
    results["loadavg_after"] = loadavg()
    return results


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for conc in CONCURRENCY:
        for name, label in (("status", "GET /v1/status"),
                            ("status_fresh_connections",
                             "GET /v1/status, Connection: close"),
                            ("params_post_noop", "POST /v1/params?wait=false (no-op body)"),
                            ("client_ceiling_llama_health", "client ceiling: llama /health")):
            x = r.get(f"{name}_c{conc}")
            if x is None:
                continue
            extra = f", p99 {x['latency_p99']}" if x.get("latency_p99") else ""
            bad = f", non-2xx {x['non_2xx']}" if x.get("non_2xx") else ""
            out.append((f"{label}, c={conc}", f"{x['rps']:.0f} req/s{extra}{bad}"))
    out.append(("restarts caused by the no-op POSTs", str(r["restarts_during_posts"])))
    lc = r["latency_check"]
    out.append(("GET /v1/status latency: keep-alive / fresh connection (median)",
                f"{lc['keep_alive_ms']['median']:.1f} ms / "
                f"{lc['fresh_connection_ms']['median']:.1f} ms"
                + (f"  <- {lc['diagnosis']}" if "diagnosis" in lc else "")))
    return out


def main() -> int:
    return cli(__doc__, run, rows, lambda r: f"API throughput ({r['client']}, "
               f"{r['seconds']:g} s each)", seconds=5.0)


if __name__ == "__main__":
    raise SystemExit(main())
