"""Which event loop runs ``corral supervise`` (``--loop``): uvloop when installed, asyncio's
on request; the supervisor's pidfd reader notices a crash on either."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from corral.cli.loop import loop_factory, run
from tests.harness import FAKE, make_fake_model, supervisor, wait_for

uvloop = pytest.importorskip("uvloop")


def test_auto_is_uvloop_when_installed_and_asyncio_on_request() -> None:
    """auto and uvloop give uvloop's loop; asyncio gives asyncio's."""
    assert loop_factory("auto")[0] == loop_factory("uvloop")[0] == "uvloop"
    name, factory = loop_factory("asyncio")
    loop = factory()
    try:
        assert name == "asyncio" and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert run(asyncio.sleep(0, "x"), "uvloop") == "x"


def test_auto_falls_back_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop installed, auto runs asyncio's loop and --loop uvloop is an error."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert loop_factory("auto")[0] == "asyncio"
    with pytest.raises(ImportError):
        loop_factory("uvloop")


def loaded_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_a_crash_is_noticed_and_revived_on_either_loop(tmp_path: Path, choice: str) -> None:
    """The pidfd reader works on the loop --loop picked: SIGKILL -> a new llama-server."""
    model = make_fake_model(tmp_path / "m.gguf")
    with supervisor(tmp_path, FAKE, model, extra_cli=["--loop", choice]) as sup:
        first = sup.wait_running()
        assert sup.proc is not None
        assert loaded_uvloop(sup.proc.pid) is (choice == "uvloop")
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: (s := sup.status())["state"] == "RUNNING"
                 and s["pid"] not in (None, first["pid"]), 10, "revival")
        assert sup.stop() == 0
