"""corral serve with the real llama-server and the real model under two names (alpha, beta).

Issue 23's workload with room for one model (by count, then by memory), two models that fit
together, a pinned model, an unknown model, and the issue's "done when": the ``openai``
client asking for each model by name in turn and ``corral status`` telling which is loaded.
What runs is read from ``/proc`` (:class:`tests.serve_workload.ResidentWatch`, every 50 ms)
and from ``GET /v1/status``; the fake llama-server's side is in ``test_serve.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness import wait_for, wait_gone
from tests.serve_helpers import ServeProcess, model_table, serving
from tests.serve_workload import ResidentWatch, Workload, per_model, percentile

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(420)]

SECONDS = 20.0
MAX_WAIT_S = 5.0
TICKS_S = 0.5  # the scheduler looks every 0.1 s; two hops of the proxy and the probes


def named_copies(tmp: Path, real_model: Path, *names: str) -> Path:
    """A directory with ``real_model`` under each name (hardlinks; symlinks across file
    systems)."""
    folder = tmp / "models"
    folder.mkdir(exist_ok=True)
    for name in names:
        path = folder / f"{name}.gguf"
        try:
            os.link(real_model, path)
        except OSError:
            path.symlink_to(real_model)
    return folder


def two_contexts(binary: Path, folder: Path) -> str:
    """alpha and beta with different ``-c``, so their memory estimates differ."""
    return (model_table("alpha", binary, folder / "alpha.gguf", {"-c": 1024, "-np": 2})
            + model_table("beta", binary, folder / "beta.gguf", {"-c": 8192, "-np": 2}))


def openai_client(s: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="none",
                         max_retries=0, timeout=120)


def say_hi(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(model=model, max_tokens=8,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].finish_reason is not None, r
    return r.model


def estimates(tmp: Path, binary: Path, config: str) -> dict[str, float]:
    """memory_mib of every model as ``corral serve`` estimates it (margin included)."""
    (tmp / "estimate").mkdir()
    with serving(tmp / "estimate", binary, config=config) as s:
        rows = wait_for(lambda: [m for m in s.status()["models"] if m["memory_mib"]]
                        if all(m["memory_mib"] for m in s.status()["models"]) else None,
                        120, "both estimates in /v1/status")
        assert s.stop() == 0
    return {m["id"]: float(m["memory_mib"]) for m in rows}


# ---- room for one ------------------------------------------------------------------------

def check_room_for_one(s: ServeProcess, binary: Path) -> dict[str, Any]:
    """Issue 23's workload for SECONDS; asserts and returns the figures."""
    assert s.proc is not None
    with ResidentWatch(s.proc.pid, binary) as watch:
        workload = Workload(f"http://127.0.0.1:{s.port}", timeout=180)
        outcomes = workload.run_for(SECONDS)
    status = s.status()
    served = per_model(outcomes, workload.started, workload.stopped)
    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} failed: {failures[:3]}"
    assert set(served) == {"alpha", "beta"} and all(m["served"] for m in served.values())
    loads = {m["id"]: m for m in status["models"]}
    load_s = max(x for m in loads.values() for x in m["load_seconds"])
    busy = [o.seconds for o in outcomes if o.model == "alpha"]
    service_s = percentile(busy, 90) or 0.0  # a drain, and the request's own service
    bound = MAX_WAIT_S + service_s + load_s + service_s + TICKS_S
    figures = {"served": served, "bound_s": round(bound, 2), "load_s": load_s,
               "service_s": round(service_s, 2), "evictions": status["evictions"],
               "watch": watch.summary(), "busy_p50_s": statistics.median(busy)}
    for model, m in served.items():
        assert m["max_ms"] / 1000 <= bound, (model, figures)
        assert m["longest_gap_s"] <= bound, (model, figures)  # served throughout
    assert watch.most == 1, figures  # never two llama-servers at once
    assert len(watch.seen) >= 2 and status["evictions"], figures  # and they did swap
    assert s.stop() == 0
    wait_gone(watch.seen, 30, "every llama-server of corral serve")
    return figures


