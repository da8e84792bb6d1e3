"""Fault tests of the TOML file store (RELIABILITY.md, tests 10 and 11).

Real writer processes (``tests/store_writer.py``) are SIGKILLed mid-save, or run two at a
time against one file; the file must always parse and never lose or tear a config.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.store.base import StoredConfig
from corral.store.toml_file import TomlFileStore
from tests.store_writer import config_for, seq_of

WRITER = Path(__file__).with_name("store_writer.py")

PREAMBLE = """\
# Shared by supervisors; this comment and the table below must survive every write.
[spare]  # hand-written
binary = "llama-server"
"""

Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start store_writer.py; every writer is killed and reaped at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: object) -> subprocess.Popen[str]:
        cmd = [sys.executable, str(WRITER), *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert all(proc.returncode is not None for proc in procs)


def load(path: Path, name: str) -> StoredConfig | None:
    return asyncio.run(TomlFileStore(path).load(name))


def assert_file_is_whole(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith(PREAMBLE.splitlines()[0])
    assert tomllib.loads(text)["spare"] == {"binary": "llama-server"}


KILLS = 100
BIG = 24  # flags per config: a few KB, so a kill often lands inside the write itself


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.timing  # bounded in time, heavy: run alone
def test_sigkill_while_saving_leaves_the_old_or_the_new_config(
    tmp_path: Path, spawn: Spawn
) -> None:
    """A writer SIGKILLed mid-save leaves the file parseable, with the old or the new config."""
    path = tmp_path / "config.toml"
    path.write_text(PREAMBLE, encoding="utf-8")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    committed: int | None = None  # the seq stored under "gpt" before this round
    mid_save = newer = 0
    for kill in range(KILLS):
        first = 0 if committed is None else committed + 1
        proc = spawn(path, "gpt", first, 100_000, "--args", BIG)
        assert proc.stdout is not None
        lines: list[str] = []
        # Kill after a random number of "begin"/"done" lines, plus a random jitter so the
        # kill lands anywhere in a save (locking, parsing, writing, fsync, rename).
        lines += [proc.stdout.readline() for _ in range(rng.randrange(1, 8))]
        time.sleep(rng.uniform(0, 0.008))
        proc.kill()
        lines += proc.stdout.readlines()  # not communicate(): it would skip readline's buffer
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, f"writer died on its own: {lines}"
        lines = [line.strip() for line in lines]
        begun = [int(line.split()[1]) for line in lines if line.startswith("begin")]
        done = [int(line.split()[1]) for line in lines if line.startswith("done")]

        allowed = {max(done) if done else committed}
        if begun and begun[-1] not in done:  # killed inside this save: old or new
            allowed.add(begun[-1])
            mid_save += 1
            newer += seq_of(load(path, "gpt")) == begun[-1]
        assert_file_is_whole(path)
        stored = load(path, "gpt")
        context = f"seed {seed}, kill {kill}: lines {lines}"
        assert seq_of(stored) in allowed, context
        if stored is not None:
            assert stored == config_for("gpt", int(stored.applied_at), BIG), context
        committed = seq_of(stored)

    assert mid_save >= KILLS // 4, f"only {mid_save} kills landed inside a save"
    leftovers = list(tmp_path.glob(".config.toml.*.tmp"))
    print(
        f"\n{mid_save}/{KILLS} kills inside a save ({newer} after the rename),"
        f" {len(leftovers)} temp files left over"
    )
    asyncio.run(TomlFileStore(path).save("gpt", config_for("gpt", 0)))  # still writable
    assert load(path, "gpt") == config_for("gpt", 0)


WRITES = 1000


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.timing  # bounded in time, heavy: run alone
def test_two_writers_sharing_a_file_lose_no_update(tmp_path: Path, spawn: Spawn) -> None:
    """Two processes saving to one file never lose or roll back each other's saves."""
    path = tmp_path / "config.toml"
    path.write_text(PREAMBLE, encoding="utf-8")
    # --check: before each save a writer checks its name still holds its previous save.
    writers = {name: spawn(path, name, 0, WRITES, "--check") for name in ("alpha", "beta")}
    deadline = time.monotonic() + 100
    newest = dict.fromkeys(writers, -1)
    while running := [p for p in writers.values() if p.poll() is None]:
        assert time.monotonic() < deadline, "writers did not finish in time"
        # Meanwhile the file always parses, and no name ever goes back to an older save.
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        for name in writers:
            seq = int(doc[name]["applied_at"]) if name in doc else -1
            assert seq >= newest[name], f"{name} went back from {newest[name]} to {seq}"
            newest[name] = seq
        with contextlib.suppress(subprocess.TimeoutExpired):
            running[0].wait(timeout=0.02)  # paces the reads without a fixed sleep

    for name, proc in writers.items():
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, f"{name}: {out.splitlines()[-1:]} {err}"
        assert out.endswith("finished\n")
    assert_file_is_whole(path)
    for name in writers:
        assert load(path, name) == config_for(name, WRITES - 1)
