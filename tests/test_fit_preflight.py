"""Pre-flight with the fit check: a misfit is refused before anything is touched."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from corral.child.preflight import Preflight
from corral.core.args import LlamaConfig
from corral.core.fit import GIB, GpuRoom
from corral.errors import PreflightFailed
from corral.sense.estimate import Estimator
from tests.sense_helpers import fake_fit_params, fake_memory, tiny_gemma

FAKE = str(Path(__file__).with_name("fake_llama_server.py"))


@pytest.fixture
def binary(tmp_path: Path) -> str:
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def config(binary: str, model: Path, ctx: int) -> LlamaConfig:
    return LlamaConfig(binary, (("--model", str(model)), ("--ctx-size", str(ctx))))


def preflight(tmp_path: Path, available_mib: int, *, fit_params: bool = True,
              gpus: tuple[GpuRoom, ...] = ()) -> Preflight:
    tmp_path.mkdir(parents=True, exist_ok=True)
    est = Estimator(str(fake_fit_params(tmp_path)) if fit_params else "")
    return Preflight(picks_ports=True, estimator=est, memory=fake_memory(tmp_path, available_mib),
                     gpus=lambda: gpus)


@pytest.mark.parametrize("fit_params", [True, False], ids=["llama-fit-params", "gguf"])
async def test_a_config_that_cannot_fit_is_refused_with_numbers(
        tmp_path: Path, binary: str, fit_params: bool) -> None:
    """-c 33554432 with 21.3 GiB: PreflightFailed naming what it needs and what there is;
    both estimators agree."""
    model = tiny_gemma(tmp_path / "m.gguf")
    checks = preflight(tmp_path, int(21.3 * 1024), fit_params=fit_params)
    with pytest.raises(PreflightFailed, match=r"does not fit in memory: needs ~\d+ GiB: model "
                       r"[\d.]+ \+ context 96\.0 \+ compute 32\.\d .*; 21\.3 GiB available$"):
        await checks.check(config(binary, model, 33554432), None)
    await checks.check(config(binary, model, 4096), None)


async def test_what_the_running_server_gives_back_counts(tmp_path: Path, binary: str) -> None:
    """Stop-first frees the running server's memory: a change that fits only then passes,
    and the message says 'after stopping the running server'."""
    model = tiny_gemma(tmp_path / "m.gguf")
    running = config(binary, model, 262144)  # 768 + 768 MiB by the fake estimator
    checks = preflight(tmp_path, 1000)
    await checks.check(config(binary, model, 131072), running)  # 384 + 640 MiB + 222
    with pytest.raises(PreflightFailed, match="after stopping the running server"):
        await checks.check(config(binary, model, 1 << 20), running)


async def test_no_estimate_passes_with_a_warning(tmp_path: Path, binary: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A truncated GGUF cannot be estimated: the check passes (the start decides)."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gemma(tmp_path / "m.gguf").read_bytes()[:300])
    with caplog.at_level(logging.WARNING):
        await preflight(tmp_path, 10).check(config(binary, cut, 4096), None)
    assert "memory not checked" in caplog.text


async def test_fits_alone_but_not_beside(tmp_path: Path, binary: str) -> None:
    """side_by_side counts only what is free now; the fit check counts the old one's too."""
    model = tiny_gemma(tmp_path / "m.gguf")
    old, new = config(binary, model, 131072), config(binary, model, 131072)
    checks = preflight(tmp_path, 1300)  # each needs 222 + 384 + 640 = 1246 MiB (+10 %)
    await checks.check(new, old)
    beside = checks.side_by_side(old, new)
    assert beside.known and not beside.fits
    assert "available beside the running server" in beside.reason
    assert preflight(tmp_path / "more", 3000).side_by_side(old, new).fits


async def test_warnings_for_long_context_and_gpu_layers_without_gpu(
        tmp_path: Path, binary: str, caplog: pytest.LogCaptureFixture) -> None:
    """-c past the trained context and -ngl without a GPU are warned about, not refused."""
    model = tiny_gemma(tmp_path / "m.gguf")
    asks = LlamaConfig(binary, (("--model", str(model)), ("--ctx-size", "65536"),
                                ("--gpu-layers", "99")))
    checks = preflight(tmp_path, 64 * 1024)
    with caplog.at_level(logging.WARNING):
        await checks.check(config(binary, model, 65536), None)
    assert "exceeds the model's trained context (32768)" in caplog.text
    assert any("no GPU was found" in w for w in checks.warnings(asks))
    with_gpu = preflight(tmp_path / "g", 64 * 1024, gpus=(GpuRoom(8 * GIB, 8 * GIB),))
    assert not [w for w in with_gpu.warnings(asks) if "GPU" in w]


async def test_status_view_shows_the_cached_estimate_and_the_memory(tmp_path: Path,
                                                                    binary: str) -> None:
    """memory_view is cheap: the cached estimate (none before a check) and what is free."""
    model = tiny_gemma(tmp_path / "m.gguf")
    checks = preflight(tmp_path, 5000)
    c = config(binary, model, 4096)
    assert checks.memory_view(c)["estimate"] is None
    await checks.check(c, None)
    view = checks.memory_view(c)
    assert view["estimate"]["method"] == "llama-fit-params"
    assert view["available_mib"] == 5000 and view["fit_margin"] == 0.1


def test_gpu_readings_are_cached_briefly(tmp_path: Path) -> None:
    """nvidia-smi is asked at most every 2 s, however often the status is read."""
    calls = []
    checks = Preflight(memory=fake_memory(tmp_path, 100),
                       gpus=lambda: calls.append(1) or ())  # type: ignore[func-returns-value]
    for _ in range(5):
        checks.room()
    assert len(calls) == 1
    assert os.path.exists(tmp_path / "meminfo")
