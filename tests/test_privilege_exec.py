"""The last privilege gaps: the program that runs is the one that was checked (a symlink
re-pointed after the check changes nothing), and ``--help`` and ``llama-fit-params`` run as
the ``--user`` too."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.child.launcher import ProcessLauncher
from corral.child.preflight import CatalogCache
from corral.child.privilege import RunAs, realpath
from corral.core.args import LlamaConfig
from corral.errors import NotAllowed, StartFailed
from corral.sense.estimate import Estimator
from tests.waiting import until


def program(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def proc(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


async def test_a_symlink_repointed_after_the_check_never_runs_the_other_program(
        tmp_path: Path) -> None:
    """The check passes the allowed program, then the link is re-pointed before the exec:
    the allowed program runs, the other one never does."""
    marker = tmp_path / "ran"
    good = program(tmp_path, "good", f"echo good >> {marker}")
    evil = program(tmp_path, "evil", f"echo evil >> {marker}")
    link = tmp_path / "llama-server"
    link.symlink_to(good)

    def check_then_swap(real: str) -> None:
        if real != str(good):
            raise NotAllowed("binary", f"{real} is not allowed")
        link.unlink()
        link.symlink_to(evil)   # the swap, after the check and before the exec

    launcher = ProcessLauncher(echo_output=False, check_binary=check_then_swap)
    try:
        child = await launcher.spawn(LlamaConfig(str(link), ()), 1)
        assert await child.exited == 0
        await child.kill()
    finally:
        await launcher.aclose()
    assert marker.read_text() == "good\n"
    assert realpath(str(link)) == str(evil)  # the swap did happen


async def test_a_file_renamed_over_the_checked_binary_after_the_check_never_runs(
        tmp_path: Path) -> None:
    """The check passes the allowed file, then another file is renamed over it (same path,
    so a path check cannot tell) before the exec: the file that was checked runs."""
    marker = tmp_path / "ran"
    good = program(tmp_path, "llama-server", f"echo good >> {marker}")
    evil = program(tmp_path, "evil", f"echo evil >> {marker}")
    checked: list[str] = []

    def check_then_swap(real: str) -> None:
        checked.append(real)
        if real != str(good):
            raise NotAllowed("binary", f"{real} is not allowed")
        os.rename(evil, good)   # the swap, after the check and before the exec

    launcher = ProcessLauncher(echo_output=False, check_binary=check_then_swap)
    try:
        child = await launcher.spawn(LlamaConfig(str(good), ()), 1)
        assert await child.exited == 0
        await child.kill()
    finally:
        await launcher.aclose()
    assert checked == [str(good)]
    assert marker.read_text() == "good\n"
    assert "evil" in good.read_text()  # the swap did happen


async def test_the_checked_file_runs_under_its_own_name(tmp_path: Path) -> None:
    """Exec'd through its open descriptor, the program is still called by its name in ps
    and top (comm), and argv[0] ends with it, so pgrep/pkill llama-server find it."""
    release = tmp_path / "release"
    binary = program(tmp_path, "llama-server",
                     f"while [ ! -e {release} ]; do sleep 0.05; done")
    launcher = ProcessLauncher(echo_output=False, check_binary=lambda real: None)
    try:
        child = await launcher.spawn(LlamaConfig(str(binary), (("--port", "1"),)), 1)
        try:
            # /bin/sh runs the script: the interpreter names it by the path it was given
            await until(lambda: proc(child.pid, "cmdline").split(b"\0")[0].endswith(b"sh"),
                        5, "the script running")
            cmdline = proc(child.pid, "cmdline").split(b"\0")
            assert cmdline[1].decode().endswith("/llama-server")
            assert cmdline[2:4] == [b"--port", b"1"]
            assert proc(child.pid, "comm").strip() == b"llama-server"
        finally:
            release.touch()
        assert await child.exited == 0
        await child.kill()
    finally:
        await launcher.aclose()


async def test_a_binary_swapped_before_the_start_is_refused(tmp_path: Path) -> None:
    """A start (a crash revival too) checks the binary's real path again: swapped, refused."""
    marker = tmp_path / "ran"
    good = program(tmp_path, "good", f"echo good >> {marker}")
    evil = program(tmp_path, "evil", f"echo evil >> {marker}")
    link = tmp_path / "llama-server"
    link.symlink_to(evil)

    def allow_good(real: str) -> None:
        if real != str(good):
            raise NotAllowed("binary", f"{real} is not allowed")

    launcher = ProcessLauncher(echo_output=False, check_binary=allow_good)
    try:
        with pytest.raises(StartFailed, match="not allowed"):
            await launcher.spawn(LlamaConfig(str(link), ()), 1)
    finally:
        await launcher.aclose()
    assert not marker.exists()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-user-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def nobody() -> RunAs:
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv")
    return RunAs.lookup("nobody")


async def test_the_checked_file_runs_as_the_user(shared_dir: Path, nobody: RunAs) -> None:
    """Under --user the open descriptor is exec'd after setpriv switched the uid: it runs,
    as that user."""
    out = shared_dir / "uid"
    out.touch()
    out.chmod(0o666)
    binary = program(shared_dir, "llama-server", f"id -u >> {out}")
    launcher = ProcessLauncher(echo_output=False, user=nobody.identity,
                               check_binary=lambda real: None)
    try:
        child = await launcher.spawn(LlamaConfig(str(binary), ()), 1)
        assert await child.exited == 0
        await child.kill()
    finally:
        await launcher.aclose()
    assert out.read_text() == f"{nobody.uid}\n"


async def test_help_and_fit_params_run_as_the_user(shared_dir: Path, nobody: RunAs) -> None:
    """Under --user, the binary's --help and llama-fit-params run with that user's uid."""
    uids = shared_dir / "uids"
    uids.touch()
    uids.chmod(0o666)
    binary = program(shared_dir, "llama-server", f"echo \"$1 $(id -u)\" >> {uids}")
    program(shared_dir, "llama-fit-params", f"echo \"fit $(id -u)\" >> {uids}")
    model = shared_dir / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    model.chmod(0o644)
    await CatalogCache(wrap=nobody.command).get(str(binary))
    estimator = Estimator(fit_params=str(shared_dir / "llama-fit-params"),
                          wrap=nobody.command)
    await estimator.estimate(LlamaConfig(str(binary), (("--model", str(model)),)))
    assert uids.read_text().split("\n")[:2] == [f"--help {nobody.uid}", f"fit {nobody.uid}"]


async def test_the_exec_links_live_in_one_directory_of_this_user(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every start of every supervisor of a user shares <tmp>/corral-exec-<uid> (nothing is
    left per run); one that another user could have prepared is refused, and nothing runs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    marker = tmp_path / "ran"
    binary = program(tmp_path, "llama-server", f"echo ran >> {marker}")
    launcher = ProcessLauncher(echo_output=False, check_binary=lambda real: None)
    try:
        for _ in range(2):
            child = await launcher.spawn(LlamaConfig(str(binary), ()), 1)
            assert await child.exited == 0
            await child.kill()
        assert [n for n in os.listdir(tmp_path) if n.startswith("corral-exec-")] == [
            f"corral-exec-{os.geteuid()}"]
        assert marker.read_text() == "ran\nran\n"
        shared = tmp_path / f"corral-exec-{os.geteuid()}"
        shared.chmod(0o777)   # anyone could have put links there now
        with pytest.raises(StartFailed, match="this user's alone"):
            await launcher.spawn(LlamaConfig(str(binary), ()), 1)
    finally:
        await launcher.aclose()
    assert marker.read_text() == "ran\nran\n"
