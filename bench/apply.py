"""Apply overhead: POST /v1/params -> 200, minus llama-server's own stop+start time.

llama-server's own time is measured by the bench directly: SIGTERM + reap a llama-server it
started, start one with the new args, poll /health (1 ms) until 200. Two changes, each 5
times, alternating: a flag (-np 1 <-> 2) and the model (two symlinks to the same GGUF).

Corral runs twice: with its defaults (a 200 ms debounce window before a batch closes, and
0.3 s of min-healthy after /health 200 before a start counts) and with both set to 0, which
shows what is left once the configured waits are taken out. Rounds are interleaved (bare,
Corral default, Corral no-waits, for each change) so that load drift hits all three alike.

    .venv/bin/python -m bench.apply [--runs 5]
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Any

from bench.procs import ChildWatch, wait_health
from bench.report import cli, loadavg, log, log_events, ms, stats
from bench.supervisors import BareServer, Corral, temp_dir
from scripts.llama_paths import model
from tests.harness import free_port

CTX = ["-c", "4096"]


def _bare_switch(server: BareServer, args: list[str]) -> tuple[BareServer, float, float]:
    """(new server, SIGTERM -> reaped, start -> /health 200)."""
    t0 = time.perf_counter()
    server.stop()
    t1 = time.perf_counter()
    new = BareServer(args, server.port)
    t2 = wait_health(new.port, 120)
    return new, t1 - t0, t2 - t1


APPLY_MARKS = {"applying": "applying a batch", "stopped": ") stopped (code",
               "started": "started llama-server (pid", "ready": ") is ready after"}


PHASES = ("post_to_applying", "applying_to_stopped", "stopped_to_started",
          "started_to_ready_logged", "ready_logged_to_answer")


def _phases(c: Corral, posts: list[tuple[float, float]]) -> list[dict[str, float] | None]:
    """Split each POST by Corral's own log lines (1 ms stamps): where the time goes."""
    events = log_events(c.sup.log(), APPLY_MARKS)
    out: list[dict[str, float] | None] = []
    for sent, answered in posts:
        ev: dict[str, float] = {}
        for t, name in events:
            if sent - 0.002 <= t <= answered + 0.002 and name not in ev:
                ev[name] = t
        if len(ev) < 4:
            out.append(None)
            continue
        out.append({"post_to_applying": ev["applying"] - sent,
                    "applying_to_stopped": ev["stopped"] - ev["applying"],
                    "stopped_to_started": ev["started"] - ev["stopped"],
                    "started_to_ready_logged": ev["ready"] - ev["started"],
                    "ready_logged_to_answer": answered - ev["ready"]})
    return out


def _post(c: Corral, args: dict[str, Any], walls: list[tuple[float, float]]
          ) -> tuple[float, float]:
    """(POST -> 200, this run's llama-server load: exec of the new pid -> /health 200)."""
    watch = ChildWatch(c.pid, c.binary)
    old = int(c.status()["pid"])
    seen: dict[str, float] = {}

    def watcher() -> None:
        _, _, _, seen["exec"] = watch.wait_new(old, 120)
        seen["ready"] = wait_health(c.port, 120)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    wall = time.time()
    t0 = time.perf_counter()
    r = c.sup.post(args)
    took = time.perf_counter() - t0
    walls.append((wall, time.time()))
    thread.join(120)
    body = r.json()
    if r.status_code != 200 or not body.get("restarted") or "ready" not in seen:
        raise AssertionError(f"POST {args} -> {r.status_code} {body}")
    return took, seen["ready"] - seen["exec"]


