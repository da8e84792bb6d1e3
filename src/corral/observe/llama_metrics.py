"""llama-server's own ``/metrics``, scraped from the active server and re-exported.

Theory of operation
-------------------
When the running config has ``--metrics``, :meth:`LlamaScrape.refresh` fetches the active
server's ``/metrics`` (asynchronously, with a short timeout: with ``--listen`` that is its
private loopback port) before each exposition is written; it is parsed with
``prometheus_client.parser`` and re-exported with a ``model`` label (the model file's stem).
llama-server's counters start from zero with every server; :func:`carry_forward` keeps each
re-exported counter growing across restarts: per series, an offset (the sum of the last
values seen from the servers before) is added to what the current server says. A new server
is recognised by its (pid, generation) or by a value that went down. So ``rate()`` never
sees a false reset; what a dying server counted after the last scrape is lost, as it would
be without Corral.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from corral.core.args import host_of, port_of

if TYPE_CHECKING:
    import httpx
    from prometheus_client.metrics_core import Metric

    from corral.supervisor.seams import RunningServer

__all__ = ["Carry", "LlamaExport", "LlamaScrape", "carry_forward", "metrics_enabled",
           "model_of"]

log = logging.getLogger("corral.observe")

SCRAPE_TIMEOUT_S = 0.5


class LlamaScrape:
    """llama-server's metrics as of the last :meth:`refresh`, counters carried forward."""

    def __init__(self, timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.export = LlamaExport()
        self._http: httpx.AsyncClient | None = None

    async def refresh(self, active: RunningServer | None) -> None:
        """Fetch ``active``'s ``/metrics`` when its config has ``--metrics``."""
        if active is None:  # between servers: the counters stay, at their last values
            self.export.no_scrape(self.export.model)
            return
        if not metrics_enabled(active.config.get("--metrics"), dict(active.config.env)):
            self.export.no_scrape(None)
            return
        model = model_of(active.config)
        url = f"http://{host_of(active.config)}:{port_of(active.config)}/metrics"
        try:
            response = await self._client().get(url)
            response.raise_for_status()
            text = response.text
        except Exception as exc:  # noqa: BLE001 - a scrape must answer whatever llama-server does
            log.debug("llama-server metrics at %s: %s", url, exc)
            self.export.no_scrape(model)
            return
        self.export.update(text, (active.pid, active.generation), model)

    def families(self) -> Sequence[Metric]:
        return self.export.families()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


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
