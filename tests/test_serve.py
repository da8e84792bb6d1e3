"""corral serve with the fake llama-server: the scheduler's edge cases, fast and exact.

Each test runs ``corral serve`` as a user would (a subprocess, a catalog file) with fake
llama-servers whose misbehaviours are flags of their own (slow load, exit at start), and
checks what clients get and what the status says. The real llama-server's side is in
``test_serve_real.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import FAKE, make_fake_model, wait_for, wait_gone
from tests.serve_helpers import model_table, serving

pytestmark = pytest.mark.timeout(120)


def catalog(tmp: Path, *tables: tuple[str, dict[str, object], str]) -> str:
    return "".join(model_table(name, FAKE, make_fake_model(tmp / f"{name}.gguf"), args, serve)
                   for name, args, serve in tables)


def test_unknown_model_is_an_openai_404_listing_the_ids(tmp_path: Path) -> None:
    """A model nobody serves: 404 in the OpenAI error format naming every id; no model in
    the request: 400; /v1/models lists both with their state."""
    config = catalog(tmp_path, ("alpha", {}, ""), ("beta", {}, 'aliases = ["b"]'))
    with serving(tmp_path, FAKE, config=config) as s:
        r = s.complete("gamma")
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "alpha, beta" in error["message"]
        assert s.client.post("/completion", json={"prompt": "x"}).status_code == 400
        listing = s.client.get("/v1/models").json()
        assert [(m["id"], m["state"]) for m in listing["data"]] == \
            [("alpha", "unloaded"), ("beta", "unloaded")]
        assert listing["data"][1]["aliases"] == ["b"]
        assert s.starts(".gguf") == 0  # nothing loaded for a 404 or a listing


def test_twenty_simultaneous_first_requests_load_the_model_once(tmp_path: Path) -> None:
    """20 first requests at once for a model that takes 1 s to load: one llama-server
    start, 20 answers 200, held meanwhile, then 'loaded'; SIGTERM stops it and exits 0."""
    config = catalog(tmp_path, ("alpha", {"--fake-load-s": 1}, ""))
    with serving(tmp_path, FAKE, config=config) as s:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: s.complete("alpha"), range(20)))
        assert [r.status_code for r in answers] == [200] * 20
        assert s.starts("alpha.gguf") == 1
        row = s.model("alpha")
        assert row["state"] == "loaded" and row["loads"] == 1 and row["pid"]
        assert s.stop() == 0  # SIGTERM: drained, stopped, exit 0
        wait_gone([row["pid"]], 5, "alpha's llama-server")


def test_with_room_for_one_the_idle_model_gives_way(tmp_path: Path) -> None:
    """--max-models 1: alpha, then beta (alpha idle: evicted for count), then alpha again;
    every request answered, never two servers at once; `corral status` shows which one is
    loaded, like `ollama ps`; /metrics counts loads and evictions by reason."""
    config = catalog(tmp_path, ("alpha", {}, ""), ("beta", {}, ""))
    with serving(tmp_path, FAKE, config=config,
                 extra=["--max-models", "1", "--idle-grace", "0"]) as s:
        for name in ("alpha", "beta", "alpha"):
            r = s.complete(name)
            assert r.status_code == 200, r.text
            loaded = [m["id"] for m in s.status()["models"] if m["state"] == "loaded"]
            assert loaded == [name]
        assert s.evictions() == {("alpha", "count"): 1, ("beta", "count"): 1}
        assert s.starts("alpha.gguf") == 2 and s.starts("beta.gguf") == 1
        shown = subprocess.run(
            [sys.executable, "-m", "corral", "status", "--supervisor-addr",
             f"127.0.0.1:{s.api_port}"], capture_output=True, text=True, timeout=30)
        table = {line.split()[0]: line.split() for line in shown.stdout.splitlines()}
        assert table["MODEL"][:3] == ["MODEL", "STATE", "PID"], shown.stdout
        assert table["alpha"][1:3] == ["loaded", str(s.model("alpha")["pid"])], shown.stdout
        assert table["beta"][1:3] == ["unloaded", "-"], shown.stdout
        metrics = s.api.get("/metrics").text
        for sample in ('corral_serve_evictions_total{model="alpha",reason="count"} 1',
                       'corral_serve_loads_total{model="alpha"} 2',
                       'corral_serve_model_state{model="beta",state="unloaded"} 1',
                       'corral_serve_held{model="alpha"} 0'):
            assert sample in metrics, metrics


def test_a_load_that_fails_answers_its_held_requests_503_with_the_reason(tmp_path: Path
                                                                         ) -> None:
    """A model whose llama-server exits at start: backoff, then FATAL; the held request
    gets 503 with the reason (never a 500); /v1/models says failed, with the reason; the
    other model still serves."""
    config = catalog(tmp_path, ("broken", {"--fake-exit-at-start": 3}, ""), ("fine", {}, ""))
    with serving(tmp_path, FAKE, config=config, extra=["--max-start-failures", "2"]) as s:
        r = s.complete("broken")
        assert r.status_code == 503, r.text
        assert "exited with code 3" in r.text and r.headers.get("retry-after")
        listing = {m["id"]: m for m in s.client.get("/v1/models").json()["data"]}
        assert listing["broken"]["state"] == "failed"
        assert "exited with code 3" in listing["broken"]["reason"]
        assert s.complete("fine").status_code == 200
        assert s.complete("broken").status_code == 503  # refused at once, not re-tried


def test_ttl_unloads_an_idle_model_and_a_request_loads_it_again(tmp_path: Path) -> None:
    """ttl = 1: idle for a second, the model is unloaded (eviction ttl); the next request
    loads it again and is answered."""
    config = catalog(tmp_path, ("alpha", {}, "ttl = 1"))
    with serving(tmp_path, FAKE, config=config) as s:
        assert s.complete("alpha").status_code == 200
        wait_for(lambda: s.model("alpha")["state"] == "unloaded", 10, "unloaded by its ttl")
        assert s.evictions() == {("alpha", "ttl"): 1}
        assert s.complete("alpha").status_code == 200
        assert s.starts("alpha.gguf") == 2


def test_an_unload_lets_a_stream_finish_first(tmp_path: Path) -> None:
    """POST /v1/models/alpha/unload while a 40-event stream runs: the stream ends whole,
    then the model is unloaded."""
    config = catalog(tmp_path, ("alpha", {}, ""))
    with serving(tmp_path, FAKE, config=config) as s:
        assert s.complete("alpha").status_code == 200
        events: list[str] = []
        streaming = threading.Event()

        def read_stream() -> None:
            with s.client.stream("POST", "/completion", json={
                    "model": "alpha", "stream": True, "n_predict": 40}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        streaming.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert streaming.wait(10)
        unloaded = s.api.post("/v1/models/alpha/unload")
        reader.join(30)
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
        assert len(events) == 40 and json.loads(events[-1][6:])["stop"] is True
        assert s.evictions() == {("alpha", "admin"): 1}


def test_a_busy_model_gives_way_after_max_wait_and_nothing_is_lost(tmp_path: Path) -> None:
    """--max-models 1, --max-wait 1: a client keeps alpha busy back to back; a request for
    beta waits about --max-wait (not forever), then alpha's next requests are held for its
    next turn: every request is answered 200."""
    config = catalog(tmp_path, ("alpha", {}, ""), ("beta", {}, ""))
    with serving(tmp_path, FAKE, config=config,
                 extra=["--max-models", "1", "--max-wait", "1"]) as s:
        assert s.complete("alpha").status_code == 200
        stop = threading.Event()
        statuses: list[int] = []

        def keep_alpha_busy() -> None:
            with httpx.Client(base_url=str(s.client.base_url), timeout=60) as c:
                deadline = time.monotonic() + 30
                while not stop.is_set() and time.monotonic() < deadline:
                    statuses.append(c.post("/completion", json={"model": "alpha"}).status_code)

        busy = threading.Thread(target=keep_alpha_busy)
        busy.start()
        try:
            wait_for(lambda: len(statuses) >= 5, 10, "alpha serving")
            began = time.monotonic()
            r = s.complete("beta")
            waited = time.monotonic() - began
            assert r.status_code == 200, r.text
            assert 0.9 <= waited < 10, waited  # --max-wait, then a drain and a load
            wait_for(lambda: s.model("alpha")["state"] == "loaded", 20, "alpha's next turn")
            count = len(statuses)
            wait_for(lambda: len(statuses) >= count + 3, 10, "alpha serving again")
        finally:
            stop.set()
            busy.join(60)
        assert set(statuses) == {200}, statuses
        assert s.evictions().get(("alpha", "fairness")) == 1


def test_sighup_adds_and_removes_models_and_restarts_only_the_changed(tmp_path: Path
                                                                       ) -> None:
    """SIGHUP: a new table becomes a model, a removed one is unloaded and gone, a loaded
    model whose stored config changed restarts with it, an unchanged one keeps its pid."""
    config = catalog(tmp_path, ("alpha", {}, ""), ("beta", {}, ""), ("gone", {}, ""))
    with serving(tmp_path, FAKE, config=config) as s:
        for name in ("alpha", "beta", "gone"):
            assert s.complete(name).status_code == 200
        wait_for(lambda: "[alpha.args]" in s.config_file.read_text(), 5, "stored")
        beta_pid = s.model("beta")["pid"]
        alpha_pid = s.model("alpha")["pid"]
        text = s.config_file.read_text()
        head, _, _ = text.partition("[gone]")
        head = head.replace('[alpha.args]\n', '[alpha.args]\n"-c" = "2048"\n', 1)
        new = catalog(tmp_path, ("delta", {}, ""))
        s.config_file.write_text(head + new)
        assert s.proc is not None
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "gone" not in [m["id"] for m in s.status()["models"]], 10,
                 "'gone' removed")
        wait_for(lambda: s.model("alpha")["pid"] not in (None, alpha_pid), 20,
                 "alpha restarted with -c 2048")
        assert s.model("beta")["pid"] == beta_pid
        assert s.complete("delta").status_code == 200
        assert s.complete("gone").status_code == 404


def test_out_of_memory_at_load_evicts_an_idle_model_and_tries_again(tmp_path: Path) -> None:
    """beta's llama-server fails to allocate while alpha's runs (no limit told Corral):
    alpha, idle, is evicted (reason memory) and beta's start is tried again; the held
    request is answered 200."""
    pids = tmp_path / "alpha.pids"
    config = catalog(tmp_path, ("alpha", {"--fake-pidfile": str(pids)}, ""),
                     ("beta", {"--fake-oom-while": str(pids)}, ""))
    with serving(tmp_path, FAKE, config=config, extra=["--idle-grace", "0"]) as s:
        assert s.complete("alpha").status_code == 200
        r = s.complete("beta")
        assert r.status_code == 200, r.text
        assert s.evictions() == {("alpha", "memory"): 1}
        assert s.model("alpha")["state"] == "unloaded"
        assert s.model("beta")["state"] == "loaded"


def test_a_reload_during_a_load_applies_after_it_and_loses_nothing(tmp_path: Path) -> None:
    """SIGHUP while alpha loads (2 s) with a changed config: the held request is answered,
    and alpha then runs the new config; /upstream/alpha/props reaches its server."""
    config = catalog(tmp_path, ("alpha", {"--fake-load-s": 2}, ""))
    with serving(tmp_path, FAKE, config=config) as s:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(s.complete, "alpha")
            wait_for(lambda: s.model("alpha")["state"] == "loading", 10, "alpha loading")
            text = s.config_file.read_text()
            s.config_file.write_text(text.replace('"--fake-load-s" = 2',
                                                  '"--fake-load-s" = 2\n"-c" = 2048'))
            assert s.proc is not None
            s.proc.send_signal(signal.SIGHUP)
            assert answer.result(30).status_code == 200
        wait_for(lambda: s.starts("2048") == 1 and s.model("alpha")["state"] == "loaded",
                 30, "alpha restarted with -c 2048")
        props = s.client.get("/upstream/alpha/props").json()
        assert props["model_path"].endswith("alpha.gguf")
        assert s.complete("alpha").status_code == 200


def test_a_client_that_hangs_up_frees_the_model_at_once(tmp_path: Path) -> None:
    """A 200-event stream (10 s) whose client leaves after two events: the request is no
    longer in flight within a second or two (llama-server's slot is freed), not 10 s on."""
    config = catalog(tmp_path, ("alpha", {}, ""))
    with serving(tmp_path, FAKE, config=config) as s:
        assert s.complete("alpha").status_code == 200
        with httpx.Client(base_url=str(s.client.base_url), timeout=30) as c, c.stream(
                "POST", "/completion",
                json={"model": "alpha", "stream": True, "n_predict": 200}) as r:
            got: list[str] = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 2:
                    assert s.model("alpha")["in_flight"] == 1  # still generating
                    break  # leaving the iteration closes the connection: the client left
        left = time.monotonic()
        wait_for(lambda: s.model("alpha")["in_flight"] == 0, 5, "the request let go")
        assert time.monotonic() - left < 5
