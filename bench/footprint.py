"""Footprint: the supervisor's RSS idle and under a flood of changes, and CLI start-up time.

RSS is sampled with psutil on the supervisor's own pid (not llama-server's) every 50 ms:
3 s idle after start-up, then during a flood of POSTs (the coalescing flood: 200 changes
over 5 s, until the last one runs). supervisord's idle RSS running the same llama-server is
given for comparison. ``corral --help`` wall time is the median of 10 runs, both as
``python -m corral --help`` and through the ``.venv/bin/corral`` console script.

    .venv/bin/python -m bench.footprint [--no-flood]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from bench import coalesce
from bench.procs import rss_during, rss_sampler
from bench.report import cli, loadavg, log, ms, stats
from bench.supervisors import VENV_BIN, Corral, Supervisord, temp_dir

MIB = 2**20


def _idle_rss(pid: int, seconds: float = 3.0) -> dict[str, Any]:
    end = time.monotonic() + seconds
    samples = rss_sampler(pid, lambda: time.monotonic() > end, 0.05)
    return {"samples": len(samples), "peak_mib": round(max(samples) / MIB, 1),
            "median_mib": round(statistics.median(samples) / MIB, 1)}


def _flood_rss(c: Corral) -> dict[str, Any]:
    with rss_during(c.pid) as rss:
        f = coalesce.flood(c.sup.api_port, 200, 5.0, 4, prefix="footprint")
        coalesce.wait_applied(c, max(f["accepted"])[1])
    return {"samples": len(rss), "peak_mib": round(max(rss) / MIB, 1),
            "answers": {str(k): v for k, v in f["codes"].items()}}


def help_times(runs: int = 10) -> dict[str, Any]:
    out = {}
    for name, cmd in (("python_m_corral", [sys.executable, "-m", "corral", "--help"]),
                      ("console_script", [str(VENV_BIN / "corral"), "--help"])):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, timeout=60)
            times.append(time.perf_counter() - t)
        out[name] = stats(times, digits=1)
    bare = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        bare.append(time.perf_counter() - t0)
    out["bare_python_startup"] = stats(bare, digits=1)
    return out


def run(flood: bool = True) -> dict[str, Any]:
    la = loadavg()
    out: dict[str, Any] = {}
    with temp_dir("footprint") as tmp, Corral(tmp) as c:
        log("footprint: Corral idle RSS (3 s)")
        out["corral_idle_rss"] = _idle_rss(c.pid)
        if flood:
            log("footprint: Corral RSS under a flood of 200 changes over 5 s")
            out["corral_flood_rss"] = _flood_rss(c)
    with temp_dir("footprint-sd") as tmp, Supervisord(tmp) as s:
        log("footprint: supervisord idle RSS (3 s)")
        out["supervisord_idle_rss"] = _idle_rss(s.pid)
    log("footprint: corral --help, 10 runs each")
    out["help_wall_ms"] = help_times()
    out["loadavg_before"] = la
    out["loadavg_after"] = loadavg()
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("Corral idle RSS (peak / median)",
            f"{r['corral_idle_rss']['peak_mib']} / {r['corral_idle_rss']['median_mib']} MiB"),
           ("supervisord idle RSS (peak)", f"{r['supervisord_idle_rss']['peak_mib']} MiB")]
    if "corral_flood_rss" in r:
        out.append(("Corral RSS under the flood (peak)",
                    f"{r['corral_flood_rss']['peak_mib']} MiB"))
    h = r["help_wall_ms"]
    out += [("python -m corral --help (median of 10)", ms(h["python_m_corral"]["median"])),
            (".venv/bin/corral --help (median of 10)", ms(h["console_script"]["median"])),
            ("python -c pass (reference)", ms(h["bare_python_startup"]["median"]))]
    return out


def main() -> int:
    return cli(__doc__, run, rows, "footprint", flood=True)


if __name__ == "__main__":
    raise SystemExit(main())
