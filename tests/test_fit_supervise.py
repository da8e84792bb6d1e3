"""Know before loading, through a supervisor running the fake llama-server: a misfit is a
422 with nothing stopped, the dry run changes nothing, a degraded start is rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import FAKE, props, supervisor
from tests.sense_helpers import tiny_gemma


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # No llama-fit-params beside the fake: the GGUF metadata estimates (gemma3-270m's shape).
    return tiny_gemma(tmp_path / "tiny.gguf")


def test_a_misfit_is_refused_and_a_dry_run_changes_nothing(tmp_path: Path,
                                                           model: Path) -> None:
    """-c 33554432: 422 with the numbers, same pid, no restart; a dry run answers the merged
    config, the verdict and the strategy; the status shows the running config's estimate."""
    with supervisor(tmp_path, FAKE, model, ["-c", "4096"]) as sup:
        pid = sup.wait_running()["pid"]
        r = sup.post({"-c": 33554432})
        assert r.status_code == 422, r.text
        assert "does not fit in memory: needs ~" in r.json()["error"]
        assert "context 96.0" in r.json()["error"]
        dry = sup.http.post("/v1/params", params={"dry_run": "1"},
                            json={"args": {"-c": 8192}})
        assert dry.status_code == 200, dry.text
        body = dry.json()
        assert body["status"] == "would-apply" and body["strategy"] == "stop-first"
        assert body["config"]["args"]["--ctx-size"] == "8192"
        assert body["fit"]["fits"] and body["fit"]["method"] == "gguf metadata"
        refused = sup.http.post("/v1/params", params={"dry_run": "1"},
                                json={"args": {"-c": 33554432}})
        assert refused.status_code == 422 and refused.json()["status"] == "rejected"
        assert refused.json()["fit"]["fits"] is False
        status = sup.status()
        assert status["pid"] == pid and status["restarts"] == 0
        assert status["config"]["args"]["--ctx-size"] == "4096"
        memory = status["memory"]
        assert memory["estimate"]["method"] == "gguf metadata"
        assert memory["available_mib"] > 0 and memory["fit_margin"] == 0.1


def test_a_start_that_came_up_smaller_is_rolled_back(tmp_path: Path, model: Path) -> None:
    """/props reporting less context than -c asked: 422 'came up smaller than asked', and
    the last good config runs again."""
    with supervisor(tmp_path, FAKE, model, ["-c", "4096", "-np", "2"]) as sup:
        sup.wait_running()
        r = sup.post({"--fake-props-n-ctx": 1024})
        assert r.status_code == 422, r.text
        assert "came up smaller than asked: context 2048 (1024 per slot x 2 slots)" \
            in r.json()["error"]
        status = sup.wait_running()
        assert "--fake-props-n-ctx" not in status["config"]["args"]


def test_what_llama_cpp_rounds_is_no_smaller_start(tmp_path: Path, model: Path) -> None:
    """-np 3 -c 2048: 3 slots of 768 (padded, as llama.cpp does now) and of 682 (rounded
    down, as older versions did) are both applied; 681 a slot is rolled back."""
    with supervisor(tmp_path, FAKE, model, ["-c", "4096"]) as sup:
        sup.wait_running()
        r = sup.post({"-np": 3, "-c": 2048})
        assert r.status_code == 200, r.text
        reported = props(sup.wait_running()["port"])
        assert (reported["total_slots"], reported["default_generation_settings"]["n_ctx"]) \
            == (3, 768)
        r = sup.post({"--fake-props-n-ctx": 682})
        assert r.status_code == 200, r.text
        r = sup.post({"--fake-props-n-ctx": 681})
        assert r.status_code == 422, r.text
        assert "came up smaller than asked: context 2043 (681 per slot x 3 slots), asked " \
               "-c 2048" in r.json()["error"]
        assert sup.wait_running()["config"]["args"]["--fake-props-n-ctx"] == "682"


def test_allow_degraded_keeps_a_smaller_start(tmp_path: Path, model: Path) -> None:
    """With --allow-degraded the same change is applied (and logged)."""
    with supervisor(tmp_path, FAKE, model, ["-c", "4096"],
                    extra_cli=["--allow-degraded", "--fit-margin", "20"]) as sup:
        sup.wait_running()
        r = sup.post({"--fake-props-n-ctx": 1024})
        assert r.status_code == 200, r.text
        assert "kept (--allow-degraded)" in sup.log()
        assert sup.status()["memory"]["fit_margin"] == 0.2


def test_fewer_gpu_layers_than_asked_is_rolled_back(tmp_path: Path, model: Path) -> None:
    """-ngl 10 and a log saying 4/19 layers were offloaded: a failed start, rolled back."""
    with supervisor(tmp_path, FAKE, model, ["-c", "4096"]) as sup:
        sup.wait_running()
        r = sup.post({"-ngl": 10, "--fake-offloaded": "4/19"})
        assert r.status_code == 422, r.text
        assert "4/19 layers on the GPU, asked -ngl 10" in r.json()["error"]
        assert "--gpu-layers" not in sup.wait_running()["config"]["args"]
