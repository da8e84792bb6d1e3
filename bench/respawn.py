"""Respawn latency after SIGKILL, Corral next to supervisord, with the real llama-server.

For each run: SIGKILL the llama-server, then a tight loop over /proc finds the supervisor's
new child. Three times are taken from the kill: the new pid appears (fork), it runs
llama-server (exec) and its /health answers 200 (ready). The next kill waits until the
replacement is ready (and, for Corral, RUNNING: killing it during Corral's min-healthy
window would count as a failed start and bring in the backoff).

    .venv/bin/python -m bench.respawn [--runs 20]
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from bench.procs import ChildWatch, wait_health
from bench.report import cli, loadavg, log, log_events, ms, stats
from bench.supervisors import Corral, Supervisord, temp_dir


def _kill_and_watch(watch: ChildWatch, pid: int, port: int) -> dict[str, float]:
    watch.snapshot()
    wall = time.time()
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    new, t_dead, t_seen, t_exec = watch.wait_new(pid, 60)
    t_ready = wait_health(port, 120)
    return {"pid": new, "wall": wall, "dead": t_dead - t0, "fork": t_seen - t0,
            "exec": t_exec - t0, "ready": t_ready - t0, "dead_to_exec": t_exec - t_dead,
            "dead_to_fork": t_seen - t_dead}


def _corral_log_marks(text: str, kills: list[dict[str, float]]) -> dict[str, Any]:
    """From Corral's log (ms timestamps): kill -> 'exited' logged, kill -> 'started' logged."""
    events = log_events(text, {"exited": "llama-server exited with code",
                               "started": "started llama-server (pid"})
    exited = [t for t, name in events if name == "exited"]
    started = [t for t, name in events if name == "started"]
    det, spawn = [], []
    for k in kills:
        e = next((t for t in exited if t >= k["wall"] - 0.002), None)
        s = next((t for t in started if t >= k["wall"] - 0.002), None)
        if e is not None:
            det.append(e - k["wall"])
        if s is not None:
            spawn.append(s - k["wall"])
    return {"kill_to_exit_logged_ms": stats(det), "kill_to_started_logged_ms": stats(spawn),
            "note": "log timestamps have 1 ms resolution"}


def _summary(kills: list[dict[str, float]]) -> dict[str, Any]:
    return {f"{k}_ms": stats([x[k] for x in kills]) for k in (
        "exec", "fork", "dead", "dead_to_fork", "dead_to_exec", "ready")}


def run_corral(runs: int) -> dict[str, Any]:
    with temp_dir("respawn-corral") as tmp, Corral(tmp) as c:
        watch = ChildWatch(c.pid, c.binary)
        resolution = watch.resolution()
        pid = int(c.status()["pid"])
        kills = []
        for i in range(runs):
            k = _kill_and_watch(watch, pid, c.port)
            s = c.wait_running_pid(pid)
            if s["pid"] != k["pid"]:
                raise AssertionError(f"run {i}: status pid {s['pid']} != new child {k['pid']}")
            pid = int(k["pid"])
            kills.append(k)
        marks = _corral_log_marks(c.sup.log(), kills)
        restarts = c.status()["restarts"]
    return {"runs": runs, **_summary(kills),
            "restarts_reported": restarts, "log_marks": marks,
            "poll_loop_period_ms": resolution}


def run_supervisord(runs: int) -> dict[str, Any]:
    with temp_dir("respawn-supervisord") as tmp, Supervisord(tmp) as s:
        watch = ChildWatch(s.pid, s.binary)
        resolution = watch.resolution()
        pid = watch.current()
        if pid is None:
            raise AssertionError("supervisord runs no llama-server")
        kills = []
        for _ in range(runs):
            k = _kill_and_watch(watch, pid, s.port)
            pid = int(k["pid"])
            kills.append(k)
    return {"runs": runs, **_summary(kills),
            "poll_loop_period_ms": resolution}


def run(runs: int = 20) -> dict[str, Any]:
    la = loadavg()
    log(f"respawn: Corral, {runs} SIGKILLs")
    corral = run_corral(runs)
    log(f"respawn: supervisord, {runs} SIGKILLs")
    sd = run_supervisord(runs)

    def ratio(key: str) -> float | None:
        c, s = corral[key].get("median"), sd[key].get("median")
        return round(s / c, 1) if c and s else None

    return {"corral": corral, "supervisord": sd,
            "ratio_supervisord_over_corral": {"new_pid_exec": ratio("exec_ms"),
                                              "new_pid_fork": ratio("fork_ms"),
                                              "dead_to_exec": ratio("dead_to_exec_ms"),
                                              "ready": ratio("ready_ms")},
            "loadavg_before": la, "loadavg_after": loadavg(),
            "method": "SIGKILL llama-server; a tight /proc scan notes when the old pid is "
                      "a zombie or gone (dead: the kernel's teardown of llama-server, paid by "
                      "any supervisor), when a new child of the supervisor appears (fork) "
                      "and when it runs the llama-server binary (exec); /health polled "
                      "every 1 ms on a fresh connection (ready). dead_to_exec is the "
                      "supervisor's own reaction time."}


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    c, s, q = r["corral"], r["supervisord"], r["ratio_supervisord_over_corral"]

    def line(x: dict[str, Any]) -> str:
        return f"{ms(x['min'])} / {ms(x['median'])} / {ms(x['max'])}  (min/median/max)"

    out = [
        (f"Corral  SIGKILL -> new pid (exec), n={c['runs']}", line(c["exec_ms"])),
        (f"superv. SIGKILL -> new pid (exec), n={s['runs']}", line(s["exec_ms"])),
        ("ratio supervisord/Corral (exec median)", f"{q['new_pid_exec']}x"),
        ("Corral  SIGKILL -> new pid (fork)", line(c["fork_ms"])),
        ("superv. SIGKILL -> new pid (fork)", line(s["fork_ms"])),
        ("SIGKILL -> old pid dead (kernel teardown)",
         f"Corral run {ms(c['dead_ms']['median'])}, supervisord run "
         f"{ms(s['dead_ms']['median'])} (median)"),
        ("Corral  old dead -> new pid (exec)", line(c["dead_to_exec_ms"])),
        ("superv. old dead -> new pid (exec)", line(s["dead_to_exec_ms"])),
        ("ratio supervisord/Corral (dead -> exec)", f"{q['dead_to_exec']}x"),
        ("Corral  SIGKILL -> /health 200", line(c["ready_ms"])),
        ("superv. SIGKILL -> /health 200", line(s["ready_ms"])),
        ("ratio supervisord/Corral (ready median)", f"{q['ready']}x"),
        ("/proc poll loop period (Corral run)",
         f"median {c['poll_loop_period_ms']['median']} ms, "
         f"max {c['poll_loop_period_ms']['max']} ms"),
    ]
    marks = c["log_marks"]
    if marks["kill_to_exit_logged_ms"].get("n"):
        out.append(("Corral log: kill -> 'exited' / 'started' (median)",
                    f"{ms(marks['kill_to_exit_logged_ms']['median'])} / "
                    f"{ms(marks['kill_to_started_logged_ms'].get('median'))}"))
    return out


def main() -> int:
    return cli(__doc__, run, rows, "respawn after SIGKILL", runs=20)


if __name__ == "__main__":
    raise SystemExit(main())
