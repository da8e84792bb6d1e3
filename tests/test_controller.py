"""The controller in-process, on fakes (tests/fakes.py): every path of the decision table,
exact backoff timing, applies of both strategies, failures at each step, shutdown anywhere."""

from __future__ import annotations

import pytest

from corral.core.args import Change
from corral.core.fit import SwapMode
from corral.errors import StoreError
from corral.supervisor.changes import ChangeRecord, Outcome
from corral.supervisor.settings import Settings, Startup
from tests.fakes import FAST, Behaviour, Rig, config

START_FIRST, STOP_FIRST = SwapMode.START_FIRST, SwapMode.STOP_FIRST


def change(**flags: str | None) -> Change:
    return Change(None, tuple((f"--{k}", v) for k, v in flags.items()))


async def settled(rig: Rig, record: ChangeRecord) -> ChangeRecord:
    await rig.clock.run_until(record.done.done, f"the outcome of {record.id}")
    return record


def fails_for(model: str, **kw: object) -> object:
    """A behaviour function: configs with ``model`` behave as ``kw`` says."""
    return lambda c: Behaviour(**kw) if c.get("--model") == model else Behaviour()  # type: ignore[arg-type]


# ---- boot ---------------------------------------------------------------------------------


async def test_boot_runs_routes_at_first_health_and_stores_once_ready() -> None:
    """Start-up: RUNNING after load + min-healthy; routed at /health 200; stored when ready."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        assert rig.clock.now == pytest.approx(1000 + 1.0 + 0.3)
        assert rig.front.calls == [("route", rig.active.pid)]
        stored = await rig.store.load("default")
        assert stored is not None and stored.config == config()


async def test_stored_config_that_fails_falls_back_to_the_command_line() -> None:
    """The stored config wins at start; if it cannot start, the command-line config runs."""
    startup = Startup(config("stored.gguf"), config("cli.gguf"))
    async with Rig(startup) as rig:
        rig.launcher.behave = fails_for("stored.gguf", outcome="exit")
        await rig.until_state("RUNNING")
        assert rig.active.config == config("cli.gguf")
        assert rig.controller.last_good == config("cli.gguf")
        assert await rig.store.load("default") is None  # the stored one is kept (untouched)


async def test_backoff_delays_are_exact_and_end_fatal() -> None:
    """Failed starts wait 0.5, 1, 2, 4 s; the fifth failure is FATAL and refuses requests."""
    async with Rig() as rig:
        rig.launcher.behave = lambda c: Behaviour(load_s=0.1, outcome="exit")
        spawned: list[float] = []
        for n in range(1, 6):
            await rig.clock.run_until(lambda n=n: len(rig.launcher.servers) >= n, f"start {n}")
            spawned.append(rig.clock.now)
        await rig.until_state("FATAL")
        gaps = [round(b - a, 6) for a, b in zip(spawned, spawned[1:], strict=False)]
        assert gaps == [0.1 + 0.5, 0.1 + 1.0, 0.1 + 2.0, 0.1 + 4.0]
        assert rig.front.mode == "refuse"
        assert rig.controller.history.consecutive_failures == 5
        assert rig.controller.retry_at is None


async def test_never_ready_is_killed_at_the_ready_timeout() -> None:
    """A server that never answers 200 fails its start exactly at --ready-timeout."""
    settings = Settings(**{**FAST.__dict__, "ready_timeout_s": 7.0})
    async with Rig(settings=settings) as rig:
        rig.launcher.behave = lambda c: Behaviour(outcome="never")
        await rig.until_state("BACKOFF")
        assert rig.clock.now == pytest.approx(1000 + 7.0)
        assert rig.launcher.alive() == []


# ---- revival ------------------------------------------------------------------------------


async def test_crash_revives_at_once_holding_requests_meanwhile() -> None:
    """A crash of a ready server: hold at once, restart without delay, route to the new one."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        first = rig.active
        crashed_at = rig.clock.now
        first.crash(-9)
        await rig.clock.run_until(lambda: rig.state == "RUNNING" and rig.active is not first,
                                  "revival")
        assert rig.clock.now == pytest.approx(crashed_at + 1.0 + 0.3)  # load + min-healthy only
        assert rig.front.calls[-2:] == [("hold",), ("route", rig.active.pid)]
        assert rig.checks.calls.count("check") == 1  # a revival skips pre-flight
        status = rig.controller.status()
        assert status.restarts == 1 and "code -9" in (status.last_error or "")
        states = [e.data for e in rig.controller.events.since(0) if e.kind == "state"]
        assert "code -9" in (states[-2]["error"] or "")  # RUNNING -> STARTING: why
        assert states[-1]["to"] == "RUNNING" and states[-1]["error"] is None  # not a cause


