"""All benchmarks in one run (``make bench``): a table on stdout, the same figures as JSON.

Real llama-server and the real gemma-3 270M GGUF, 127.0.0.1 only, bounded in count and
time (a few minutes on 2 cores). Writes ``bench/results/latest.json``. Each section is a
module of its own that also runs alone (``.venv/bin/python -m bench.respawn`` ...).
Progress goes to stderr. Exit status 1 if a section failed (the others still run).

    .venv/bin/python -m bench.run_all [--quick]
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    api,
    apply,
    balance,
    coalesce,
    fit,
    footprint,
    front_applies,
    front_door,
    models,
    profile_respawn,
    respawn,
)
from bench.report import RESULTS, loadavg, log, machine, print_rows, write_json
from bench.supervisors import BASE_ARGS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    ns = p.parse_args()
    n_kill, n_apply, api_s = (5, 2, 2.0) if ns.quick else (20, 5, 5.0)
    started = time.perf_counter()
    info = machine()
    log(f"machine: {info['cores']} cores, {info['cpu_model']}, load {info['loadavg_start']}")
    results: dict[str, Any] = {"machine": info, "llama_server_args": BASE_ARGS,
                               "quick": ns.quick}
    sections: list[tuple[str, str, Callable[[], dict[str, Any]],
                         Callable[[dict[str, Any]], list[tuple[str, str]]]]] = [
        ("respawn", f"1. respawn after SIGKILL ({n_kill} runs)",
         lambda: respawn.run(n_kill), respawn.rows),
        ("apply", f"2. apply overhead ({n_apply} runs each, median)",
         lambda: apply.run(n_apply), apply.rows),
        ("coalesce", "3. coalescing a flood of changes", lambda: coalesce.run(), coalesce.rows),
        ("api", f"4. API throughput ({api_s:g} s each)", lambda: api.run(api_s), api.rows),
        ("footprint", "5. footprint", lambda: footprint.run(flood=False), footprint.rows),
        ("fit", "6. memory estimates vs llama-server's logged buffers (MiB)", fit.run, fit.rows),
        ("respawn_profile", "Corral's crash path, step by step (in-process diagnostic)",
         lambda: profile_respawn.run(10 if not ns.quick else 3), profile_respawn.rows),
        ("front_door", "7. the front door: direct vs Corral vs HAProxy (medians of rounds)",
         lambda: front_door.run(rounds=1 if ns.quick else 3, seconds=2.0 if ns.quick else 3.0,
                                stream_cycles=2 if ns.quick else 8,
                                paced_cycles=5 if ns.quick else 30),
         front_door.rows),
        ("front_applies", f"8. applies under load through the front door ({3 if ns.quick else 10} "
         "per strategy, 4 clients)",
         lambda: front_applies.run(applies=3 if ns.quick else 10, seconds=300.0 if ns.quick
                                   else 900.0, quiet_s=2.0 if ns.quick else 3.0),
         front_applies.rows),
        ("balance", "9. a fleet as one endpoint: a stop-first rollout through HAProxy, 4 clients",
         lambda: balance.run(), balance.rows),
        ("models", f"10. many models: corral serve vs llama.cpp's router, room for one "
         f"({20 if ns.quick else 60} s each)",
         lambda: models.run(seconds=20.0 if ns.quick else 60.0), models.rows),
    ]
    failed = []
    for key, _, fn, _ in sections:
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as exc:  # noqa: BLE001 - record it, run the other sections
            failed.append(key)
            results[key] = {"error": repr(exc), "traceback": traceback.format_exc()}
            log(f"{key} FAILED: {exc!r}")
        results.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t, 1)
    # the flood's RSS was sampled by the coalescing run; show it with the footprint
    if "error" not in results.get("footprint", {"error": 1}) and "error" not in results.get(
            "coalesce", {"error": 1}):
        results["footprint"]["corral_flood_rss"] = {
            "peak_mib": results["coalesce"]["supervisor_rss_mib_during_flood"]["peak"],
            "samples": results["coalesce"]["supervisor_rss_mib_during_flood"]["samples"],
            "from": "the coalescing flood"}
    info["loadavg_end"] = loadavg()
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(ns.out, results)

    print(f"Corral benchmarks, {info['date']}: {info['cores']} cores, {info['cpu_model']}, "
          f"Python {info['python']}, llama-server {info['llama_server_version']}")
    print(f"load average at start {info['loadavg_start']}, at end {info['loadavg_end']} "
          f"(other work on this machine makes the figures noisy); llama-server args: "
          f"--model gemma-3-270m-q4_k_m.gguf {' '.join(BASE_ARGS)}")
    for key, title, _, rows in sections:
        if key in failed:
            print_rows(title, [("FAILED", results[key]["error"])])
        else:
            print_rows(title, rows(results[key]))
    print(f"\n{coalesce.__doc__.split('Optimum: ', 1)[1].split(chr(10) + chr(10))[0]}"
          .replace("\n", " ").replace("  ", " ").strip() if "coalesce" not in failed else "")
    print(f"\nwritten: {ns.out} (total {results['total_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
