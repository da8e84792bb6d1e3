"""Where Corral's respawn time goes: its own building blocks, timed in-process.

Runs the real llama-server through ``corral.child.process.spawn`` in this process's event
loop and times separately each step the controller takes after a crash (see the decision
table in ``corral.core``: the exit is seen, the old group reaped, the config checked, the
new server spawned and recorded):

  exit seen      SIGKILL (from another thread, the loop idle) -> ``child.exited`` done
                 (a pidfd on the event loop, then waitpid)
  child.kill     reap the group + wait for the output reader to finish
  preflight      ``Preflight.check`` (the cached flag catalog, files, binds the port once)
  spawn          ``spawn()``: posix_spawn (vfork) of ``setpriv --pdeathsig KILL``
  pidfile        ``PidFile.add`` (psutil create_time + write + rename)

The supervisor's own modules (uvicorn, FastAPI, ...) are imported first so that a fork
copies a process of the same size. For comparison: the same argv through a plain
``asyncio.create_subprocess_exec`` without ``preexec_fn`` (CPython can then use vfork),
through a bare ``os.posix_spawn``, and through ``setpriv --pdeathsig KILL`` with asyncio;
and the kernel's own floor (a blocking ``waitpid`` in the parent).

    .venv/bin/python -m bench.profile_respawn [--runs 10]
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.procs import wait_health
from bench.report import cli, log, stats
from bench.supervisors import BASE_ARGS, temp_dir
from corral.child.process import death_signal_prefix
from scripts.llama_paths import llama_server, model
from tests.harness import free_port
from tests.procfs import exe


async def _profile(runs: int, tmp: Path) -> dict[str, Any]:
    import httpx

    import corral.app  # noqa: F401 - the supervisor's own modules: a fork copies as much
    from corral.child import preflight
    from corral.child.pidfile import PidFile
    from corral.child.process import spawn
    from corral.child.ready import wait_ready
    from corral.core.args import LlamaConfig, parse_argv

    binary = str(llama_server())
    port = free_port()
    checks = preflight.Preflight()
    catalog = await checks.catalog(binary)
    tokens = ["--model", str(model()), *BASE_ARGS, "--port", str(port)]
    config = LlamaConfig(binary, tuple(parse_argv(tokens, catalog)))
    url = f"http://127.0.0.1:{port}/health"
    pidfile = PidFile(tmp / "llama.pid")
    steps: dict[str, list[float]] = {k: [] for k in (
        "exit_seen", "child_kill", "preflight", "spawn", "pidfile", "total")}
    async with httpx.AsyncClient() as http:
        child = await spawn(config, 1, echo_output=False)
        for _ in range(runs):
            await wait_ready(child, url, http, 120, 0.0)
            await asyncio.sleep(0.05)
            t0 = _kill_soon(child.pid)
            await child.exited
            t1 = time.perf_counter()
            await child.kill()
            t2 = time.perf_counter()
            await checks.check(config, None)
            t3 = time.perf_counter()
            pidfile.clear()
            child = await spawn(config, 1, echo_output=False)
            t4 = time.perf_counter()
            pidfile.add(child.pid)
            t5 = time.perf_counter()
            for k, v in (("exit_seen", t1 - t0[0]), ("child_kill", t2 - t1),
                         ("preflight", t3 - t2), ("spawn", t4 - t3), ("pidfile", t5 - t4),
                         ("total", t5 - t0[0])):
                steps[k].append(v)
        await child.stop(10)
        plain, pspawn, setpriv = await _spawn_variants(config.argv(), runs)
    floor = _exit_seen_floor(config.argv(), port, runs)
    return {"runs": runs, **{f"{k}_ms": stats(v, digits=3) for k, v in steps.items()},
            "spawn_without_preexec_fn_ms": stats(plain, digits=3),
            "posix_spawn_ms": stats(pspawn, digits=3),
            "spawn_setpriv_pdeathsig_ms": stats(setpriv, digits=3),
            "exit_seen_blocking_waitpid_floor_ms": stats(floor, digits=3),
            "supervisor_rss_mib_here": round(_rss() / 2**20, 1)}


async def _spawn_variants(argv: list[str], runs: int
                          ) -> tuple[list[float], list[float], list[float]]:
    """Start times of the same argv without preexec_fn, by posix_spawn, and via setpriv."""
    loop = asyncio.get_running_loop()
    real = os.path.realpath(argv[0])  # noqa: ASYNC240
    plain, pspawn, setpriv = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        plain.append(time.perf_counter() - t)
        proc.kill()
        await proc.wait()
        t = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ, setsid=True)  # noqa: ASYNC221
        pspawn.append(time.perf_counter() - t)
        os.kill(pid, signal.SIGKILL)
        await loop.run_in_executor(None, os.waitpid, pid, 0)
        # PR_SET_PDEATHSIG without preexec_fn: util-linux setpriv sets it and execs
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--pdeathsig", "KILL", *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        while exe(proc.pid) != real:  # until the second exec (llama-server) happened
            pass
        setpriv.append(time.perf_counter() - t)
        proc.kill()
        await proc.wait()
    return plain, pspawn, setpriv


def _kill_soon(pid: int) -> list[float]:
    """SIGKILL ``pid`` from another thread 50 ms from now (the loop idle meanwhile);
    the returned box gets the moment of the kill."""
    box = [0.0]

    def killer() -> None:
        time.sleep(0.05)
        box[0] = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    return box


def _exit_seen_floor(argv: list[str], port: int, runs: int) -> list[float]:
    """SIGKILL -> a blocking waitpid returns: the kernel's own floor (address-space teardown)."""
    out = []
    for _ in range(runs):
        proc = subprocess.Popen([*death_signal_prefix(), *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        wait_health(port, 120, 0.01)
        time.sleep(0.05)
        t = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        os.waitpid(proc.pid, 0)
        out.append(time.perf_counter() - t)
        proc.returncode = -9
    return out


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run(runs: int = 10) -> dict[str, Any]:
    log(f"profile: Corral's crash path in-process, {runs} runs")
    with temp_dir("profile") as tmp:
        return asyncio.run(_profile(runs, tmp))


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k in ("exit_seen", "child_kill", "preflight", "spawn", "pidfile", "total"):
        s = r[f"{k}_ms"]
        out.append((k, f"median {s['median']} ms (min {s['min']}, max {s['max']})"))
    for k in ("spawn_without_preexec_fn", "posix_spawn", "spawn_setpriv_pdeathsig",
              "exit_seen_blocking_waitpid_floor"):
        s = r[f"{k}_ms"]
        out.append((k + " (comparison)", f"median {s['median']} ms (min {s['min']})"))
    return out


def main() -> int:
    return cli(__doc__, run, rows, "Corral crash path, step by step (in-process)", runs=10)


if __name__ == "__main__":
    raise SystemExit(main())
