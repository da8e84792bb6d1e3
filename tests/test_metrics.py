"""GET /metrics in-process: the controller on fakes (tests/fakes.py) feeds the event bus, the
exposition is parsed back with prometheus_client's parser, and the values must move as the
events say. llama-server's own metrics come from a scripted upstream (tests/front_fakes.py);
the carry-forward of its counters is a pure function, checked with hypothesis too."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psutil
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from corral.api.metrics_routes import CONTENT_TYPE, metrics_router
from corral.core.args import Change, LlamaConfig
from corral.observe.llama_metrics import Carry, LlamaExport, carry_forward, model_of
from corral.observe.metrics import Metrics, Tally
from corral.sense.rss import RssOf
from corral.supervisor.settings import Settings, Startup
from tests.fakes import FAST, Rig, config
from tests.front_fakes import FakeUpstream, Req, client, echo, front, response, upstreams
from tests.harness import wait_for
from tests.waiting import until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def scrape(metrics: Metrics) -> Samples:
    return parse((await metrics.render()).decode())


_made: list[Metrics] = []


def meter(rig: Rig) -> Metrics:
    """Metrics of the rig's controller, closed (its HTTP client) after the test."""
    metrics = Metrics(rig.controller, rig.controller.events)
    _made.append(metrics)
    return metrics


@pytest.fixture(autouse=True)
async def _close_metrics() -> AsyncIterator[None]:
    yield
    while _made:
        await _made.pop().aclose()


def change(**flags: str | None) -> Change:
    return Change(None, tuple((f"--{k}", v) for k, v in flags.items()))


async def settled(rig: Rig, c: Change) -> str:
    record = rig.controller.submit(c)
    await rig.clock.run_until(record.done.done, f"the outcome of {record.id}")
    return record.outcome.value


# ---- the supervisor's own metrics ---------------------------------------------------------


async def test_boot_state_gauges_and_zeroed_counters() -> None:
    """After boot: RUNNING is 1 and every other state 0; every outcome and reason is there at
    0 (so increase() works from the first restart); one model load observed."""
    async with Rig() as rig:
        rig.front.view = lambda: None  # type: ignore[method-assign]  # no front door
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        s = await scrape(metrics)
        states = {dict(k[1])["state"]: v for k, v in s.items() if k[0] == "corral_state"}
        assert states["RUNNING"] == 1 and sum(states.values()) == 1 and len(states) == 8
        for outcome in ("applied", "rejected", "not_stored", "unavailable"):
            assert value(s, "corral_applies_total", outcome=outcome) == 0
        for reason in ("crash", "hang"):
            assert value(s, "corral_restarts_total", reason=reason) == 0
        assert value(s, "corral_model_load_seconds_count") == 1
        assert value(s, "corral_model_load_seconds_sum") == pytest.approx(1.3)
        assert value(s, "corral_model_load_seconds_bucket", le="2.5") == 1
        assert value(s, "corral_model_load_seconds_bucket", le="1.0") == 0
        assert value(s, "corral_config_generation") == 1
        assert value(s, "corral_changes_pending") == 0
        assert value(s, "corral_consecutive_failures") == 0
        # no front door, no fleet, no --metrics: none of their families
        assert not any(k[0].startswith(("corral_front", "corral_rollout", "llamacpp"))
                       for k in s)