async def test_hung_server_is_killed_and_revived() -> None:
    """With liveness probes on, three failed probes kill the server; it is then revived."""
    settings = Settings(**{**FAST.__dict__, "liveness_interval_s": 2.0})
    async with Rig(settings=settings) as rig:
        await rig.until_state("RUNNING")
        hung = rig.active
        hung.behaviour.healthy = False
        await rig.clock.run_until(lambda: rig.active is not hung and rig.state == "RUNNING",
                                  "the hung server replaced")
        assert hung.signals[0] == "KILL"  # no SIGTERM: a frozen server would not heed it
        assert rig.controller.restarts == 1
        assert "after 7.3 s" in (rig.controller.last_error or "")  # 1.3 s start + 3 probes


@pytest.mark.parametrize(("interval", "restarts"), [(0.0, 0), (2.0, 1)])
async def test_no_liveness_probe_by_default(interval: float, restarts: int) -> None:
    """Without --monitoring-interval a server that stops answering /health is left alone
    (the same minute with probes on restarts it, so the check can fail)."""
    settings = Settings(**{**FAST.__dict__, "liveness_interval_s": interval})
    async with Rig(settings=settings) as rig:
        await rig.until_state("RUNNING")
        rig.active.behaviour.healthy = False
        await rig.clock.run_for(60.0)
        assert rig.controller.restarts == restarts


# ---- applies ------------------------------------------------------------------------------


async def test_stop_first_apply_drains_stops_starts_then_stores() -> None:
    """stop-first: hold, drain, SIGTERM old, start new, route at health, store, answer 200."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        old = rig.active
        record = await settled(rig, rig.controller.submit(change(model="b.gguf")))
        new = rig.active
        assert (record.outcome, record.restarted) == (Outcome.APPLIED, True)
        assert record.config == config("b.gguf") and record.strategy == "stop-first"
        assert rig.front.calls[1:] == [("hold",), ("drain", old.pid), ("route", new.pid)]
        assert old.signals == ["TERM", "KILL"] and new.pid != old.pid
        stored = await rig.store.load("default")
        assert stored is not None and stored.config == config("b.gguf")
        assert rig.controller.status().last_strategy == "stop-first"


async def test_start_first_apply_switches_before_stopping_the_old_one() -> None:
    """start-first: the new server is ready beside the old before clients move to it."""
    async with Rig(swap=START_FIRST) as rig:
        await rig.until_state("RUNNING")
        old = rig.active
        record = rig.controller.submit(change(model="b.gguf"))
        await rig.clock.run_until(lambda: len(rig.launcher.alive()) == 2, "two servers")
        assert rig.controller.status().candidate is not None
        assert rig.controller.status().pid == old.pid  # clients still on the old one
        await settled(rig, record)
        new = rig.active
        assert record.outcome is Outcome.APPLIED
        assert rig.front.calls[1:] == [("route", new.pid), ("drain", old.pid)]
        assert old.exited.done() and rig.launcher.alive() == [new]
        assert rig.controller.status().candidate is None


async def test_start_first_failure_never_touches_the_old_server() -> None:
    """A new config that fails to load is killed; the old one never saw a signal."""
    async with Rig(swap=START_FIRST) as rig:
        await rig.until_state("RUNNING")
        old = rig.active
        rig.launcher.behave = fails_for("bad.gguf", outcome="exit")
        record = await settled(rig, rig.controller.submit(change(model="bad.gguf")))
        assert record.outcome is Outcome.REJECTED and "code 1" in (record.error or "")
        assert record.log  # the tail of llama-server's output
        assert old.signals == [] and rig.launcher.alive() == [old]
        assert rig.state == "RUNNING" and rig.controller.last_good == config()
        assert rig.front.calls == [("route", old.pid)]


@pytest.mark.parametrize(("fits", "strategy"), [(True, "start-first"), (False, "stop-first")])
async def test_auto_swap_starts_first_only_when_both_fit(fits: bool, strategy: str) -> None:
    """--swap auto: start-first when the new server fits beside the old one, else stop-first."""
    async with Rig(swap=SwapMode.AUTO) as rig:
        await rig.until_state("RUNNING")
        rig.checks.fits = fits
        record = await settled(rig, rig.controller.submit(change(model="b.gguf")))
        assert record.outcome is Outcome.APPLIED
        assert rig.controller.status().last_strategy == strategy


async def test_stop_first_failure_rolls_back_to_the_last_good_config() -> None:
    """A stop-first apply that fails at load starts the last good config again: 422."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        rig.launcher.behave = fails_for("bad.gguf", outcome="exit")
        record = await settled(rig, rig.controller.submit(change(model="bad.gguf")))
        assert record.outcome is Outcome.REJECTED
        assert rig.state == "RUNNING" and rig.active.config == config()
        stored = await rig.store.load("default")
        assert stored is not None and stored.config == config()
        assert rig.controller.status().last_error is not None


