"""GET /metrics on a real ``corral supervise``: the fake llama-server (fast), then the real one
with ``--metrics``. Each test scrapes, does one thing, scrapes again, and checks with
prometheus_client's parser that exactly what should move moved."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import FAKE, SupervisorProcess, make_fake_model, props, supervisor, wait_for

pytestmark = [pytest.mark.slow]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(sup: SupervisorProcess) -> Samples:
    r = sup.http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "a.gguf")


def test_a_kill_raises_the_crash_counter_by_one(tmp_path: Path, model: Path) -> None:
    """A SIGKILLed llama-server adds one crash restart, one model load and a generation."""
    with supervisor(tmp_path, FAKE, model) as sup:
        pid = sup.wait_running()["pid"]
        before = scrape(sup)
        assert value(before, "corral_state", state="RUNNING") == 1
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.status()["restarts"] == 1 and sup.status()["state"] == "RUNNING",
                 30, "the revival")
        after = scrape(sup)
        for reason, moved in (("crash", 1), ("hang", 0)):
            assert value(after, "corral_restarts_total", reason=reason) == \
                value(before, "corral_restarts_total", reason=reason) + moved
        assert value(after, "corral_model_load_seconds_count") == \
            value(before, "corral_model_load_seconds_count") + 1
        assert value(after, "corral_config_generation") == 2
        assert value(after, "corral_llama_rss_bytes") > 1 << 20


def test_a_rejected_change_raises_the_rejected_counter(tmp_path: Path, model: Path) -> None:
    """A change refused with 422 counts one rejection and observes no apply duration."""
    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        before = scrape(sup)
        r = sup.post({"-m": str(tmp_path / "missing.gguf")})
        assert r.status_code == 422 and r.json()["status"] == "rejected", r.text
        after = scrape(sup)
        assert value(after, "corral_applies_total", outcome="rejected") == \
            value(before, "corral_applies_total", outcome="rejected") + 1
        assert value(after, "corral_applies_total", outcome="applied") == \
            value(before, "corral_applies_total", outcome="applied")
        assert value(after, "corral_apply_duration_seconds_count") == \
            value(before, "corral_apply_duration_seconds_count")


def test_an_applied_change_counts_and_observes_its_duration(tmp_path: Path,
                                                            model: Path) -> None:
    """An applied restart counts one apply and observes its real duration, 0.2-30 s."""
    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        before = scrape(sup)
        r = sup.post({"-np": 2})
        assert r.status_code == 200 and r.json()["restarted"], r.text
        after = scrape(sup)
        assert value(after, "corral_applies_total", outcome="applied") == \
            value(before, "corral_applies_total", outcome="applied") + 1
        assert value(after, "corral_apply_duration_seconds_count") == \
            value(before, "corral_apply_duration_seconds_count") + 1
        took = value(after, "corral_apply_duration_seconds_sum") - \
            value(before, "corral_apply_duration_seconds_sum")
        assert 0.2 <= took < 30  # at least the debounce window, on the real clock
        assert value(after, "corral_config_generation") == 2
        assert value(after, "corral_changes_pending") == 0


def test_fake_llama_metrics_carried_across_a_kill(tmp_path: Path, model: Path) -> None:
    """The fake's counter (GET /props served) is re-exported with model="a"; after a
    SIGKILL the new server counts from 0 again and the re-export keeps growing."""
    with supervisor(tmp_path, FAKE, model, ["--metrics"]) as sup:
        pid = sup.wait_running()["pid"]
        series = ("llamacpp:prompt_tokens_total", frozenset({("model", "a")}))
        first = scrape(sup)[series]
        for _ in range(3):
            props(sup.port)
        assert scrape(sup)[series] == first + 3
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.status()["restarts"] == 1 and sup.status()["state"] == "RUNNING",
                 30, "the revival")
        props(sup.port)
        after = scrape(sup)
        assert after[series] >= first + 3 + 1
        assert value(after, "llamacpp:requests_processing", model="a") == 0


@pytest.mark.real
@pytest.mark.slow
def test_real_llama_metrics_are_re_exported_and_never_decrease(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """The real llama-server with --metrics: its counters carry a model label and do not go
    down after a kill -9 of llama-server."""
    stem = real_model.stem
    with supervisor(tmp_path, real_binary, real_model, ["--metrics", "-c", "512"]) as sup:
        pid = sup.wait_running(180)["pid"]
        url = f"http://127.0.0.1:{sup.port}/completion"
        r = httpx.post(url, json={"prompt": "Hello", "n_predict": 4}, timeout=120)
        assert r.status_code == 200, r.text
        before = scrape(sup)
        counters = {k: v for k, v in before.items()
                    if k[0].startswith("llamacpp:") and k[0].endswith("_total")}
        assert counters, sorted(k[0] for k in before)
        assert all(dict(k[1]).get("model") == stem for k in counters)
        tokens = ("llamacpp:tokens_predicted_total", frozenset({("model", stem)}))
        assert counters[tokens] >= 4
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.status()["restarts"] == 1 and sup.status()["state"] == "RUNNING",
                 180, "the revival")
        after = scrape(sup)
        for key, was in counters.items():
            assert after[key] >= was, key
        r = httpx.post(url, json={"prompt": "Hello", "n_predict": 4}, timeout=120)
        assert r.status_code == 200, r.text
        again = scrape(sup)
        assert again[tokens] >= counters[tokens] + 4  # the old server's count carried
        assert value(again, "corral_restarts_total", reason="crash") == 1