async def test_crash_raises_the_crash_counter_by_one() -> None:
    """A crash adds one crash restart, no hang, a second model load and a new generation."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        first = rig.active
        before = await scrape(metrics)
        first.crash(-9)
        await rig.clock.run_until(lambda: rig.state == "RUNNING" and rig.active is not first,
                                  "revival")
        after = await scrape(metrics)
        assert value(after, "corral_restarts_total", reason="crash") == \
            value(before, "corral_restarts_total", reason="crash") + 1
        assert value(after, "corral_restarts_total", reason="hang") == 0
        assert value(after, "corral_model_load_seconds_count") == 2
        assert value(after, "corral_config_generation") == 2


async def test_hang_counts_as_hang() -> None:
    """A server replaced for failing liveness counts as a hang restart, not a crash."""
    settings = Settings(**{**FAST.__dict__, "liveness_interval_s": 2.0})
    async with Rig(settings=settings) as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        hung = rig.active
        hung.behaviour.healthy = False
        await rig.clock.run_until(lambda: rig.active is not hung and rig.state == "RUNNING",
                                  "the hung server replaced")
        s = await scrape(metrics)
        assert value(s, "corral_restarts_total", reason="hang") == 1
        assert value(s, "corral_restarts_total", reason="crash") == 0


async def test_applied_and_rejected_changes() -> None:
    """An applied -np change counts as applied and observes an apply duration; a change the
    pre-flight refuses counts as rejected and observes none."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        rig.checks.bad_models = {"missing.gguf"}
        assert await settled(rig, change(model="missing.gguf")) == "rejected"
        s = await scrape(metrics)
        assert value(s, "corral_applies_total", outcome="rejected") == 1
        assert value(s, "corral_applies_total", outcome="applied") == 0
        assert value(s, "corral_apply_duration_seconds_count") == 0
        submitted = rig.clock.now
        assert await settled(rig, change(parallel="2")) == "applied"
        s = await scrape(metrics)
        assert value(s, "corral_applies_total", outcome="applied") == 1
        assert value(s, "corral_applies_total", outcome="rejected") == 1
        assert value(s, "corral_apply_duration_seconds_count") == 1
        assert value(s, "corral_apply_duration_seconds_sum") == pytest.approx(
            rig.clock.now - submitted, abs=1e-3)  # submit to answer, on the supervisor's clock
        assert value(s, "corral_apply_duration_seconds_bucket", le="+Inf") == 1
        assert value(s, "corral_config_generation") == 2


async def test_a_change_the_api_refused_counts_as_rejected() -> None:
    """The API refuses some changes before they join a batch (an unknown flag, a missing
    model): it emits a "refused" event for them."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        rig.controller.events.emit("refused", client="127.0.0.1", error="no such flag")
        s = await scrape(metrics)
        assert value(s, "corral_applies_total", outcome="rejected") == 1


async def test_a_change_that_keeps_the_config_observes_no_duration() -> None:
    """An applied change that leaves the config as it was observes no apply duration."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        assert await settled(rig, change(model="a.gguf")) == "applied"
        s = await scrape(metrics)
        assert value(s, "corral_applies_total", outcome="applied") == 1
        assert value(s, "corral_apply_duration_seconds_count") == 0


async def test_backoff_shows_consecutive_failures_and_state() -> None:
    """While servers keep exiting, the gauges show the failure streak and the backoff state."""
    from tests.fakes import Behaviour

    async with Rig() as rig:
        rig.launcher.behave = lambda c: Behaviour(load_s=0.1, outcome="exit")
        metrics = meter(rig)
        await rig.clock.run_until(lambda: rig.controller.history.consecutive_failures == 2,
                                  "two failures")
        s = await scrape(metrics)
        assert value(s, "corral_consecutive_failures") == 2
        assert value(s, "corral_state", state=rig.state) == 1
        assert value(s, "corral_model_load_seconds_count") == 0


