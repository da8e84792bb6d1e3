"""A benchmark killed by SIGKILL leaves no orphans: every llama-server a bench helper starts,
directly or under a supervisor (Corral, supervisord), dies with it (PR_SET_PDEATHSIG).

Each test starts a bench helper as its own process, waits until its llama-server runs,
SIGKILLs the helper and then watches /proc until nothing carrying the test's marker is
alive, within a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, end_process, wait_for
from tests.procfs import exe, is_alive

pytestmark = [pytest.mark.slow]

GONE_WITHIN_S = 5.0


def live_with(marker: str) -> dict[int, bytes]:
    """Live (non-zombie) processes whose command line contains ``marker``: pid -> it."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and is_alive(name):
            found[int(name)] = cmd
    return found


@pytest.fixture
def helper() -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """(bench process, marker) pairs; at the end, both and anything marked are killed."""
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    yield started
    for proc, marker in started:
        end_process(proc)
        for pid in live_with(marker):  # only when the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def kill_and_expect_no_orphans(proc: subprocess.Popen[bytes], marker: str,
                               is_server: Callable[[int, bytes], bool]) -> None:
    servers = wait_for(lambda: [p for p, cmd in live_with(marker).items() if is_server(p, cmd)],
                       180, "the bench helper's llama-server running")
    assert proc.poll() is None, f"the bench helper exited with {proc.returncode}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: not live_with(marker), GONE_WITHIN_S,
             f"no process of the killed bench left (llama-server was {servers})")


def test_a_killed_soak_leaves_no_supervisor_and_no_llama_server(
        tmp_path: Path, helper: list[tuple[subprocess.Popen[bytes], str]]) -> None:
    """SIGKILL of bench.soak (fake llama-server): its supervisor and llama-server die too."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bench.soak", "--seconds", "600",
                             "--seed", "1"], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helper.append((proc, str(tmp)))
    kill_and_expect_no_orphans(proc, str(tmp), lambda pid, cmd: b"fake_llama_server" in cmd)


# Bench helpers that start the real llama-server, each in a process of its own; a marker (an
# --alias) tells their processes apart from any other test's.
DRIVERS = {
    "bare server": "BareServer(['--model', str(model()), *ARGS], free_port())",
    "corral": "Corral(TMP, ARGS).__enter__()",
    "supervisord": "Supervisord(TMP, ARGS).__enter__()",
}
DRIVER = """
import signal, sys
from pathlib import Path
from bench.supervisors import BareServer, Corral, Supervisord
from scripts.llama_paths import model
from tests.harness import free_port
TMP, ARGS = Path(sys.argv[1]), ['-c', '512', '-np', '1', '--alias', sys.argv[2]]
started = {start}
signal.pause()
"""


@pytest.mark.real
@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_a_killed_bench_leaves_no_llama_server(
        kind: str, tmp_path: Path, real_binary: Path,
        helper: list[tuple[subprocess.Popen[bytes], str]]) -> None:
    """SIGKILL of a bench process running llama-server bare, under Corral or under
    supervisord: no llama-server (and no supervisor) of it is left."""
    if kind == "supervisord" and not (Path(sys.executable).parent / "supervisord").exists():
        pytest.skip("supervisord is not installed in the venv")
    marker = f"orphan-check-{uuid.uuid4().hex[:12]}"
    code = DRIVER.format(start=DRIVERS[kind])
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), marker], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helper.append((proc, marker))
    binary = os.path.realpath(real_binary)
    kill_and_expect_no_orphans(proc, marker, lambda pid, cmd: exe(pid) == binary)
