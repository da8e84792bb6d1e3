"""``GET /metrics``: the supervisor, the front door, the fleet and llama-server's own metrics,
in Prometheus' text format.

Theory of operation
-------------------
:class:`Metrics` is built at start-up and listens to the
:class:`~corral.observe.events.EventBus` from the first event on. What it counts from events
(applies by outcome: ``change`` events, and ``refused`` ones for changes the API refused
before they joined a batch; restarts by reason; apply and model-load durations; rollout
steps) is kept in plain counters and fixed-bucket tallies, so building it imports nothing.
``prometheus_client`` is imported at the first scrape (:meth:`Metrics.render`): its own
:class:`CollectorRegistry` (never the global one) holds one custom collector that turns the
tallies and a fresh :class:`~corral.supervisor.status.Status` into metric families, and
``generate_latest`` writes the exposition.

llama-server's own ``/metrics`` (when the running config has ``--metrics``) is fetched by
:meth:`Metrics.render` before the collector runs (asynchronously, with a short timeout, from
the active server: with ``--listen`` that is its private loopback port), parsed with
``prometheus_client.parser`` and re-exported with a ``model`` label (the model file's stem).
llama-server's counters start from zero with every server; :func:`carry_forward` keeps each
re-exported counter growing across restarts: per series, an offset (the sum of the last
values seen from the servers before) is added to what the current server says. A new server
is recognised by its (pid, generation) or by a value that went down. So ``rate()`` never
sees a false reset; what a dying server counted after the last scrape is lost, as it would
be without Corral.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from corral.core.args import host_of, port_of
from corral.core.decide import State
from corral.core.steps import Slot
from corral.observe.events import Event, EventBus

if TYPE_CHECKING:
    import httpx
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from corral.supervisor.controller import Controller

__all__ = ["CONTENT_TYPE", "Carry", "Metrics", "RssOf", "Tally", "carry_forward"]

log = logging.getLogger("corral.observe")

# The 0.0.4 text format generate_latest writes (prometheus_client's CONTENT_TYPE_LATEST
# names the 1.0.0 one in recent versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 0.5
OUTCOMES = ("applied", "rejected", "not_stored", "unavailable", "superseded")
REASONS = ("crash", "hang")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
FRONT_FAILURES = ("held_overflow", "hold_timeout", "refused", "bad_gateway", "bad_request")
ROLLOUT_PHASES = ("canary", "rolling", "done", "failed")
ROLLOUT_STEPS = ("start", "promote", "finish", "fail", "revert", "reopen")
APPLY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = APPLY_BUCKETS


# ---- carrying llama-server's counters across restarts (pure) -------------------------------


@dataclass(frozen=True)
class Carry:
    """One re-exported counter series: what the servers before the current one counted
    (``offset``), the current server and the last value it reported."""

    offset: float
    server: Hashable
    last: float

    @property
    def value(self) -> float:
        return self.offset + self.last


def carry_forward(prev: Carry | None, server: Hashable, value: float) -> Carry:
    """The series after ``server`` reported ``value``; ``.value`` is what to export.

    A new server (another identity) or a value below the last one (the same identity
    restarted, or the counter was reset) starts a new segment: the last value seen is added
    to the offset. A negative or NaN value counts as 0, so the export never goes down.
    """
    value = value if value > 0 else 0.0  # NaN > 0 is False
    if math.isinf(value):
        value = prev.last if prev is not None else 0.0
    if prev is None:
        return Carry(0.0, server, value)
    if server != prev.server or value < prev.last:
        return Carry(prev.offset + prev.last, server, value)
    return Carry(prev.offset, server, value)


# ---- tallies fed by events -----------------------------------------------------------------


@dataclass
class Tally:
    """A histogram's buckets (upper bounds, ``+Inf`` implied), per-bucket counts and sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, ``+Inf`` last: what HistogramMetricFamily takes."""
        out, total = [], 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            total += count
            out.append(("+Inf" if math.isinf(bound) else _float(bound), float(total)))
        return out


