"""A real, private etcd for tests: its own free ports on 127.0.0.1, its own data directory.

``etcd_server`` starts one per test (it is ready in ~0.1 s with the fast raft timings used
here) and kills it afterwards, also when the test paused it. A system etcd on 2379 is never
touched. Without the ``etcd`` binary, tests using the fixture are skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import procfs
from tests.harness import free_port

READY_DEADLINE = 15.0


class EtcdServer:
    """One etcd process; ``stop``/``start`` keep the ports and the data directory."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = data_dir.parent / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.pids: list[int] = []  # every etcd process started, for the leftover check

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def start(self) -> None:
        assert self.proc is None, "etcd is already running"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            self.binary,
            "--name=corral-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=corral-test={peer}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.pids.append(self.proc.pid)
        self.paused = False
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                answer = httpx.get(f"{self.url}/health", timeout=0.5, trust_env=False)
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    return
                last = answer.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.02)
        raise RuntimeError(f"etcd not ready within {READY_DEADLINE} s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 5 s); always reaped."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: etcd freezes with its sockets open. Returns once every thread stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        self._wait_stopped(True)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False
        self._wait_stopped(False)

    def _wait_stopped(self, stopped: bool, deadline: float = 5.0) -> None:
        """A signal is delivered asynchronously: wait until /proc shows its effect."""
        assert self.proc is not None
        pid = self.proc.pid
        if not procfs.threads(pid):
            return  # no procfs: best effort
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            states = [procfs.state(pid, tid) for tid in procfs.threads(pid)]
            if all((state == "T") == stopped for state in states if state):
                return
            time.sleep(0.002)
        raise RuntimeError(f"etcd did not {'stop' if stopped else 'continue'} in {deadline} s")

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """Run ``etcdctl`` (API v3) against this server; returns its stdout."""
        env = {**os.environ, "ETCDCTL_API": "3"}
        done = subprocess.run(
            [_etcdctl(), f"--endpoints={self.url}", "--command-timeout=5s", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _etcdctl() -> str:
    found = shutil.which("etcdctl")
    if found is None:
        pytest.skip("etcdctl not found (apt-get install etcd-client)")
    return found


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd not found (apt-get install etcd-server etcd-client)")
    server = EtcdServer(binary, tmp_path / "etcd-data")
    try:
        server.start()
        yield server
    finally:
        server.kill()
        leftovers = [pid for pid in server.pids if procfs.is_alive(pid)]
        assert not leftovers, f"etcd processes left behind: {leftovers}"
