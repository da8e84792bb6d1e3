"""The soak's "at most one llama-server" check (bench.soak.servers) counts servers, not the
subshells of a wrapper script that carry the server's command line (a pyenv shim resolving
the fake's ``#!/usr/bin/env python3`` forks like that while it looks for python3)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.soak import servers
from tests.harness import end_process, wait_for
from tests.procfs import parent_pid

# bash forks two subshells (same command line as their parent) that wait on its stdin (fd 3:
# a background job's own stdin is /dev/null).
WRAPPER = ["bash", "-c", "exec 3<&0; ( read -r _ <&3 ) & ( read -r _ <&3 ) & wait", "wrapper"]


@pytest.fixture
def wrappers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.stdin is not None:
            proc.stdin.close()  # the subshells read EOF and end, then the wrapper
        end_process(proc)


def test_a_wrapper_and_its_subshells_are_one_server_and_two_wrappers_are_two(
        tmp_path: Path, wrappers: list[subprocess.Popen[bytes]]) -> None:
    """Three processes carry the marker, one server is counted; a second wrapper makes two."""
    marker = str(tmp_path / "soak-model.gguf")
    for n in (1, 2):
        wrappers.append(subprocess.Popen([*WRAPPER, "--model", marker],
                                         stdin=subprocess.PIPE))
        wait_for(lambda n=n: len(subshells(marker)) == 2 * n, 10, f"{2 * n} subshells")
        assert sorted(servers(marker)) == sorted(p.pid for p in wrappers)


def subshells(marker: str) -> list[int]:
    """Processes with ``marker`` in their command line whose parent has it too."""
    def carries(pid: int | str | None) -> bool:
        try:
            return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and carries(p.name) and carries(parent_pid(p.name))]
