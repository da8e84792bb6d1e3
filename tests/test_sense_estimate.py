"""The estimate: llama-fit-params (cached), the GGUF-metadata fallback, and no estimate."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from corral.child.launcher import asked_context
from corral.core.args import LlamaConfig, parse_argv, parse_help
from corral.core.fit import GIB, MEMORY_FLAGS, Room, memory_value, verdict
from corral.sense.estimate import Estimator, memory_flags, parse_fit_output
from corral.sense.gguf_meta import read_meta
from tests.sense_helpers import fake_fit_params, tiny_gemma


def cfg(model: Path | str, *args: tuple[str, str | bool], binary: str = "/bin/true"
        ) -> LlamaConfig:
    return LlamaConfig(binary, (("--model", str(model)), *args))


def test_llama_fit_params_lines_are_parsed() -> None:
    """'Host 222 98319 32787' per device; log lines around it are ignored."""
    e = parse_fit_output("llama_fit_params: printing ...\nHost 222 98319 32787 \n"
                         "CUDA0 1000 2000 300\n")
    assert e is not None
    assert [(d.device, d.total_mib) for d in e.devices] == [("Host", 131328), ("CUDA0", 3300)]
    assert parse_fit_output("error: nothing\n") is None


def test_only_flags_that_bear_on_memory_are_passed() -> None:
    """Server-only flags (--port, --metrics) are left out; short spellings are canonical."""
    config = LlamaConfig("x", (("--model", "m"), ("--port", "8080"), ("-c", "4096"),
                               ("--parallel", "4"), ("--metrics", True), ("--swa-full", True)))
    assert memory_flags(config) == {"--ctx-size": "4096", "--parallel": "4", "--swa-full": ""}


def test_memory_flags_are_spelled_as_llama_server_help_spells_them() -> None:
    """Every spelling Corral knows for a memory flag means the same flag (and takes a value
    or not) in the real llama-server --help."""
    real = parse_help((Path(__file__).parent / "data" / "llama-server-help.txt").read_text())
    for spelling, flag in MEMORY_FLAGS.flags.items():
        known = real.lookup(spelling)
        assert known is not None, spelling
        assert (known.canonical, known.takes_value) == (flag.canonical, flag.takes_value)


async def test_a_config_read_without_a_catalog_keeps_short_spellings_and_its_estimate(
        tmp_path: Path) -> None:
    """Without a readable --help a config keeps -c, -np, -ngl as given; its estimate (by
    llama-fit-params and by the metadata), the context the launcher holds a start to and
    the layers it asked are those of the long spellings."""
    model = tiny_gemma(tmp_path / "m.gguf")
    short = cfg(model, *parse_argv(["-c", "4096", "-np", "2", "-ngl", "0", "-nkvo"], None))
    long = cfg(model, ("--ctx-size", "4096"), ("--parallel", "2"), ("--gpu-layers", "0"),
               ("--no-kv-offload", True))
    assert short.get("-c") == "4096" and short.get("--ctx-size") is None
    assert memory_flags(short) == memory_flags(long) == {
        "--ctx-size": "4096", "--parallel": "2", "--gpu-layers": "0", "--no-kv-offload": ""}
    by_fit = await Estimator(str(fake_fit_params(tmp_path))).estimate(short)
    assert by_fit is not None and by_fit.host().context_mib == 12  # 4096 tokens, not 32768
    assert by_fit == await Estimator(str(fake_fit_params(tmp_path))).estimate(long)
    by_meta = Estimator(fit_params="").estimate_now(short)
    assert by_meta is not None and by_meta == Estimator(fit_params="").estimate_now(long)
    assert asked_context(short) == asked_context(long) == 4096
    assert memory_value(short, "--gpu-layers") == memory_value(long, "--gpu-layers") == "0"


async def test_estimates_are_cached_per_model_identity_and_flags(tmp_path: Path) -> None:
    """One llama-fit-params run per (model file, memory flags); a cached one takes <= 5 ms;
    a touched model file is estimated again."""
    calls = tmp_path / "calls"
    model = tiny_gemma(tmp_path / "m.gguf")
    est = Estimator(str(fake_fit_params(tmp_path, calls)))
    a = await est.estimate(cfg(model, ("--ctx-size", "4096")))
    assert a is not None and a.method == "llama-fit-params" and a.host().context_mib == 12
    t0 = time.perf_counter()
    again = await est.estimate(cfg(model, ("--ctx-size", "4096"), ("--port", "9")))
    assert time.perf_counter() - t0 <= 0.005
    assert again == a and calls.read_text() == "x"
    await est.estimate(cfg(model, ("--ctx-size", "8192")))
    assert calls.read_text() == "xx"
    os.utime(model, ns=(1, 1))
    await est.estimate(cfg(model, ("--ctx-size", "4096")))
    assert calls.read_text() == "xxx"


async def test_fallback_when_llama_fit_params_is_missing(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """No llama-fit-params beside the binary: the GGUF metadata estimates, and the log
    says so (gemma3-270m's attention: 72 MiB of KV at -c 4096 -np 4, as llama.cpp says)."""
    caplog.set_level(logging.INFO, "corral.sense")
    model = tiny_gemma(tmp_path / "m.gguf")
    e = await Estimator().estimate(cfg(model, ("--ctx-size", "4096"), ("--parallel", "4"),
                                       binary=str(tmp_path / "llama-server")))
    assert e is not None and e.method == "gguf metadata"
    assert e.host().context_mib == 72
    assert "from GGUF metadata (no llama-fit-params beside" in caplog.text


async def test_fallback_when_llama_fit_params_fails(tmp_path: Path) -> None:
    """A failing llama-fit-params (here: it refuses the model) falls back to the metadata."""
    model = tiny_gemma(tmp_path / "m.gguf")
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'error: invalid argument' >&2\nexit 1\n")
    broken.chmod(0o755)
    e = await Estimator(str(broken)).estimate(cfg(model, ("--ctx-size", "2048")))
    assert e is not None and e.method == "gguf metadata" and e.host().context_mib == 21


async def test_no_estimate_for_a_truncated_gguf(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Both methods fail on a cut-off file: None, and a warning that the start decides."""
    whole = tiny_gemma(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    est = Estimator(str(fake_fit_params(tmp_path)))
    with caplog.at_level(logging.WARNING, "corral.sense"):
        assert await est.estimate(cfg(cut)) is None
    assert "the start decides" in caplog.text
    assert await est.estimate(cfg(tmp_path / "missing.gguf")) is None


def test_swa_full_and_cache_types_change_the_context(tmp_path: Path) -> None:
    """--swa-full keeps every layer at full context; q8_0 caches take 34/64 of f16."""
    from corral.sense.gguf_meta import estimate
    meta = read_meta(str(tiny_gemma(tmp_path / "m.gguf")))
    base = estimate(meta, {"--ctx-size": "4096"}).host().context_mib
    assert estimate(meta, {"--ctx-size": "4096", "--swa-full": ""}).host().context_mib == 72
    q8 = estimate(meta, {"--ctx-size": "4096", "--cache-type-k": "q8_0",
                         "--cache-type-v": "q8_0"}).host().context_mib
    assert q8 == pytest.approx(base * 34 / 64)


@pytest.mark.real
@pytest.mark.parametrize("args", [(("--ctx-size", "33554432"),),
                                  (("--ctx-size", "4096"), ("--parallel", "4")),
                                  (("--ctx-size", "1024"),)])
async def test_fallback_gives_the_same_verdicts_on_the_real_model(
        real_binary: Path, real_model: Path, args: tuple[tuple[str, str], ...]) -> None:
    """With llama-fit-params hidden, the GGUF estimate has llama.cpp's context figure
    exactly and gives the same verdict for the issue's cases (21.3 GiB available); it is
    lower only by the logits llama-fit-params counts for a whole ubatch (512 MiB)."""
    config = cfg(real_model, *args, binary=str(real_binary))
    fit = await Estimator().estimate(config)
    meta = await Estimator(fit_params="").estimate(config)
    assert fit is not None and fit.method == "llama-fit-params"
    assert meta is not None and meta.method == "gguf metadata"
    assert meta.host().context_mib == fit.host().context_mib
    assert fit.total_mib - 530 <= meta.total_mib <= fit.total_mib * 1.01
    room = Room(int(21.3 * GIB))
    assert verdict(meta, room).fits == verdict(fit, room).fits
