"""Running ``corral supervise`` as a real process in tests, and waiting on conditions.

Every wait here has a deadline and polls a condition (``wait_for``, from
:mod:`tests.waiting`, re-exported); nothing sleeps a fixed time to "let things settle".
:class:`SupervisorProcess` remembers every llama-server pid it saw so the fixture can assert
that none is left behind. The benchmarks (``bench/``) use it too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from corral.child.process import death_signal_prefix
from tests.fake_llama_server import STARTS_ENV
from tests.procfs import is_alive as pid_alive
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_llama_server.py"
T = TypeVar("T")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def end_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM ``proc``, SIGKILL it after ``timeout``; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def wait_gone(pids: Iterable[int], timeout: float, what: str) -> None:
    """Wait until none of ``pids`` is alive (zombies count as gone); fail after ``timeout``."""
    pids = list(pids)
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout,
             f"{what} gone (alive: {[p for p in pids if pid_alive(p)]})")


def stamped_lines(log: str) -> Iterator[tuple[float, str]]:
    """(epoch seconds, line) for each line of a supervisor's log that starts with its
    ``%(asctime)s`` stamp (local time, 1 ms resolution)."""
    for line in log.splitlines():
        if m := _STAMP.match(line):
            yield dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def props(port: int, timeout: float = 10) -> dict[str, Any]:
    """The llama-server's (real or fake) ``GET /props`` on ``port``."""
    result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/props", timeout=timeout).json()
    return result


def make_fake_model(path: Path, size: int = 64) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * (size - 4))
    return path


def corrupt_gguf(tmp_path: Path, real_model: Path) -> Path:
    """A file that passes the GGUF magic check but is truncated: it fails at load."""
    path = tmp_path / "corrupt.gguf"
    with open(real_model, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(1 << 20))
    return path


class SupervisorProcess:
    def __init__(self, tmp: Path, binary: str | Path, model: str | Path | None,
                 llama_args: list[str] | None = None, *, port: int | None = None,
                 api_port: int | None = None, store_args: list[str] | None = None,
                 extra_cli: list[str] | None = None, env: dict[str, str] | None = None,
                 state_dir: Path | None = None, token: str | None = None,
                 api_host: str = "127.0.0.1", exec_prefix: Sequence[str] = (),
                 pass_fds: Sequence[int] = ()) -> None:
        # api_host/exec_prefix: tests/netns.py runs the supervisor inside a network
        # namespace (prefix ``ip netns exec <ns>``) with its API on the host's address.
        # pass_fds: descriptors the child inherits (socket activation, see
        # tests/systemd_helpers.py).
        self.tmp = tmp
        self.api_port = api_port or free_port()
        self.port = port or free_port()
        self.token = token
        self.log_path = tmp / f"supervisor-{self.api_port}.log"
        self.config_file = tmp / "config.toml"
        cmd = [*exec_prefix, sys.executable, "-m", "corral", "supervise",
               "--supervisor-addr", f"{api_host}:{self.api_port}",
               "--binary", str(binary), "--port", str(self.port),
               "--state-dir", str(state_dir or tmp / "state")]
        if model is not None:
            cmd += ["--model", str(model)]
        cmd += store_args if store_args is not None else ["--config-file", str(self.config_file)]
        cmd += extra_cli or []
        if llama_args:
            cmd += ["--", *llama_args]
        self.cmd = cmd
        self.pass_fds = tuple(pass_fds)
        self.starts_path = tmp / f"llama-starts-{self.api_port}"  # the fake's runs (STARTS_ENV)
        self.env = {**os.environ, STARTS_ENV: str(self.starts_path), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=f"http://{api_host}:{self.api_port}", timeout=60,
                                 headers=headers)

    # lifecycle
    def start(self) -> SupervisorProcess:
        """Start the supervisor. Started from the main thread, it dies with this process
        (PR_SET_PDEATHSIG, fired when the starting *thread* ends), and its llama-server
        with it: a test or bench run killed by SIGKILL leaves neither behind."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's life
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen([*(death_signal_prefix() if main else []), *self.cmd],
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.tmp, pass_fds=self.pass_fds)
        log.close()
        return self

    def wait_running(self, timeout: float = 30) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            self._check_alive()
            s = self.status()
            return s if s["state"] == "RUNNING" and s["pid"] else None
        return wait_for(running, timeout, "state RUNNING")

    def wait_state(self, state: str, timeout: float = 30) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            self._check_alive()
            s = self.status()
            return s if s["state"] == state else None
        return wait_for(reached, timeout, f"state {state}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n"
                                 + self.log()[-3000:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # API
    def status(self) -> dict[str, Any]:
        s: dict[str, Any] = self.http.get("/v1/status").json()
        if s.get("pid"):
            self.seen_pids.add(s["pid"])
        return s

    def post(self, args: dict[str, Any], wait: bool = True) -> httpx.Response:
        return self.http.post("/v1/params", params={} if wait else {"wait": "false"},
                               json={"args": args})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def llama_pid(self) -> int:
        pid = self.status()["pid"]
        assert pid, self.status()
        return int(pid)

    def started_with(self, marker: str) -> int:
        """How many fake llama-servers this supervisor ran with ``marker`` in their
        arguments (from the fake's own record of its runs, ``STARTS_ENV``)."""
        if not self.starts_path.exists():
            return 0
        return sum(marker in line for line in self.starts_path.read_text().splitlines())

    def starts(self) -> list[str]:
        """The arguments of every fake llama-server this supervisor ran, in order (``--help``
        runs included)."""
        return self.starts_path.read_text().splitlines() if self.starts_path.exists() else []

    def leftovers(self) -> list[int]:
        return [p for p in self.seen_pids if pid_alive(p)]

    def stored(self, name: str = "default") -> dict[str, Any]:
        """The config stored under ``name`` in the TOML config file."""
        table: dict[str, Any] = tomllib.loads(self.config_file.read_text())[name]
        return table


@contextlib.contextmanager
def supervisor(tmp: Path, *args: Any, **kwargs: Any) -> Iterator[SupervisorProcess]:
    """Start a supervisor; on exit kill it and assert no llama-server it ran is left."""
    sup = SupervisorProcess(tmp, *args, **kwargs).start()
    try:
        yield sup
    finally:
        sup.close()
        wait_gone(sup.seen_pids, 5, "every llama-server the supervisor ran")