async def test_crash_during_min_healthy_is_a_failed_apply() -> None:
    """The new server answers 200, then dies within --min-healthy: rolled back."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        record = rig.controller.submit(change(model="b.gguf"))
        await rig.clock.run_until(lambda: rig.front.routed_to not in (None, 4001), "new routed")
        rig.active.crash(1)
        await settled(rig, record)
        assert record.outcome is Outcome.REJECTED
        assert rig.state == "RUNNING" and rig.active.config == config()


async def test_rollback_that_fails_too_is_fatal_with_both_reasons() -> None:
    """Old config fails on its way back: FATAL, the answer and status give both reasons."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        rig.launcher.behave = lambda c: Behaviour(outcome="exit")
        record = await settled(rig, rig.controller.submit(change(model="bad.gguf")))
        assert rig.state == "FATAL" and rig.front.mode == "refuse"
        assert "rollback failed too" in (record.error or "")
        assert rig.controller.status().last_error == record.error


@pytest.mark.parametrize(("swap", "error", "outcome"), [
    (STOP_FIRST, StoreError("disk full"), Outcome.NOT_STORED),
    (START_FIRST, StoreError("disk full"), Outcome.NOT_STORED),
    (STOP_FIRST, None, Outcome.UNAVAILABLE),
])
async def test_store_failure_rolls_back(swap: SwapMode, error: Exception | None,
                                        outcome: Outcome) -> None:
    """A config that ran but could not be stored is not kept: the last good one runs."""
    async with Rig(swap=swap) as rig:
        await rig.until_state("RUNNING")
        if error is None:
            rig.store_unavailable()
        else:
            rig.store.fail_with = error
        record = await settled(rig, rig.controller.submit(change(model="b.gguf")))
        assert record.outcome is outcome
        assert rig.state == "RUNNING" and rig.active.config == config()
        assert len(rig.launcher.alive()) == 1


async def test_preflight_rejection_restarts_nothing() -> None:
    """A merged batch that fails pre-flight is answered 422 and nothing is stopped."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        rig.checks.bad_models.add("gone.gguf")
        record = await settled(rig, rig.controller.submit(change(model="gone.gguf")))
        assert record.outcome is Outcome.REJECTED and "does not exist" in (record.error or "")
        assert len(rig.launcher.servers) == 1


async def test_noop_batch_answers_without_a_restart() -> None:
    """Setting what runs already is answered 200 with restarted=false."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        record = await settled(rig, rig.controller.submit(change(model="a.gguf")))
        assert (record.outcome, record.restarted) == (Outcome.APPLIED, False)
        assert len(rig.launcher.servers) == 1


async def test_batch_closes_after_the_debounce_window() -> None:
    """A lone change waits exactly --debounce-ms before its apply starts."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        submitted = rig.clock.now
        rig.controller.submit(change(model="b.gguf"))
        await rig.clock.run_until(lambda: rig.state == "APPLYING", "the apply starts")
        assert rig.clock.now == pytest.approx(submitted + 0.2)


async def test_changes_during_an_apply_form_the_next_batch() -> None:
    """Changes arriving mid-apply wait for it; superseded values are never started."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        first = rig.controller.submit(change(model="b.gguf"))
        await rig.until_state("APPLYING")
        later = [rig.controller.submit(change(model=m)) for m in ("c.gguf", "d.gguf")]
        later.append(rig.controller.submit(change(ctx="512")))
        for record in (first, *later):
            await settled(rig, record)
        assert all(r.outcome is Outcome.APPLIED for r in (first, *later))
        started = [s.config.get("--model") for s in rig.launcher.servers]
        assert started == ["a.gguf", "b.gguf", "d.gguf"]
        assert rig.active.config == config("d.gguf", ctx="512")


async def test_apply_in_backoff_runs_and_clears_the_failures() -> None:
    """A good config applied while the last good one is backing off starts at once."""
    async with Rig() as rig:
        rig.launcher.behave = fails_for("a.gguf", outcome="exit")
        await rig.until_state("BACKOFF")
        record = await settled(rig, rig.controller.submit(change(model="b.gguf")))
        assert record.outcome is Outcome.APPLIED and rig.state == "RUNNING"
        assert rig.controller.history.consecutive_failures == 0
        assert rig.controller.retry_at is None


async def test_failed_apply_in_backoff_goes_back_to_backoff() -> None:
    """A bad config applied during backoff is rejected; the retry schedule goes on."""
    async with Rig() as rig:
        rig.launcher.behave = lambda c: Behaviour(outcome="exit")
        await rig.until_state("BACKOFF")
        record = await settled(rig, rig.controller.submit(change(model="b.gguf")))
        assert record.outcome is Outcome.REJECTED
        assert rig.state == "BACKOFF" and rig.controller.retry_at is not None


