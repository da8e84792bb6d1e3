"""--user: llama-server runs as another user, and pre-flight knows what that user can read."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import FAKE, SupervisorProcess, make_fake_model, supervisor
from tests.privilege_helpers import refused

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="--user needs the supervisor to run as root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="--user needs util-linux setpriv"),
]


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


@pytest.fixture
def stage() -> Iterator[Path]:
    """A fresh world-readable directory under /tmp (pytest's tmp dirs are private)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-user-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sup(tmp_path: Path, stage: Path) -> Iterator[SupervisorProcess]:
    binary = stage / "llama-server"
    shutil.copy(FAKE, binary)
    binary.chmod(0o755)
    model = make_fake_model(stage / "a.gguf")
    model.chmod(0o644)
    with supervisor(tmp_path, binary, model, extra_cli=["--user", "nobody"]) as s:
        s.wait_running()
        yield s


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_llama_server_runs_as_the_user(sup: SupervisorProcess) -> None:
    """Real, effective, saved and filesystem uid of llama-server are nobody's."""
    assert uids(sup.llama_pid()) == [nobody().pw_uid] * 4


def test_a_model_the_user_cannot_read_is_refused_before_any_restart(
        sup: SupervisorProcess, stage: Path, tmp_path: Path) -> None:
    """A root-only model (mode 600), or one in a private directory, is a 422 naming the user;
    the server is not restarted."""
    private = make_fake_model(stage / "private.gguf")
    private.chmod(0o600)
    refused(sup, {"args": {"-m": str(private)}}, "user nobody cannot read")
    hidden = make_fake_model(tmp_path / "hidden.gguf")  # pytest's tmp dirs are 700
    refused(sup, {"args": {"-m": str(hidden)}}, "user nobody cannot read")
    assert uids(sup.llama_pid()) == [nobody().pw_uid] * 4