@pytest.mark.timing
def test_room_for_one_by_count_serves_both_without_failures_or_overlap(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """--max-models 1, issue 23's workload for 20 s: 0 failed, both models served
    throughout, no wait above max-wait + drain + load, never two servers at once."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    with serving(tmp_path, real_binary, models_dir=folder, llama_args=["-c", "2048", "-np", "2"],
                 extra=["--max-models", "1", "--max-wait", f"{MAX_WAIT_S:g}",
                        "--quiet-llama"]) as s:
        figures = check_room_for_one(s, real_binary)
    assert {e["reason"] for e in figures["evictions"]} <= {"fairness", "count"}


@pytest.mark.timing
def test_room_for_one_by_memory_serves_both_without_failures_or_overlap(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """--max-memory between the larger estimate and the sum of both (alpha -c 1024, beta
    -c 8192), issue 23's workload for 20 s: 0 failed, both served throughout, no wait above
    max-wait + drain + load, never two servers at once."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    config = two_contexts(real_binary, folder)
    need = estimates(tmp_path, real_binary, config)
    assert need["alpha"] < need["beta"], need
    room = need["beta"] + need["alpha"] / 2  # one fits (either), two do not
    with serving(tmp_path, real_binary, config=config,
                 extra=["--max-memory", f"{room:.0f}MiB", "--max-wait", f"{MAX_WAIT_S:g}",
                        "--quiet-llama"]) as s:
        assert s.status()["limits"]["max_models"] is None
        figures = check_room_for_one(s, real_binary)
    assert {e["reason"] for e in figures["evictions"]} <= {"fairness", "memory"}


# ---- room for two, a pin, an unknown model --------------------------------------------------

def test_two_models_that_fit_together_are_both_resident_and_never_swap(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """No count limit and the host's memory: alpha and beta, asked in turn with the openai
    client, both load once, stay resident side by side (two servers in /proc), no eviction."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    with serving(tmp_path, real_binary, models_dir=folder, llama_args=["-c", "1024"],
                 extra=["--quiet-llama"]) as s:
        assert s.proc is not None
        client = openai_client(s)
        with ResidentWatch(s.proc.pid, real_binary) as watch:
            for model in ("alpha", "beta", "alpha", "beta"):
                assert say_hi(client, model)
            pids = {m: s.model(m)["pid"] for m in ("alpha", "beta")}
            for model in ("alpha", "beta"):
                assert say_hi(client, model)
            assert sorted(watch.resident()) == sorted(pids.values())
        rows = {m["id"]: m for m in s.status()["models"]}
        assert {m: (r["state"], r["loads"], r["pid"]) for m, r in rows.items()} == \
            {m: ("loaded", 1, pids[m]) for m in ("alpha", "beta")}
        assert s.status()["evictions"] == []
        assert len(watch.seen) == 2, watch.summary()
        assert s.stop() == 0
    wait_gone(pids.values(), 30, "both llama-servers")


def test_a_pinned_model_is_never_evicted_and_the_other_is_refused_with_the_reason(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """--max-models 1 with alpha pinned and loaded: a request for beta gets 503 at once (not
    after --hold-timeout) naming the pinned model, alpha keeps its server and nothing is
    evicted; once alpha is unloaded by hand, beta's next request loads it."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    config = (model_table("alpha", real_binary, folder / "alpha.gguf", {"-c": 1024},
                          serve="pin = true")
              + model_table("beta", real_binary, folder / "beta.gguf", {"-c": 1024}))
    with serving(tmp_path, real_binary, config=config,
                 extra=["--max-models", "1", "--hold-timeout", "300", "--quiet-llama"]) as s:
        assert s.api.post("/v1/models/alpha/load").status_code == 200
        wait_for(lambda: s.model("alpha")["state"] == "loaded", 120, "alpha loaded")
        assert s.complete("alpha", n_predict=4).status_code == 200
        pid = s.model("alpha")["pid"]
        started = time.monotonic()
        r = s.complete("beta", n_predict=4)
        assert r.status_code == 503, r.text
        assert "beside the pinned model(s) alpha" in r.text and r.headers.get("retry-after")
        assert time.monotonic() - started < 60  # judged, not timed out (--hold-timeout 300)
        alpha, beta = s.model("alpha"), s.model("beta")
        assert (alpha["state"], alpha["pid"], alpha["pin"]) == ("loaded", pid, True)
        assert (beta["state"], beta["loads"], beta["held"]) == ("failed", 0, 0)
        assert "pinned" in beta["reason"]
        assert s.status()["evictions"] == []
        assert s.complete("alpha", n_predict=4).status_code == 200  # still serving
        assert s.api.post("/v1/models/alpha/unload").status_code == 200
        assert s.complete("beta", n_predict=4).status_code == 200
        assert s.model("beta")["state"] == "loaded"
        assert s.stop() == 0


def test_an_unknown_model_is_an_openai_404_listing_the_ids(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """The openai client naming a model nobody serves gets NotFoundError whose error lists
    alpha and beta, and nothing is loaded for it."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    with serving(tmp_path, real_binary, models_dir=folder, extra=["--quiet-llama"]) as s:
        with pytest.raises(openai.NotFoundError) as caught:
            say_hi(openai_client(s), "gamma")
        body: Any = caught.value.body
        assert body["code"] == "model_not_found" and "alpha, beta" in body["message"], body
        assert {m["id"]: m["state"] for m in s.status()["models"]} == \
            {"alpha": "unloaded", "beta": "unloaded"}


def test_openai_client_asks_for_each_model_in_turn_and_corral_status_shows_the_loaded_one(
        tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """Issue 23's "done when": --models-dir with two GGUFs and room for one; the openai
    client asks alpha, beta, alpha by name and each answers under that name; `corral status`
    shows the model asked last as loaded and the other unloaded."""
    folder = named_copies(tmp_path, real_model, "alpha", "beta")
    with serving(tmp_path, real_binary, models_dir=folder, llama_args=["-c", "1024"],
                 extra=["--max-models", "1", "--quiet-llama"]) as s:
        client = openai_client(s)
        for model in ("alpha", "beta", "alpha"):
            assert say_hi(client, model) == model  # answered as the id asked (--alias)
            wait_for(lambda m=model: s.model(m)["state"] == "loaded", 30, f"{model} loaded")
        out = subprocess.run([sys.executable, "-m", "corral", "status", "--supervisor-addr",
                              f"127.0.0.1:{s.api_port}"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        table = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]
                 if line.split()}
        assert table["alpha"][1] == "loaded" and table["alpha"][2] == str(s.model("alpha")["pid"])
        assert table["beta"][1] == "unloaded", out.stdout
        assert (s.model("alpha")["loads"], s.model("beta")["loads"]) == (2, 1)
        assert s.stop() == 0