def _float(x: float) -> str:
    return repr(float(x))


def _label(value: str) -> str:
    return value.replace(" ", "_")


# ---- the class the API serves --------------------------------------------------------------


class Metrics:
    """What ``GET /metrics`` says about ``controller``; listens to ``bus`` from now on."""

    def __init__(self, controller: Controller, bus: EventBus, *,
                 scrape_timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.controller = controller
        self.scrape_timeout_s = scrape_timeout_s
        self.applies: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.restarts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.rollout_steps: dict[str, int] = dict.fromkeys(ROLLOUT_STEPS, 0)
        self.apply_duration = Tally(APPLY_BUCKETS)
        self.model_load = Tally(LOAD_BUCKETS)
        self.llama = LlamaExport()
        self.rss_of = RssOf()
        self._registry: CollectorRegistry | None = None
        self._http: httpx.AsyncClient | None = None
        bus.listen(self.on_event)

    # ---- events -------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        data = event.data
        if event.kind == "change":
            outcome = _label(str(data.get("outcome")))
            self.applies[outcome] = self.applies.get(outcome, 0) + 1
            duration = data.get("duration_s")
            if data.get("restarted") and isinstance(duration, int | float):
                self.apply_duration.observe(float(duration))
        elif event.kind == "refused":  # the API refused it before it joined a batch
            self.applies["rejected"] += 1
        elif event.kind == "crash":
            reason = str(data.get("reason"))
            self.restarts[reason] = self.restarts.get(reason, 0) + 1
        elif event.kind == "ready":
            load = data.get("load_s")
            if isinstance(load, int | float):
                self.model_load.observe(float(load))
        elif event.kind == "rollout":
            step = _label(str(data.get("step")))
            self.rollout_steps[step] = self.rollout_steps.get(step, 0) + 1

    # ---- scraping -----------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        """Created (and prometheus_client imported) at the first use."""
        if self._registry is None:
            from prometheus_client.registry import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
        return self._registry

    async def render(self) -> bytes:
        """The exposition (text format 0.0.4), llama-server's own metrics fetched first."""
        from prometheus_client.exposition import generate_latest

        await self.refresh_llama()
        return generate_latest(self.registry)

    async def refresh_llama(self) -> None:
        """Fetch the active llama-server's ``/metrics`` when its config has ``--metrics``."""
        active = self.controller.slots.live(Slot.ACTIVE)
        if active is None:  # between servers: the counters stay, at their last values
            self.llama.no_scrape(self.llama.model)
            return
        if not metrics_enabled(active.config.get("--metrics"), dict(active.config.env)):
            self.llama.no_scrape(None)
            return
        model = model_of(active.config)
        url = f"http://{host_of(active.config)}:{port_of(active.config)}/metrics"
        try:
            response = await self._client().get(url)
            response.raise_for_status()
            text = response.text
        except Exception as exc:  # noqa: BLE001 - a scrape must answer whatever llama-server does
            log.debug("llama-server metrics at %s: %s", url, exc)
            self.llama.no_scrape(model)
            return
        self.llama.update(text, (active.pid, active.generation), model)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=self.scrape_timeout_s, trust_env=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- the families, at scrape time ---------------------------------------------------

    def families(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        status = self.controller.status()
        state = GaugeMetricFamily("corral_state", "1 for the supervisor's current state",
                                  labels=["state"])
        for s in State:
            state.add_metric([s.value], 1.0 if s.value == status.state else 0.0)
        yield state
        yield _labelled(CounterMetricFamily, "corral_restarts",
                        "llama-server revivals, by reason (crash: it exited; hang: killed "
                        "after failed liveness probes)", "reason", self.restarts)
        yield _labelled(CounterMetricFamily, "corral_applies",
                        "changes answered, by outcome", "outcome", self.applies)
        yield _histogram(HistogramMetricFamily, "corral_apply_duration_seconds",
                         "POST to outcome of changes that restarted llama-server",
                         self.apply_duration)
        yield _histogram(HistogramMetricFamily, "corral_model_load_seconds",
                         "llama-server start to ready (model load and min-healthy)",
                         self.model_load)
        yield GaugeMetricFamily("corral_changes_pending",
                                "changes waiting in the debounce window",
                                value=status.pending_changes)
        yield GaugeMetricFamily("corral_consecutive_failures",
                                "failed starts in a row", value=status.consecutive_failures)
        yield GaugeMetricFamily("corral_config_generation",
                                "llama-servers started by this supervisor (the active one's "
                                "number)", value=status.generation)
        rss = GaugeMetricFamily("corral_llama_rss_bytes",
                                "resident memory of the active llama-server and its children")
        if status.pid is not None and (taken := self.rss_of(status.pid)) is not None:
            rss.add_metric([], taken)
        yield rss
        if status.front is not None:
            yield from _front(status.front, getattr(self.controller.front, "door", None))
        if status.fleet is not None:
            yield from _fleet(status.fleet, self.rollout_steps)
        yield from self.llama.families()


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


def _labelled(family: Callable[..., Metric], name: str, doc: str, label: str,
              values: Mapping[str, float]) -> Metric:
    metric = family(name, doc, labels=[label])
    for key, value in values.items():
        metric.add_metric([key], float(value))  # type: ignore[attr-defined]
    return metric


def _histogram(family: Callable[..., Metric], name: str, doc: str, tally: Tally) -> Metric:
    return family(name, doc, buckets=tally.cumulative(), sum_value=tally.sum)


class RssOf:
    """RSS of a process and all its descendants. Finding the descendants makes psutil read
    every process's stat (~10 ms): they are looked up again every ``refresh_s`` only."""

    def __init__(self, refresh_s: float = 10.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.refresh_s = refresh_s
        self.clock = clock or time.monotonic
        self._pid: int | None = None
        self._family: list[int] = []
        self._until = 0.0

    def __call__(self, pid: int) -> float | None:
        """Bytes; None if ``pid`` is gone."""
        import psutil

        now = self.clock()
        if pid != self._pid or now >= self._until:
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                return None
            self._pid, self._until = pid, now + self.refresh_s
            self._family = [pid, *(k.pid for k in kids)]
        total = 0
        for i, p in enumerate(self._family):
            try:
                total += psutil.Process(p).memory_info().rss
            except psutil.Error:
                if i == 0:
                    return None
        return float(total)


def _front(front: Mapping[str, Any], door: object) -> Iterator[Metric]:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    requests = {c: 0 for c in STATUS_CLASSES} | dict(front.get("requests_total") or {})
    yield _labelled(CounterMetricFamily, "corral_front_requests",
                    "front-door responses to clients, by status class (its own answers "
                    "included)", "class", requests)
    failed = dict.fromkeys(FRONT_FAILURES, 0) | dict(front.get("failed") or {})
    yield _labelled(CounterMetricFamily, "corral_front_failed",
                    "answers the front door gave itself, by cause", "cause", failed)
    for key, name, doc in (
            ("in_flight", "corral_front_in_flight", "requests forwarded and not yet answered"),
            ("held_now", "corral_front_held_now", "requests waiting for a ready llama-server")):
        yield GaugeMetricFamily(name, doc, value=float(front.get(key) or 0))
    for key, name, doc in (
            ("held_total", "corral_front_held", "requests that had to wait"),
            ("retried", "corral_front_retried",
             "requests sent again after their llama-server failed before answering"),
            ("cut", "corral_front_cut", "responses cut before their end")):
        yield CounterMetricFamily(name, doc, value=float(front.get(key) or 0))
    timings = getattr(door, "timings", None)
    if callable(timings):
        for name, (doc, bounds, counts, total) in timings().items():
            yield _histogram(HistogramMetricFamily, f"corral_front_{name}", doc,
                             Tally(tuple(bounds), list(counts), total))


def _fleet(fleet: Mapping[str, Any], steps: Mapping[str, int]) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    rollout = fleet.get("rollout") or {}
    phase = GaugeMetricFamily("corral_rollout_phase",
                              "1 for the phase of the fleet's current rollout record",
                              labels=["phase"])
    for p in ROLLOUT_PHASES:
        phase.add_metric([p], 1.0 if rollout.get("phase") == p else 0.0)
    yield phase
    revision = rollout.get("revision", fleet.get("revision"))
    rev = GaugeMetricFamily("corral_rollout_revision",
                            "the store revision of the config being rolled out")
    if isinstance(revision, int | float):
        rev.add_metric([], float(revision))
    yield rev
    yield GaugeMetricFamily("corral_fleet_in_sync",
                            "1 when this instance runs the fleet's config",
                            value=1.0 if fleet.get("in_sync", True) else 0.0)
    yield _labelled(CounterMetricFamily, "corral_rollout_steps",
                    "rollout steps this instance carried out, by step", "step", steps)


# ---- llama-server's own metrics ------------------------------------------------------------


def metrics_enabled(flag: object, env: Mapping[str, str]) -> bool:
    on = env.get("LLAMA_ARG_ENDPOINT_METRICS", "").lower() in ("1", "true", "on", "enabled")
    return flag is not None or on


def model_of(config: Any) -> str:
    """The label of a config's model: the model file's stem (the alias, else "unknown")."""
    for key in ("--model", "--alias", "--hf-repo", "--model-url"):
        value = config.get(key)
        if isinstance(value, str) and value:
            return PurePath(value.rstrip("/")).stem or value
    return "unknown"


# "counter"s whose name does not end in _total are not counts (llamacpp:n_tokens_max is the
# largest sequence seen): read as gauges, under their own name, and not carried forward.
_NOT_A_COUNT = re.compile(r"^# TYPE (\S+?)(?<!_total) counter$", re.MULTILINE)

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Series:
    family: str
    doc: str
    labels: dict[str, str]
    carry: Carry


class LlamaExport:
    """llama-server's families from the last scrape, with counters carried forward."""

    def __init__(self) -> None:
        self.series: dict[SeriesKey, _Series] = {}
        self.others: list[Metric] = []  # gauges etc. of the last successful scrape
        self.model: str | None = None

    def update(self, text: str, server: Hashable, model: str) -> None:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        self.model = model
        text = _NOT_A_COUNT.sub(r"# TYPE \1 gauge", text)
        others: list[Metric] = []
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            log.debug("llama-server metrics unreadable: %s", exc)
            families = []
        for fam in families:
            if fam.type == "counter":
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue
                    labels = {**s.labels, "model": model}
                    key = (s.name, tuple(sorted(labels.items())))
                    old = self.series.get(key)
                    carried = carry_forward(old.carry if old else None, server, s.value)
                    self.series[key] = _Series(fam.name, fam.documentation, labels, carried)
                continue
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "model": model}, s.value)
            others.append(out)
        self.others = others

    def no_scrape(self, model: str | None) -> None:
        """Nothing to read now (no server, no --metrics, or it did not answer): the
        counters stay at their last values, the gauges are gone."""
        self.model = model
        self.others = []

    def families(self) -> Sequence[Metric]:
        from prometheus_client.metrics_core import Metric

        counters: dict[str, Metric] = {}
        for (sample, _), series in self.series.items():
            if series.labels.get("model") != self.model:
                continue
            metric = counters.get(series.family)
            if metric is None:
                metric = counters[series.family] = Metric(series.family, series.doc, "counter")
            metric.add_sample(sample, series.labels, series.carry.value)
        return [*counters.values(), *self.others]