async def test_llama_rss_of_a_live_pid_and_none_for_a_gone_one() -> None:
    """The fake servers' pids are not processes: no sample. A real pid: its RSS."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        rig.active.pid = 2 ** 22 + 7  # beyond pid_max's default: no such process
        s = await scrape(metrics)
        assert not any(k[0] == "corral_llama_rss_bytes" for k in s)
        rig.active.pid = os.getpid()  # this test's own process: a real one
        s = await scrape(metrics)
        assert 1 << 20 < value(s, "corral_llama_rss_bytes") < 1 << 32


def test_rss_counts_the_children_and_looks_them_up_again_later() -> None:
    """RssOf sums a process and its children, refreshes them later, and is None once gone."""
    now = [0.0]
    rss = RssOf(refresh_s=10.0, clock=lambda: now[0])
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        wait_for(lambda: len(psutil.Process(proc.pid).children()) == 1, 10, "the child")
        alone = psutil.Process(proc.pid).memory_info().rss
        assert (rss(proc.pid) or 0) > alone  # the sleep's RSS too
        assert len(rss._family) == 2
        late = subprocess.Popen(["sleep", "60"])  # not a child of proc: never counted
        now[0] = 11.0
        rss(proc.pid)
        assert late.pid not in rss._family and len(rss._family) == 2
        late.kill()
        late.wait()
    finally:
        for child in psutil.Process(proc.pid).children():
            child.kill()
        proc.kill()
        proc.wait()
    assert rss(proc.pid) is None


# ---- front door and fleet -----------------------------------------------------------------


async def test_front_door_counters_and_histograms() -> None:
    """With a real front door: requests by class, held ones, the request-duration and
    held-time histograms the door keeps, timed on a clock the test moves."""
    clock = StepClock()
    async with upstreams(echo) as [up], front() as d:
        door = d.door
        door.timing.clock = clock
        async with Rig() as rig:
            rig.front.door = door  # type: ignore[attr-defined]
            rig.front.view = lambda: _front_view(door)  # type: ignore[method-assign]
            metrics = meter(rig)
            await rig.until_state("RUNNING")
            async with client(d) as c:
                held = asyncio.ensure_future(c.get("/held"))
                await until(lambda: door.stats().held_now == 1, 5.0, "one held", interval=0.001)
                s = await scrape(metrics)
                assert value(s, "corral_front_held_now") == 1
                clock.now += 0.06
                door.route_to(up.upstream)
                assert (await held).status_code == 200
                for _ in range(3):
                    assert (await c.get("/x")).status_code == 200
            door.refuse("closed for the test")
            async with client(d) as c:
                assert (await c.get("/refused")).status_code == 503
            s = await scrape(metrics)
        assert value(s, "corral_front_requests_total", **{"class": "2xx"}) == 4
        assert value(s, "corral_front_requests_total", **{"class": "5xx"}) == 1
        assert value(s, "corral_front_requests_total", **{"class": "4xx"}) == 0
        assert value(s, "corral_front_failed_total", cause="refused") == 1
        assert value(s, "corral_front_held_total") == 1
        assert value(s, "corral_front_held_now") == 0
        assert value(s, "corral_front_retried_total") == 0
        assert value(s, "corral_front_cut_total") == 0
        assert value(s, "corral_front_in_flight") == 0
        assert value(s, "corral_front_request_duration_seconds_count") == 5
        assert value(s, "corral_front_request_duration_seconds_sum") == pytest.approx(0.06)
        assert value(s, "corral_front_held_seconds_count") == 1
        assert value(s, "corral_front_held_seconds_sum") == pytest.approx(0.06)
        assert value(s, "corral_front_held_seconds_bucket", le="0.01") == 0
        assert value(s, "corral_front_held_seconds_bucket", le="+Inf") == 1


class StepClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def _front_view(door: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(door.stats())


async def test_a_client_that_leaves_while_held_leaves_no_timing_behind() -> None:
    """A client cancelled while held leaves no pending timing and no request duration."""
    async with front() as d:
        async with client(d) as c:
            task = asyncio.ensure_future(c.get("/held"))
            await until(lambda: d.door.stats().held_now == 1, 5.0, "one held", interval=0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await until(lambda: d.door.stats().held_now == 0, 5.0, "none held", interval=0.001)
        assert d.door.timing.pending == 0
        timings = d.door.timings()
        assert timings["held_seconds"][2][-1] + sum(timings["held_seconds"][2][:-1]) == 1
        assert sum(timings["request_duration_seconds"][2]) == 0


async def test_fleet_rollout_phase_and_revision() -> None:
    """Rollout phase, revision, sync and steps are exported; no phase is set once it ends."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        rig.controller.fleet = {"in_sync": False, "revision": 41,
                                "rollout": {"phase": "canary", "revision": 42}}
        rig.controller.events.emit("rollout", step="start", revision=42, phase="canary",
                                   canary="me", by="me")
        s = await scrape(metrics)
        assert value(s, "corral_rollout_phase", phase="canary") == 1
        assert value(s, "corral_rollout_phase", phase="done") == 0
        assert value(s, "corral_rollout_revision") == 42
        assert value(s, "corral_fleet_in_sync") == 0
        assert value(s, "corral_rollout_steps_total", step="start") == 1
        rig.controller.fleet = {"in_sync": True, "revision": 42, "rollout": None}
        s = await scrape(metrics)
        assert sum(v for k, v in s.items() if k[0] == "corral_rollout_phase") == 0
        assert value(s, "corral_rollout_revision") == 42


# ---- llama-server's own metrics -----------------------------------------------------------


