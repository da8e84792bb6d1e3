"""The fit verdict inside the controller (fakes for servers and clock, the real estimator and
pre-flight fit over an injected /proc/meminfo): --swap auto and the batch's check."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.child.preflight import Preflight
from corral.core.args import Change, LlamaConfig
from corral.core.fit import FitVerdict, SwapMode
from corral.errors import PreflightFailed
from corral.sense.estimate import Estimator
from corral.supervisor.changes import Outcome
from corral.supervisor.settings import Startup
from tests.fakes import FakeChecks, Rig
from tests.sense_helpers import fake_memory, tiny_gemma

OLD_CTX, NEW_CTX, HUGE_CTX = "32768", "131072", "33554432"


class MemoryChecks(FakeChecks):
    """FakeChecks for files and ports; the real memory verdicts of a Preflight."""

    def __init__(self, preflight: Preflight) -> None:
        super().__init__()
        self.preflight = preflight

    async def check(self, config: LlamaConfig, running: LlamaConfig | None, *,
                    fit: bool = True) -> None:
        await super().check(config, running)
        verdict = await self.preflight.fit(config, running)
        if fit and verdict.known and not verdict.fits:
            raise PreflightFailed(f"does not fit in memory: {verdict.reason}")

    def side_by_side(self, running: LlamaConfig, new: LlamaConfig) -> FitVerdict:
        return self.preflight.side_by_side(running, new)


def cfg(model: Path, ctx: str) -> LlamaConfig:
    return LlamaConfig("/usr/bin/llama-server", (("--model", str(model)), ("--port", "8081"),
                                                 ("--ctx-size", ctx)))


async def rig_with(tmp_path: Path, available_mib: int) -> tuple[Rig, Path]:
    model = tiny_gemma(tmp_path / "m.gguf")
    est = Estimator(fit_params="")
    for ctx in (OLD_CTX, NEW_CTX, HUGE_CTX):  # warm: the fake clock drives no threads
        await est.estimate(cfg(model, ctx))
    preflight = Preflight(estimator=est, memory=fake_memory(tmp_path, available_mib),
                          gpus=lambda: ())
    rig = Rig(Startup(cfg(model, OLD_CTX), persist_when_ready=True), swap=SwapMode.AUTO)
    rig.checks = MemoryChecks(preflight)
    rig.controller.checks = rig.checks
    return rig, model


def need_mib(est_model: Path, ctx: str) -> float:
    e = Estimator(fit_params="").estimate_now(cfg(est_model, ctx))
    assert e is not None
    return e.total_mib


@pytest.mark.parametrize(("room", "strategy"), [("beside", "stop-first"),
                                                ("alone", "stop-first")])
async def test_auto_is_stop_first_when_it_fits_only_alone(tmp_path: Path, room: str,
                                                          strategy: str) -> None:
    """Room for the new one only once the old one has stopped: stop-first, and the change
    is applied all the same; room for both, but no GPU (the two would share the CPU
    cores): stop-first too (core's auto_strategy has the GPU case)."""
    model = tiny_gemma(tmp_path / "probe.gguf")
    new = need_mib(model, NEW_CTX) * 1.1
    available = int(new * 2) if room == "beside" else int(new) - 20
    rig, model = await rig_with(tmp_path, available)
    async with rig:
        await rig.until_state("RUNNING")
        record = rig.controller.submit(Change(None, (("--ctx-size", NEW_CTX),)))
        await rig.clock.run_until(record.done.done, "the change settled")
        assert record.outcome is Outcome.APPLIED, record.error
        assert rig.controller.status().last_strategy == strategy


async def test_a_batch_that_cannot_fit_is_refused_whole_before_any_stop(
        tmp_path: Path) -> None:
    """Two changes merged into a misfit: both answered rejected with the numbers; the old
    server was never signalled."""
    rig, model = await rig_with(tmp_path, 4000)
    async with rig:
        await rig.until_state("RUNNING")
        old = rig.active
        a = rig.controller.submit(Change(None, (("--ctx-size", HUGE_CTX),)))
        b = rig.controller.submit(Change(None, (("--alias", "x"),)))
        await rig.clock.run_until(lambda: a.done.done() and b.done.done(), "both settled")
        assert a.outcome is b.outcome is Outcome.REJECTED
        assert a.error is not None and "needs ~128 GiB" in a.error
        assert "after stopping the running server" in a.error
        assert old.signals == [] and rig.launcher.alive() == [old]
