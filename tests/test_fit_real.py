"""Know before loading, against the real llama-server and gemma-3 270M."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.fake_llama_server import slot_context
from tests.fixtures_real import HealthWatch
from tests.harness import corrupt_gguf, props, supervisor, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]


def llama_servers(supervisor_pid: int) -> set[int]:
    """The llama-server processes under the supervisor."""
    return {p.pid for p in psutil.Process(supervisor_pid).children(recursive=True)
            if "llama-server" in p.name()}


def test_a_context_that_cannot_fit_is_refused_before_anything_stops(
        tmp_path: Path, real_binary: Path, real_model: Path,
        health_watch: type[HealthWatch]) -> None:
    """-c 33554432: 422 at once with the numbers; the server never stopped (same
    pid, /health 200 throughout, no new llama-server); a normal change then passes."""
    with supervisor(tmp_path, real_binary, real_model, ["-c", "1024"]) as sup:
        pid = sup.wait_running(120)["pid"]
        assert sup.proc is not None
        with health_watch(sup.port) as watch:
            wait_for(lambda: watch.probes >= 2, 10, "the health watch probing")
            t = time.monotonic()
            r = sup.post({"-c": 33554432})
            took = time.monotonic() - t
            assert llama_servers(sup.proc.pid) == {pid}
            after = watch.probes
            wait_for(lambda: watch.probes >= after + 2, 10, "probes after the 422")
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "does not fit in memory: needs ~128 GiB: model 0.2 + context 96.0 + compute " \
               "32.0" in error
        assert "available after stopping the running server" in error
        assert watch.probes > 0 and watch.failures == []
        assert took < 5, f"the 422 took {took:.1f} s"  # the metadata verdict: no fit-params run
        status = sup.status()
        assert status["pid"] == pid and status["restarts"] == 0
        assert status["memory"]["estimate"]["method"] == "llama-fit-params"
        assert "memory estimate by llama-fit-params" in sup.log()
        r = sup.post({"-c": 2048})
        assert r.status_code == 200, r.text
        assert sup.status()["config"]["args"]["--ctx-size"] == "2048"


def test_a_truncated_gguf_still_reaches_the_start_and_is_rolled_back(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """Nothing can estimate a cut-off model: no verdict (a warning), the start fails, and
    the last good config runs again."""
    bad = corrupt_gguf(tmp_path, real_model)
    with supervisor(tmp_path, real_binary, real_model, ["-c", "1024"]) as sup:
        pid = sup.wait_running(120)["pid"]
        r = sup.post({"-m": str(bad)})
        assert r.status_code == 422, r.text
        assert "does not fit" not in r.json()["error"]
        assert "memory not checked" in sup.log()
        status = sup.wait_running(120)
        assert status["pid"] != pid
        assert status["config"]["args"]["--model"] == str(real_model)


def test_slot_context_rounding_of_the_real_server_is_no_smaller_start(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """-np 3 with -c 1024, -c 1000 and -c 1024 --kv-unified: the real llama-server's /props
    shows what the fake reports (3 slots of 512, 512, 1024) and each start counts (no
    'came up smaller')."""
    seen = []
    with supervisor(tmp_path, real_binary, real_model, ["-np", "3", "-c", "1024"]) as sup:
        for change, ctx, unified in [(None, 1024, False), ({"-c": 1000}, 1000, False),
                                     ({"-c": 1024, "--kv-unified": True}, 1024, True)]:
            if change is not None:
                r = sup.post(change)
                assert r.status_code == 200, r.text
            p = props(sup.wait_running(120)["port"])
            real = (p["total_slots"], p["default_generation_settings"]["n_ctx"])
            seen.append(real)
            assert real == slot_context(ctx, 3, unified)
        assert "came up smaller" not in sup.log()
    assert seen == [(3, 512), (3, 512), (3, 1024)]