LLAMA_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {prompt}
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max {largest}
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing {busy}
"""


class Scripted:
    """A llama-server stand-in whose /metrics says what the test sets."""

    def __init__(self) -> None:
        self.values = {"prompt": 0, "largest": 0, "busy": 0}
        self.up = FakeUpstream(self.handle)
        self.fail = False

    async def handle(self, req: Req, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        if self.fail:
            writer.write(response(500, b"no"))
        else:
            writer.write(response(200, LLAMA_METRICS.format(**self.values).encode(),
                                  {"Content-Type": "text/plain; version=0.0.4"}))
        return True


@pytest.fixture
async def llama() -> AsyncIterator[Scripted]:
    s = Scripted()
    await s.up.start()
    yield s
    await s.up.stop()


def metrics_config(port: int, model: str = "/models/gemma-3.Q4.gguf") -> LlamaConfig:
    return LlamaConfig("/usr/bin/llama-server",
                       (("--model", model), ("--port", str(port)), ("--metrics", True)))


async def test_llama_metrics_are_re_exported_with_a_model_label(llama: Scripted) -> None:
    """llama-server metrics are re-exported with a model label; non-_total counters as gauges."""
    async with Rig(Startup(metrics_config(llama.up.port), persist_when_ready=False)) as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        llama.values.update(prompt=10, largest=7, busy=1)
        s = await scrape(metrics)
        assert value(s, "llamacpp:prompt_tokens_total", model="gemma-3.Q4") == 10
        assert value(s, "llamacpp:requests_processing", model="gemma-3.Q4") == 1
        # a "counter" not named _total is a maximum: a gauge under its own name
        assert value(s, "llamacpp:n_tokens_max", model="gemma-3.Q4") == 7
        text = (await metrics.render()).decode()
        assert "# TYPE llamacpp:prompt_tokens_total counter" in text
        assert "# TYPE llamacpp:n_tokens_max gauge" in text


async def test_llama_counters_never_go_down_across_restarts(llama: Scripted) -> None:
    """llama-server's counters restart from 0 with each server; the re-export carries the
    last value of the previous server forward, while the gauges say what is true now."""
    async with Rig(Startup(metrics_config(llama.up.port), persist_when_ready=False)) as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        llama.values.update(prompt=100, busy=2)
        assert value(await scrape(metrics), "llamacpp:prompt_tokens_total",
                     model="gemma-3.Q4") == 100
        first = rig.active
        first.crash(-9)
        # while no server answers, the counter stays and the gauge is gone
        llama.fail = True
        s = await scrape(metrics)
        assert value(s, "llamacpp:prompt_tokens_total", model="gemma-3.Q4") == 100
        assert not any(k[0] == "llamacpp:requests_processing" for k in s)
        await rig.clock.run_until(lambda: rig.state == "RUNNING" and rig.active is not first,
                                  "revival")
        llama.fail = False
        llama.values.update(prompt=5, busy=0)
        s = await scrape(metrics)
        assert value(s, "llamacpp:prompt_tokens_total", model="gemma-3.Q4") == 105
        assert value(s, "llamacpp:requests_processing", model="gemma-3.Q4") == 0
        llama.values.update(prompt=30)
        assert value(await scrape(metrics), "llamacpp:prompt_tokens_total",
                     model="gemma-3.Q4") == 130
        # the same server whose counter went down (restarted behind our back): carried too
        llama.values.update(prompt=1)
        assert value(await scrape(metrics), "llamacpp:prompt_tokens_total",
                     model="gemma-3.Q4") == 131


async def test_no_metrics_flag_no_scrape(llama: Scripted) -> None:
    """Without --metrics, llama-server is never scraped and no llamacpp series appear."""
    startup = Startup(config(port=str(llama.up.port)), persist_when_ready=False)
    async with Rig(startup) as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        s = await scrape(metrics)
        assert not any(k[0].startswith("llamacpp:") for k in s)
        assert llama.up.requests == []


async def test_another_model_gets_its_own_series(llama: Scripted) -> None:
    """After a model change, llama metrics carry the new model's label and the old one's go."""
    async with Rig(Startup(metrics_config(llama.up.port, "/m/a.gguf"),
                           persist_when_ready=False)) as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        llama.values.update(prompt=50)
        await scrape(metrics)
        assert await settled(rig, change(model="/m/b.gguf")) == "applied"
        llama.values.update(prompt=3)
        s = await scrape(metrics)
        assert value(s, "llamacpp:prompt_tokens_total", model="b") == 3
        assert ("llamacpp:prompt_tokens_total", frozenset({("model", "a")})) not in s


def test_unreadable_llama_metrics_keep_the_counters() -> None:
    """An unparseable llama /metrics keeps the last counter values."""
    export = LlamaExport()
    export.update("# TYPE x_total counter\nx_total 4\n", (1, 1), "m")
    export.update("this is { not prometheus\n", (1, 1), "m")
    (family,) = export.families()
    assert family.samples[0].value == 4


def test_model_label() -> None:
    """The model label is the model file's stem, the --hf-repo name, or unknown."""
    assert model_of(config("/models/llama-3-8b.Q4_K_M.gguf")) == "llama-3-8b.Q4_K_M"
    assert model_of(LlamaConfig("x", ())) == "unknown"
    assert model_of(LlamaConfig("x", (("--hf-repo", "ggml-org/gemma-3-1b-it-GGUF"),))) \
        == "gemma-3-1b-it-GGUF"


