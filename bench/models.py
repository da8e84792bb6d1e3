"""Many models behind one front door: ``corral serve`` against llama.cpp's router mode.

Issue 23's workload (``tests.serve_workload.ISSUE_23``): two models, ``alpha`` and ``beta``
(hardlinks of the real gemma-3 270M GGUF in one directory), 2 clients on ``alpha`` (one
streaming) back to back, 1 client on ``beta`` with 0.5 s between requests, chat completions
of ``max_tokens`` 12, for ``--seconds`` each, against

- the router: the same llama-server in router mode, ``--models-dir DIR --models-max 1``;
- ``corral serve --models-dir DIR --max-models 1`` (``--max-wait``, default 10 s),

interleaved (router first in even rounds, Corral first in odd ones), both with the same
llama-server arguments (:data:`LLAMA_ARGS`). Figures per contender: failed requests, per
model the requests served, latency p50/p99/max and the longest stretch without an answer,
loads (Corral: ``loads`` of ``GET /v1/status``; the router: its log's "spawning server
instance" lines), and the single-flight check: a thread scans /proc every 50 ms for the
contender's llama-server children that load a model, and at most one may be alive at once.

Goals, for Corral: 0 failed; no model's longest wait above ``--max-wait`` + drain + load
(drain and the request's own service: the busy model's p90 each; load: the longest load
Corral reports); the busy model's p50 within 10 % of the router's; at most one swap per
``--max-wait`` (swaps = evictions, over the run's length); never two servers at once.

Every process dies with the bench (PR_SET_PDEATHSIG: the router through
``death_signal_prefix``, its children by design, Corral through ``tests.serve_helpers``).
Run alone, it sets ``models`` in bench/results/latest.json and writes
bench/results/models.json.

    .venv/bin/python -m bench.models [--seconds 60] [--rounds 1] [--max-wait 10]
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.report import RESULTS, cli, loadavg, log, merge_into_latest, write_json
from bench.supervisors import temp_dir
from corral.child.process import death_signal_prefix
from scripts.llama_paths import llama_server, model
from tests.harness import end_process, free_port, wait_for
from tests.serve_helpers import ServeProcess
from tests.serve_workload import ResidentWatch, Workload, per_model
from tests.serve_workload import percentile as pct

MODELS = ("alpha", "beta")
BUSY = "alpha"
LLAMA_ARGS = ["-c", "2048", "-np", "2"]
_SPAWN = re.compile(r"spawning server instance with name=(\S+)")


# ---- the contenders ----------------------------------------------------------------------

class Router:
    """llama-server in router mode over ``models_dir``, room for one model."""

    name = "router"

    def __init__(self, tmp: Path, models_dir: Path) -> None:
        self.binary = llama_server()
        self.port = free_port()
        self.log_path = tmp / "router.log"
        self.argv = [str(self.binary), "--models-dir", str(models_dir), "--models-max", "1",
                     "--host", "127.0.0.1", "--port", str(self.port), *LLAMA_ARGS]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @contextlib.contextmanager
    def running(self) -> Iterator[Router]:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([*death_signal_prefix(), *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            wait_for(self._up, 60, "the router answering /health")
            yield self
        finally:
            end_process(self.proc, 30)

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the router exited with {self.proc.returncode}")
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200

    def figures(self) -> dict[str, Any]:
        spawned = _SPAWN.findall(self.log_path.read_text(errors="replace"))
        loads = {m: spawned.count(m) for m in MODELS}
        return {"loads": loads, "swaps": max(0, sum(loads.values()) - 1)}


class Corral:
    """``corral serve --models-dir DIR --max-models 1``."""

    name = "corral"

    def __init__(self, tmp: Path, models_dir: Path, max_wait: float) -> None:
        self.binary = llama_server()
        self.serve = ServeProcess(tmp, self.binary, models_dir=models_dir,
                                  extra=["--max-models", "1", "--max-wait", f"{max_wait:g}",
                                         "--quiet-llama"], llama_args=LLAMA_ARGS)
        self.port = self.serve.port

    @property
    def pid(self) -> int:
        assert self.serve.proc is not None
        return self.serve.proc.pid

    @contextlib.contextmanager
    def running(self) -> Iterator[Corral]:
        self.serve.start()
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                self.serve.stop(60)
            self.serve.close()

    def figures(self) -> dict[str, Any]:
        status = self.serve.status()
        rows = {m["id"]: m for m in status["models"]}
        evictions = status["evictions"]
        return {"loads": {m: rows[m]["loads"] for m in MODELS},
                "load_seconds": {m: rows[m]["load_seconds"] for m in MODELS},
                "memory_mib": {m: rows[m]["memory_mib"] for m in MODELS},
                "evictions": evictions, "swaps": sum(e["count"] for e in evictions)}


# ---- one run -----------------------------------------------------------------------------

def _one(contender: Router | Corral, seconds: float) -> dict[str, Any]:
    log(f"models: {contender.name}, {seconds:g} s")
    with contender.running(), ResidentWatch(contender.pid, contender.binary) as watch:
        workload = Workload(f"http://127.0.0.1:{contender.port}", timeout=seconds + 180)
        outcomes = workload.run_for(seconds)
        figures = contender.figures()
        leftovers = watch.resident()
    for pid in leftovers:  # the contender is stopped: anything left would be a leak
        if not wait_gone_quietly(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    served = per_model(outcomes, workload.started, workload.stopped)
    return {"seconds": seconds, "wall_s": round(workload.stopped - workload.started, 1),
            "failed": sum(not o.ok for o in outcomes), "per_model": served,
            "busy_latencies_ms": sorted(round(o.seconds * 1000, 1) for o in outcomes
                                        if o.ok and o.model == BUSY),
            "single_flight": watch.summary(), **figures}


def wait_gone_quietly(pid: int, timeout: float = 10) -> bool:
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not os.path.exists(f"/proc/{pid}/exe"), timeout, f"pid {pid} gone")
        return True
    return False


def run(seconds: float = 60.0, rounds: int = 1, max_wait: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = {"loadavg_before": loadavg(), "seconds": seconds,
                              "rounds": rounds, "max_wait_s": max_wait,
                              "llama_args": LLAMA_ARGS, "router": [], "corral": []}
    with temp_dir("models") as tmp:
        models_dir = tmp / "models"
        models_dir.mkdir()
        for name in MODELS:
            os.link(model(), models_dir / f"{name}.gguf")
        for r in range(rounds):
            pair: list[Router | Corral] = [Router(tmp, models_dir),
                                           Corral(tmp, models_dir, max_wait)]
            for contender in pair if r % 2 == 0 else pair[::-1]:
                result[contender.name].append(_one(contender, seconds))
    result["loadavg_after"] = loadavg()
    result["goals"] = goals(result)
    for runs in (result["router"], result["corral"]):
        for one in runs:
            one.pop("busy_latencies_ms")  # the goals have them; the JSON keeps the figures
    write_json(RESULTS / "models.json", result)
    return result


# ---- the goals ---------------------------------------------------------------------------

def _merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of one contender as one: the worst of each figure, summed counts."""
    busy = sorted(x for r in runs for x in r["busy_latencies_ms"])
    return {"failed": sum(r["failed"] for r in runs),
            "max_ms": {m: max(r["per_model"].get(m, {}).get("max_ms") or 0 for r in runs)
                       for m in MODELS},
            "busy_p50_ms": statistics.median(busy) if busy else None,
            "busy_p90_ms": pct(busy, 90),
            "swaps": sum(r["swaps"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs),
            "most_resident": max(r["single_flight"]["most_resident"] for r in runs),
            "load_s": max((s for r in runs for v in r.get("load_seconds", {}).values()
                           for s in v), default=None)}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    c, r = _merged(result["corral"]), _merged(result["router"])
    max_wait = result["max_wait_s"]
    service_s = (c["busy_p90_ms"] or 0) / 1000
    load_s = c["load_s"] or 0.0
    bound_s = max_wait + service_s + load_s + service_s
    allowed = math.ceil(c["wall_s"] / max_wait)
    p50_ratio = (c["busy_p50_ms"] / r["busy_p50_ms"]
                 if c["busy_p50_ms"] and r["busy_p50_ms"] else None)
    return {
        "zero_failed": {"ok": c["failed"] == 0, "corral": c["failed"], "router": r["failed"]},
        "longest_wait": {"ok": all(v / 1000 <= bound_s for v in c["max_ms"].values()),
                         "bound_s": round(bound_s, 2), "max_wait_s": max_wait,
                         "drain_s": round(service_s, 2), "load_s": round(load_s, 2),
                         "service_s": round(service_s, 2),
                         "corral_s": {m: v / 1000 for m, v in c["max_ms"].items()},
                         "router_s": {m: v / 1000 for m, v in r["max_ms"].items()}},
        "busy_p50": {"ok": p50_ratio is not None and p50_ratio <= 1.10,
                     "corral_ms": c["busy_p50_ms"], "router_ms": r["busy_p50_ms"],
                     "ratio": None if p50_ratio is None else round(p50_ratio, 3)},
        "swaps": {"ok": c["swaps"] <= allowed, "corral": c["swaps"], "allowed": allowed,
                  "router": r["swaps"]},
        "single_flight": {"ok": c["most_resident"] <= 1, "corral": c["most_resident"],
                          "router": r["most_resident"]},
    }


# ---- the table ---------------------------------------------------------------------------

def _lat(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    f = [("-" if m[k] is None else f"{m[k]:.0f}") for k in ("p50_ms", "p99_ms", "max_ms")]
    return f"{m['served']} served, {m['failed']} failed, p50/p99/max {'/'.join(f)} ms, " \
        f"longest gap {m['longest_gap_s']:.1f} s"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [
        ("workload", f"{res['seconds']:g} s x {res['rounds']} round(s) each, interleaved; "
         f"2 clients on alpha (1 streaming), 1 on beta (0.5 s pause); llama-server "
         f"{' '.join(res['llama_args'])}; load average {res['loadavg_before']} -> "
         f"{res['loadavg_after']}")]
    for name, label in (("router", "router (--models-max 1)"),
                        ("corral", f"corral serve (--max-models 1, --max-wait "
                                   f"{res['max_wait_s']:g})")):
        for i, run_ in enumerate(res[name]):
            tag = f"{label}" + (f" round {i + 1}" if res["rounds"] > 1 else "")
            out.append((tag, f"{run_['failed']} failed; loads "
                        + ", ".join(f"{m} {n}" for m, n in run_["loads"].items())
                        + f"; swaps {run_['swaps']}; most servers at once "
                        f"{run_['single_flight']['most_resident']} "
                        f"({run_['single_flight']['samples']} /proc samples)"))
            for m in MODELS:
                out.append((f"  {m}", _lat(run_["per_model"].get(m))))
    g = res["goals"]
    lw = g["longest_wait"]
    out += [
        ("goal: 0 failed", f"{_verdict(g['zero_failed']['ok'])} (corral "
         f"{g['zero_failed']['corral']}, router {g['zero_failed']['router']})"),
        ("goal: longest wait <= max-wait + drain + load",
         f"{_verdict(lw['ok'])}: bound {lw['bound_s']} s = {lw['max_wait_s']:g} + drain "
         f"{lw['drain_s']} + load {lw['load_s']} + own service {lw['service_s']}; corral "
         + ", ".join(f"{m} {v:.1f} s" for m, v in lw["corral_s"].items()) + "; router "
         + ", ".join(f"{m} {v:.1f} s" for m, v in lw["router_s"].items())),
        ("goal: busy p50 within 10 % of the router's",
         f"{_verdict(g['busy_p50']['ok'])}: corral {g['busy_p50']['corral_ms']} ms, router "
         f"{g['busy_p50']['router_ms']} ms (x{g['busy_p50']['ratio']})"),
        ("goal: <= 1 swap per max-wait",
         f"{_verdict(g['swaps']['ok'])}: corral {g['swaps']['corral']} swaps, allowed "
         f"{g['swaps']['allowed']} (router {g['swaps']['router']})"),
        ("goal: never two servers at once",
         f"{_verdict(g['single_flight']['ok'])}: corral at most "
         f"{g['single_flight']['corral']}, router at most {g['single_flight']['router']}"),
    ]
    return out


def run_and_merge(**kwargs: Any) -> dict[str, Any]:
    """``run``, then ``models`` in bench/results/latest.json (the key run_all uses)."""
    return merge_into_latest("models", run(**kwargs))


def main() -> int:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    return cli(__doc__, run_and_merge, rows, "Many models: corral serve vs the router",
               seconds=60.0, rounds=1, max_wait=10.0)


if __name__ == "__main__":
    raise SystemExit(main())