async def test_preflight_rejection_in_backoff_keeps_the_retry() -> None:
    """A batch pre-flight refuses during backoff is answered; the retry stays scheduled."""
    async with Rig() as rig:
        rig.launcher.behave = lambda c: Behaviour(outcome="exit")
        await rig.until_state("BACKOFF")
        rig.checks.bad_models.add("gone.gguf")
        retry_at = rig.controller.retry_at
        record = await settled(rig, rig.controller.submit(change(model="gone.gguf")))
        assert (record.outcome, record.restarted, record.strategy) == (Outcome.REJECTED,
                                                                       False, None)
        assert rig.state == "BACKOFF" and rig.controller.retry_at == retry_at


async def test_failed_apply_in_fatal_stays_fatal_and_a_good_one_recovers() -> None:
    """From FATAL only a working config gets out; a failing one leaves it FATAL."""
    async with Rig() as rig:
        rig.launcher.behave = fails_for("a.gguf", outcome="exit", load_s=0.1)
        await rig.until_state("FATAL")
        rig.launcher.behave = lambda c: Behaviour(outcome="exit") if c.get(
            "--model") != "good.gguf" else Behaviour()
        bad = await settled(rig, rig.controller.submit(change(model="bad.gguf")))
        assert bad.outcome is Outcome.REJECTED and rig.state == "FATAL"
        good = await settled(rig, rig.controller.submit(change(model="good.gguf")))
        assert good.outcome is Outcome.APPLIED and rig.state == "RUNNING"
        assert rig.front.mode == "route"


async def test_spawn_failure_is_a_failed_start() -> None:
    """A binary that cannot be executed fails the start like an early exit."""
    async with Rig() as rig:
        rig.launcher.behave = lambda c: Behaviour(spawn_fails=True)
        await rig.until_state("BACKOFF")
        assert "cannot execute" in (rig.controller.last_error or "")


# ---- shutdown -----------------------------------------------------------------------------

STEP_REACHED = {
    "loading the new server": lambda rig: len(rig.launcher.servers) == 2,
    "stopping an old server that ignores SIGTERM": lambda rig: rig.launcher.servers[0].signals,
    "waiting for min-healthy": lambda rig: rig.front.routed_to == 4002,
}


@pytest.mark.parametrize("step", STEP_REACHED)
async def test_shutdown_during_an_apply_answers_and_stops_everything(step: str) -> None:
    """SIGTERM mid-apply: the change is answered 503, every server stopped, STOPPED."""
    rig = Rig()
    rig.launcher.behave = lambda c: Behaviour(ignores_sigterm=c.get("--model") == "a.gguf",
                                              load_s=5.0)
    async with rig:
        await rig.until_state("RUNNING")
        record = rig.controller.submit(change(model="b.gguf"))
        await rig.clock.run_until(lambda: STEP_REACHED[step](rig), step)
        await rig.shutdown()
        assert record.outcome is Outcome.UNAVAILABLE
        assert rig.launcher.alive() == [] and rig.state == "STOPPED"
        assert ("close",) in rig.front.calls


async def test_shutdown_closes_the_front_door_before_stopping_servers() -> None:
    """Requests in flight finish (front door drained) before llama-server gets SIGTERM."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        server = rig.active
        await rig.shutdown()
        assert rig.front.calls[-1] == ("close",) and server.signals == ["TERM", "KILL"]
        assert rig.journal[-3:] == [("front", "close"), ("signal", server.pid, "TERM"),
                                    ("signal", server.pid, "KILL")]


async def test_second_signal_kills_a_server_ignoring_sigterm_at_once() -> None:
    """kill_now during a stop that waits for SIGTERM: SIGKILL without waiting the timeout."""
    rig = Rig()
    rig.launcher.behave = lambda c: Behaviour(ignores_sigterm=True)
    async with rig:
        await rig.until_state("RUNNING")
        server = rig.active
        assert rig.task is not None
        rig.task.cancel()
        await rig.clock.run_until(lambda: server.signals == ["TERM"], "SIGTERM sent")
        stopping_since = rig.clock.now
        await rig.controller.kill_now()
        await rig.clock.run_until(rig.task.done, "stopped")
        assert rig.clock.now - stopping_since < 10.0 and server.exited.done()


async def test_status_reports_uptime_and_retry_from_the_clock() -> None:
    """Status times come from the controller's clock, not the wall."""
    async with Rig() as rig:
        await rig.until_state("RUNNING")
        rig.clock.now += 42.0
        status = rig.controller.status()
        assert status.uptime_s == pytest.approx(42.0)
        assert status.retry_in_s is None and status.state == "RUNNING"
