"""What the benchmarks run: Corral and supervisord supervising the same real llama-server
(the real gemma-3 270M GGUF, 127.0.0.1 only), and a bare llama-server for reference.

Each is a context manager that waits until the server answers and, on exit, stops it and
kills whatever it left behind. Each dies with the bench, even a SIGKILLed one
(PR_SET_PDEATHSIG, set by the wrapper Corral itself puts in front of llama-server): Corral
through tests.harness, supervisord and its llama-server here, so a killed bench leaves no
orphans.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.procs import ChildWatch, wait_health
from corral.child.process import death_signal_prefix
from scripts.llama_paths import llama_server, model
from tests.harness import SupervisorProcess, free_port, pid_alive, wait_for

VENV_BIN = Path(sys.executable).parent
# llama-server's own defaults give 4 slots of 32k context; a smaller context loads the same
# model with less memory, which keeps the machine quieter for the other measurements.
BASE_ARGS = ["-c", "4096", "-np", "1"]


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"corral-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _kill_left(pids: set[int]) -> None:
    for p in pids:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


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
        _kill_left(seen)

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
        return wait_for(ok, timeout, "RUNNING with a new pid", interval=0.01)


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


def _dies_with_supervisord() -> list[str]:
    """The prefix that makes supervisord's llama-server die with supervisord (which dies
    with the bench): util-linux's setpriv, exec'd in place (~1 ms a start)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class Supervisord:
    """supervisord 4.x running the same llama-server command, from a generated conf."""

    def __init__(self, tmp: Path, llama_args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.binary = llama_server()
        self.port = free_port()
        argv = [*_dies_with_supervisord(), str(self.binary), "--model", str(model()),
                *(llama_args if llama_args is not None else BASE_ARGS), "--port", str(self.port)]
        self.conf = tmp / "supervisord.conf"
        self.conf.write_text(SUPERVISORD_CONF.format(tmp=tmp, command=" ".join(argv)))
        self.exe = VENV_BIN / "supervisord"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervisord:
        if not self.exe.exists():
            raise FileNotFoundError(f"{self.exe} missing: .venv/bin/pip install supervisor")
        out = open(self.tmp / "supervisord.out", "ab")  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen([*death_signal_prefix(), str(self.exe), "-n", "-c",
                                      str(self.conf)],
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
        _kill_left({child} if child is not None else set())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class BareServer:
    """llama-server started by the bench itself (for llama-server's own stop+start time)."""

    def __init__(self, args: list[str], port: int) -> None:
        self.port = port
        self.argv = [str(llama_server()), *args, "--port", str(port)]
        self.proc = subprocess.Popen([*death_signal_prefix(), *self.argv],
                                     stdin=subprocess.DEVNULL,
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