def run(runs: int = 5) -> dict[str, Any]:
    la = loadavg()
    with temp_dir("apply") as tmp, contextlib.ExitStack() as stack:
        a, b = tmp / "model-a.gguf", tmp / "model-b.gguf"
        a.symlink_to(model())
        b.symlink_to(model())
        log("apply: starting Corral (defaults), Corral (no waits) and a bare llama-server")
        (tmp / "d").mkdir()
        (tmp / "z").mkdir()
        default = stack.enter_context(Corral(tmp / "d", [*CTX, "-np", "1"], model_path=a))
        zero = stack.enter_context(Corral(tmp / "z", [*CTX, "-np", "1"], model_path=a,
                                          extra_cli=["--debounce-ms", "0",
                                                     "--min-healthy", "0"]))
        bare = BareServer(["--model", str(a), *CTX, "-np", "1"], free_port())
        stack.callback(lambda: bare.stop())
        wait_health(bare.port, 120)
        times: dict[str, list[float]] = {f"{who}_{what}": [] for who in ("bare", "default", "zero")
                                         for what in ("flag", "model")}
        parts: dict[str, list[float]] = {k: [] for k in (
            "bare_stop", "bare_start", *(f"{who}_{what}_load" for who in ("default", "zero")
                                         for what in ("flag", "model")))}
        walls: dict[str, list[tuple[float, float]]] = {"default": [], "zero": []}
        order: dict[str, list[str]] = {"default": [], "zero": []}
        np_, m = "1", a
        for i in range(runs):
            log(f"apply: round {i + 1}/{runs}")
            for what in ("flag", "model"):
                if what == "flag":
                    np_ = "2" if np_ == "1" else "1"
                    change: dict[str, Any] = {"-np": np_}
                else:
                    m = b if m == a else a
                    change = {"-m": str(m)}
                bare, stop, start = _bare_switch(bare, ["--model", str(m), *CTX, "-np", np_])
                times[f"bare_{what}"].append(stop + start)
                parts["bare_stop"].append(stop)
                parts["bare_start"].append(start)
                for who, c in (("default", default), ("zero", zero)):
                    order[who].append(what)
                    took, load = _post(c, change, walls[who])
                    times[f"{who}_{what}"].append(took)
                    parts[f"{who}_{what}_load"].append(load)
        logged = {who: _phases(c, walls[who]) for who, c in (("default", default),
                                                              ("zero", zero))}
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    phases = {}
    for who, name in (("default", "corral_defaults"), ("zero", "corral_no_waits")):
        ok = [p for p in logged[who] if p is not None]
        phases[name] = {k: stats([p[k] for p in ok]) for k in PHASES}
    out: dict[str, Any] = {"runs": runs, "times_ms": {k: stats(v) for k, v in times.items()},
                           "bare_stop_ms": stats(parts["bare_stop"]),
                           "bare_start_ms": stats(parts["bare_start"]),
                           "phases_from_corral_log_ms": phases,
                           "loadavg_before": la, "loadavg_after": loadavg()}
    for what in ("flag", "model"):
        out[f"overhead_{what}_ms"] = {
            "corral_defaults": round(med[f"default_{what}"] - med[f"bare_{what}"], 1),
            "corral_no_waits": round(med[f"zero_{what}"] - med[f"bare_{what}"], 1),
        }
        per_run: dict[str, Any] = {}
        for who, name in (("default", "corral_defaults"), ("zero", "corral_no_waits")):
            idx = [i for i, w in enumerate(order[who]) if w == what]
            vals = []
            for n, i in enumerate(idx):
                ph = logged[who][i]
                if ph is not None:
                    vals.append(times[f"{who}_{what}"][n] - ph["applying_to_stopped"]
                                - parts[f"{who}_{what}_load"][n])
            per_run[name] = stats(vals)
        out[f"overhead_{what}_per_run_ms"] = per_run
    out["configured_waits_ms"] = {"debounce": 200, "min_healthy": 300,
                                  "note": "included in 'corral_defaults' by design"}
    out["method"] = (
        "overhead = median(POST /v1/params wait=true -> 200 restarted) - median(bench's own "
        "SIGTERM+reap+start until /health 200, same args); -np 1<->2 and -m between two "
        "symlinks of the GGUF; rounds interleaved. overhead_*_per_run takes each run's own "
        "llama-server stop (Corral's log: 'applying' -> 'stopped') and load (new pid exec -> "
        "/health 200, watched from /proc during the POST) out of that run's POST time, so "
        "load noise between runs cancels out")
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    t = r["times_ms"]
    out = []
    out.append(("llama-server alone: SIGTERM -> reaped / start -> /health 200",
                f"median {ms(r['bare_stop_ms']['median'])} / "
                f"{ms(r['bare_start_ms']['median'])}"))
    for what, label in (("flag", "flag -np 1<->2"), ("model", "model a<->b")):
        out.append((f"{label}: llama-server stop+start (bare)",
                    f"median {ms(t[f'bare_{what}']['median'])}"))
        out.append((f"{label}: POST -> 200, Corral defaults",
                    f"median {ms(t[f'default_{what}']['median'])}  overhead "
                    f"{ms(r[f'overhead_{what}_ms']['corral_defaults'])} (incl. 200 debounce "
                    f"+ 300 min-healthy)"))
        out.append((f"{label}: POST -> 200, debounce 0, min-healthy 0",
                    f"median {ms(t[f'zero_{what}']['median'])}  overhead "
                    f"{ms(r[f'overhead_{what}_ms']['corral_no_waits'])}"))
        pr = r[f"overhead_{what}_per_run_ms"]
        out.append((f"{label}: overhead per run (its own stop+load removed)",
                    f"defaults median {ms(pr['corral_defaults']['median'])}, no waits "
                    f"median {ms(pr['corral_no_waits']['median'])}"))
    for who, label in (("corral_no_waits", "no waits"), ("corral_defaults", "defaults")):
        ph = r["phases_from_corral_log_ms"][who]
        if ph["post_to_applying"].get("n"):
            out.append((f"phases, {label} (median, from Corral's log)", ", ".join(
                f"{k} {ph[k]['median']:.0f}" for k in ph) + " ms"))
    return out


def main() -> int:
    return cli(__doc__, run, rows, lambda r: f"apply overhead ({r['runs']} runs each, median)",
               runs=5)


if __name__ == "__main__":
    raise SystemExit(main())
