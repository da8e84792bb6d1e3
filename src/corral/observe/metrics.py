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

llama-server's own ``/metrics`` are fetched first and re-exported
(:mod:`corral.observe.llama_metrics`); the RSS of the active server's process tree is read
at scrape time (:class:`corral.sense.rss.RssOf`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.core.decide import State
from corral.observe.events import Event, EventBus
from corral.observe.llama_metrics import SCRAPE_TIMEOUT_S, LlamaScrape
from corral.sense.rss import RssOf

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from corral.supervisor.view import Supervisor

__all__ = ["CONTENT_TYPE", "Metrics", "Tally"]

# The 0.0.4 text format generate_latest writes (prometheus_client's CONTENT_TYPE_LATEST
# names the 1.0.0 one in recent versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("applied", "rejected", "not_stored", "unavailable", "superseded")
REASONS = ("crash", "hang")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
FRONT_FAILURES = ("held_overflow", "hold_timeout", "refused", "bad_gateway", "bad_request")
ROLLOUT_PHASES = ("canary", "rolling", "done", "failed")
ROLLOUT_STEPS = ("start", "promote", "finish", "fail", "revert", "reopen")
APPLY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = APPLY_BUCKETS


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

    def __init__(self, controller: Supervisor, bus: EventBus, *,
                 scrape_timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.controller = controller
        self.applies: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.restarts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.rollout_steps: dict[str, int] = dict.fromkeys(ROLLOUT_STEPS, 0)
        self.apply_duration = Tally(APPLY_BUCKETS)
        self.model_load = Tally(LOAD_BUCKETS)
        self.llama = LlamaScrape(scrape_timeout_s)
        self.rss_of = RssOf()
        self._registry: CollectorRegistry | None = None
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

        await self.llama.refresh(self.controller.active_server())
        return generate_latest(self.registry)

    async def aclose(self) -> None:
        await self.llama.aclose()

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