# ---- carry-forward (pure) -----------------------------------------------------------------


def test_carry_forward_examples() -> None:
    """A new server or a drop adds the last value to the carry; NaN and negatives change nothing."""
    c = carry_forward(None, "a", 10)
    assert c == Carry(0, "a", 10) and c.value == 10
    c = carry_forward(c, "a", 12)
    assert c.value == 12
    c = carry_forward(c, "b", 3)  # a new server
    assert c == Carry(12, "b", 3) and c.value == 15
    c = carry_forward(c, "b", 1)  # the same identity, value went down: a reset
    assert c == Carry(15, "b", 1) and c.value == 16
    c = carry_forward(c, "b", float("nan"))
    assert c.value == 16
    c = carry_forward(c, "c", -4)
    assert c.value == 16


@given(st.lists(st.tuples(st.integers(0, 3),
                          st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                    st.integers(0, 10 ** 6).map(float))),
                max_size=60))
def test_carried_counter_is_monotonic(scrapes: list[tuple[int, float]]) -> None:
    """Whatever the sequence of servers and values, the export never decreases."""
    carry: Carry | None = None
    exported = 0.0
    for server, raw in scrapes:
        carry = carry_forward(carry, server, raw)
        assert not math.isnan(carry.value) and carry.value >= exported
        exported = carry.value


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=30))
def test_one_server_exports_what_it_says(values: list[int]) -> None:
    """With one server whose counter only grows, the export is its value, unchanged."""
    carry = None
    for v in sorted(values):
        carry = carry_forward(carry, "only", float(v))
        assert carry.value == v


@given(st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=10), min_size=1,
                max_size=10))
def test_restarts_add_up(servers: list[list[int]]) -> None:
    """Each server counting up from 0: the export is the sum of each server's last value."""
    carry = None
    for n, values in enumerate(servers):
        for v in sorted(values):
            carry = carry_forward(carry, n, float(v))
    assert carry is not None
    assert carry.value == sum(max(values) for values in servers)


def test_tally_buckets_are_cumulative() -> None:
    """A Tally's buckets count every observation at or below their bound, plus +Inf and sum."""
    t = Tally((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        t.observe(v)
    assert t.cumulative() == [("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)]
    assert t.sum == 6.0


# ---- the route and the lazy import --------------------------------------------------------


async def test_route_serves_the_text_format() -> None:
    """GET /metrics answers 200 in the Prometheus text format with the current state."""
    async with Rig() as rig:
        metrics = meter(rig)
        await rig.until_state("RUNNING")
        app = FastAPI()
        app.include_router(metrics_router(lambda: metrics))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == CONTENT_TYPE
        assert value(parse(r.text), "corral_state", state="RUNNING") == 1


def test_prometheus_client_is_imported_only_at_the_first_scrape() -> None:
    """prometheus_client is not imported until the metrics registry is first used."""
    code = (
        "import sys, asyncio\n"
        "import corral.api.metrics_routes, corral.observe.metrics\n"
        "from corral.observe.events import EventBus\n"
        "from corral.observe.metrics import Metrics\n"
        "class C: pass\n"
        "m = Metrics(C(), EventBus())\n"
        "assert not [n for n in sys.modules if n.startswith('prometheus_client')]\n"
        "m.registry\n"
        "assert 'prometheus_client' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
