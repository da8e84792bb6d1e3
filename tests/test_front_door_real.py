"""The front door (``corral supervise --listen``) in front of the real llama-server and model,
with real clients: no request lost across applies, crashes and shutdown.

The load generator (tests/loadgen.py) runs 4 clients through the front door: completions
(streamed and not), OpenAI chat and text completions through the official ``openai`` client,
and ``GET /v1/models``. A request *failed* when it got a non-2xx answer, a connection error,
a timeout, or a stream without its final chunk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures_real import HealthWatch
from tests.harness import (
    ROOT,
    SupervisorProcess,
    corrupt_gguf,
    free_port,
    pid_alive,
    supervisor,
    wait_for,
)
from tests.loadgen import KINDS, LoadGen, Outcome

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timing]  # load and latency

LLAMA_ARGS = ["-c", "1024", "-np", "1"]
READY = 180.0        # a real llama-server start on a busy 2-core machine: ~10 s, often more
APPLY = 240.0        # an apply's answer: a start (two for a rejected stop-first change)
# A request the load generator started this close before the SIGTERM may still have been on
# its way (in the client's or the kernel's buffers) when the front door stopped accepting:
# the keep-alive race every HTTP server has. Requests started earlier were at the front door.
SIGTERM_GRACE = 0.25


def front_cli(listen: int, *extra: str) -> list[str]:
    return ["--listen", f"127.0.0.1:{listen}", "--quiet-llama", *extra]


def apply(sup: SupervisorProcess, args: dict[str, Any]) -> tuple[httpx.Response, float]:
    t = time.monotonic()
    r = sup.http.post("/v1/params", json={"args": args}, timeout=APPLY)
    return r, time.monotonic() - t


def front_status(sup: SupervisorProcess) -> dict[str, Any]:
    front: dict[str, Any] = sup.status()["front"]
    return front


def failures(outcomes: list[Outcome], keep: Callable[[Outcome], bool]) -> list[str]:
    return [str(o) for o in outcomes if not o.ok and keep(o)]


def first_event(lines: Iterator[str]) -> dict[str, Any]:
    for line in lines:
        if line.startswith("data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event
    raise AssertionError("the stream ended before its first event")


def last_event(lines: Iterator[str]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for line in lines:
        if line.startswith("data: "):
            last = json.loads(line[6:])
    return last


# ---- 1 + 2: applies, a crash and a shutdown under load, per strategy ----------------------------

@pytest.mark.parametrize("strategy", ["start-first", "stop-first"])
def test_no_request_lost_across_applies_crash_and_shutdown(
        strategy: str, tmp_path: Path, real_binary: Path, real_model: Path,
        model_alias: Callable[[str], Path]) -> None:
    """Per strategy: applies lose no request, a kill only in-flight ones, SIGTERM none."""
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    other_model = model_alias("other-name")
    bad_model = corrupt_gguf(tmp_path, real_model)
    durations: dict[str, float] = {}
    t_begin = time.monotonic()
    with supervisor(tmp_path, real_binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--swap", strategy)) as sup, \
            httpx.Client(base_url=front, timeout=APPLY) as http:
        sup.wait_running(READY)
        load = LoadGen(front, clients=4, n_predict=2).start()
        try:
            t_load = time.monotonic()
            wait_for(lambda: load.ok_since(t_load) >= 2, READY, "the load flowing")

            # A flag change.
            r, durations["flag"] = apply(sup, {"-np": 2})
            assert r.status_code == 200, r.text
            assert http.get("/props").json()["total_slots"] == 2
            assert sup.status()["last_strategy"] == strategy

            # A model change.
            r, durations["model"] = apply(sup, {"-m": str(other_model)})
            assert r.status_code == 200, r.text
            assert http.get("/props").json()["model_path"] == str(other_model)

            # A change that fails only at load: rejected, and (start-first) the old server
            # never stopped serving.
            before = sup.status()
            with HealthWatch(before["port"]) as watch:
                r, durations["rejected"] = apply(sup, {"-m": str(bad_model)})
            assert r.status_code == 422, r.text
            after = sup.wait_running(READY)
            assert after["config"]["args"]["--model"] == str(other_model)
            assert http.get("/props").json()["model_path"] == str(other_model)
            if strategy == "start-first":
                assert after["pid"] == before["pid"], (before, after)
                assert after["restarts"] == before["restarts"]
                assert watch.probes > 0 and not watch.failures, watch.failures
            # SIGKILL of the active llama-server.
            pid = sup.llama_pid()
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            r = http.post("/completion", json={"prompt": "Hi", "n_predict": 2})
            assert r.status_code == 200, r.text   # held until the revival, not refused
            revived = wait_for(lambda: (s := sup.status())["state"] == "RUNNING"
                               and s["pid"] not in (None, pid) and s, READY, "the revival")
            assert revived["restarts"] == after["restarts"] + 1
            # ... so every load request started since the kill (held or not) must succeed.
            wait_for(lambda: load.ok_since(t_kill) >= 1, READY, "the load flowing again")
            front_view = front_status(sup)

            # SIGTERM of the supervisor, with a stream in flight and the load running.
            with http.stream("POST", "/completion",
                             json={"prompt": "Once upon a time", "n_predict": 8,
                                   "ignore_eos": True, "stream": True}) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                first_event(lines)
                wait_for(lambda: any(s < time.monotonic() - SIGTERM_GRACE
                                     for _, _, s in load.in_flight()),
                         READY, "a load request in flight for a while")
                t_term = time.monotonic()
                assert sup.proc is not None
                sup.proc.send_signal(signal.SIGTERM)
                assert last_event(lines).get("stop") is True, "the stream was cut at SIGTERM"
            assert sup.proc.wait(30) == 0, sup.log()[-3000:]
            t_exit = time.monotonic()
        finally:
            load.stop()
        assert not sup.leftovers(), sup.leftovers()

    outcomes = load.outcomes()
    before_term = [o for o in outcomes if o.start < t_term]
    print(f"\n[{strategy}] {LoadGen.summary(before_term)} before the SIGTERM; "
          f"applies: flag {durations['flag']:.1f} s, model {durations['model']:.1f} s, "
          f"rejected {durations['rejected']:.1f} s; front door: held {front_view['held_total']}, "
          f"retried {front_view['retried']}, cut {front_view['cut']}, "
          f"failed {front_view['failed']}; "
          f"in flight at the kill {sum(o.in_flight_at(t_kill) for o in outcomes)}, "
          f"at the SIGTERM {sum(o.in_flight_at(t_term) for o in outcomes)} (the last ended "
          f"{max(o.end for o in outcomes if o.in_flight_at(t_term)) - t_term:.1f} s after it: "
          + ", ".join(f"{o.kind} {o.start - t_term:+.1f}..{o.end - t_term:+.1f} s"
                      for o in outcomes if o.in_flight_at(t_term)) + "); "
          f"exit {t_exit - t_term:.1f} s after the SIGTERM, run {t_exit - t_begin:.0f} s; "
          f"failed: started within {SIGTERM_GRACE} s before the SIGTERM "
          f"{len(failures(outcomes, lambda o: t_term - SIGTERM_GRACE <= o.start < t_term))}, "
          f"after it (refused) {len(failures(outcomes, lambda o: o.start >= t_term))}")

    # Every kind of request went through.
    assert {o.kind for o in before_term if o.ok} == set(KINDS), LoadGen.summary(before_term)
    if strategy == "stop-first":
        assert front_view["held_total"] > 0, front_view   # the applies held requests

    # Zero failed requests across the three applies (and before them).
    assert not failures(outcomes, lambda o: o.start < t_kill and not o.in_flight_at(t_kill))
    # After the kill only the requests in flight at that instant may fail.
    assert not failures(outcomes, lambda o: t_kill < o.start < t_term - SIGTERM_GRACE)
    # Every request in flight at the SIGTERM (and already at the front door) completed.
    in_flight_at_term = [o for o in outcomes
                         if o.in_flight_at(t_term) and o.start < t_term - SIGTERM_GRACE]
    assert in_flight_at_term and all(o.ok for o in in_flight_at_term), \
        [str(o) for o in in_flight_at_term]
    # The supervisor's own count agrees: nothing refused, timed out or cut before the kill.
    assert front_view["failed"].keys() <= {"bad_gateway"}, front_view


# ---- past the drain timeout: cut, so llama-server can stop at once ---------------------------

def long_stream(front: str, result: dict[str, Any]) -> threading.Thread:
    """A streamed completion that would run for minutes, in a thread: ``result["first"]`` is
    set at its first event, ``result["error"]`` when it ends (None for a whole stream)."""
    def run() -> None:
        body = {"prompt": "Once upon a time", "n_predict": 1000, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.Client(timeout=READY) as c, \
                    c.stream("POST", f"{front}/completion", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    result.setdefault("first", line.startswith("data: ") or None)
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - a cut stream is the expected end here
            result["error"] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: result.get("first") or "error" in result, READY, "the stream's first event")
    assert "error" not in result, result
    return thread


@pytest.mark.parametrize("strategy", ["start-first", "stop-first"])
def test_past_the_drain_timeout_requests_are_cut_not_the_server_killed(
        strategy: str, tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """llama-server ignores SIGTERM while a request is in flight (see issue 10), so a request
    still running when ``--drain-timeout`` ends must be cut by the front door *before* the
    server is stopped; otherwise the stop waits ``--stop-timeout`` and ends in SIGKILL."""
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    with supervisor(tmp_path, real_binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--swap", strategy, "--drain-timeout", "1")
                    ) as sup:
        old = sup.wait_running(READY)["pid"]
        result: dict[str, Any] = {}
        thread = long_stream(front, result)
        r, _ = apply(sup, {"-np": 2})
        assert r.status_code == 200, r.text
        thread.join(READY)
        assert result["error"], "the stream should have been cut at the drain timeout"
        assert front_status(sup)["cut"] == 1
        # The same at shutdown.
        new = sup.llama_pid()
        result = {}
        thread = long_stream(front, result)
        assert sup.stop(signal.SIGTERM, timeout=60) == 0
        thread.join(READY)
        assert result["error"]
    log = sup.log()
    for pid in (old, new):
        assert f"llama-server (pid {pid}) ignored SIGTERM" not in log, log[-3000:]
        assert f"llama-server (pid {pid}) stopped (code 0)" in log, log[-3000:]


# ---- 3: overflow of the held queue, and the hold timeout -----------------------------------

@pytest.fixture
def gated_binary(tmp_path: Path, real_binary: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A llama-server that waits to load until ``gate`` exists: (binary, gate, pid file).

    Nothing is ready until the test says so, however fast or slow the machine is."""
    gate, pidfile = tmp_path / "gate", tmp_path / "gated.pid"
    path = tmp_path / "gated-llama-server"
    path.write_text(f"""#!/bin/sh
case "$1" in --help|--version) exec "{real_binary}" "$@";; esac
echo $$ > "{pidfile}"
while [ ! -e "{gate}" ]; do sleep 0.05; done
exec "{real_binary}" "$@"
""")
    path.chmod(0o755)
    yield path, gate, pidfile
    if pidfile.exists():
        pid = int(pidfile.read_text())
        assert not pid_alive(pid), f"the gated llama-server (pid {pid}) was left running"


def assert_unavailable(r: httpx.Response) -> dict[str, Any]:
    """A 503 from the front door: Retry-After and an OpenAI-format error body."""
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1, r.headers
    error: dict[str, Any] = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == 503 and error["type"], error
    return error


def held_now(sup: SupervisorProcess) -> int:
    return int(front_status(sup)["held_now"])


def test_max_held_overflow_answers_503_and_the_held_are_released(
        tmp_path: Path, real_model: Path,
        gated_binary: tuple[Path, Path, Path]) -> None:
    """Past --max-held requests get 503 waiting; the held ones get 200 once the server is ready."""
    binary, gate, _ = gated_binary
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    answers: list[httpx.Response] = []
    with supervisor(tmp_path, binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--max-held", "2")) as sup, \
            httpx.Client(base_url=front, timeout=APPLY) as http:
        wait_for(lambda: front_status(sup)["mode"] == "holding", 30, "the front door up")

        def send() -> None:
            with httpx.Client(base_url=front, timeout=APPLY) as c:
                answers.append(c.post("/completion", json={"prompt": "Hi", "n_predict": 2}))

        held = [threading.Thread(target=send, daemon=True) for _ in range(2)]
        for t in held:
            t.start()
        wait_for(lambda: held_now(sup) == 2, 30, "two requests held")

        error = assert_unavailable(http.post("/completion", json={"prompt": "Hi"}))
        assert "waiting" in error["message"], error
        oai = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0, timeout=30)
        with oai, pytest.raises(openai.APIStatusError) as caught:
            oai.chat.completions.create(model="x", max_tokens=2,
                                        messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.status_code == 503
        assert "waiting" in caught.value.message, caught.value.message
        assert held_now(sup) == 2 and not answers

        gate.touch()
        for t in held:
            t.join(READY)
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        view = front_status(sup)
        assert view["failed"] == {"held_overflow": 2}, view
        assert view["released_total"] == 2, view
        assert sup.stop() == 0


def test_hold_timeout_answers_503(tmp_path: Path, real_model: Path,
                                  gated_binary: tuple[Path, Path, Path]) -> None:
    """Requests held past --hold-timeout, /health too, get 503 saying so; stop leaves nothing."""
    binary, _, _ = gated_binary
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    with supervisor(tmp_path, binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--hold-timeout", "1")) as sup, \
            httpx.Client(base_url=front, timeout=60) as http:
        wait_for(lambda: front_status(sup)["mode"] == "holding", 30, "the front door up")
        error = assert_unavailable(http.post("/completion", json={"prompt": "Hi"}))
        assert "ready within 1 s" in error["message"], error
        assert_unavailable(http.get("/health"))   # /health is held like any other request
        oai = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0, timeout=30)
        with oai, pytest.raises(openai.APIStatusError) as caught:
            oai.completions.create(model="x", prompt="Hi", max_tokens=2)
        assert caught.value.status_code == 503
        assert front_status(sup)["failed"] == {"hold_timeout": 3}
        assert sup.stop() == 0   # with llama-server still "loading": nothing left behind


def test_sigterm_answers_held_requests_503_and_exits_0(
        tmp_path: Path, real_model: Path, gated_binary: tuple[Path, Path, Path]) -> None:
    """SIGTERM answers held requests 503 shutting down, and the supervisor exits 0."""
    binary, _, _ = gated_binary
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    answers: list[httpx.Response] = []
    with supervisor(tmp_path, binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen)) as sup:
        wait_for(lambda: front_status(sup)["mode"] == "holding", 30, "the front door up")

        def send() -> None:
            with httpx.Client(base_url=front, timeout=60) as c:
                answers.append(c.post("/completion", json={"prompt": "Hi", "n_predict": 2}))

        held = threading.Thread(target=send, daemon=True)
        held.start()
        wait_for(lambda: held_now(sup) == 1, 30, "a request held")
        assert sup.stop(signal.SIGTERM, timeout=30) == 0, sup.log()[-3000:]
        held.join(30)
        assert len(answers) == 1
        error = assert_unavailable(answers[0])
        assert "shutting down" in error["message"], error


def test_fatal_answers_503_at_once_saying_why(tmp_path: Path, real_binary: Path,
                                              real_model: Path) -> None:
    """In FATAL the front door answers 503 FATAL at once; a good apply makes it route again."""
    listen = free_port()
    front = f"http://127.0.0.1:{listen}"
    bad = corrupt_gguf(tmp_path, real_model)
    with supervisor(tmp_path, real_binary, bad, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--max-start-failures", "1")) as sup, \
            httpx.Client(base_url=front, timeout=60) as http:
        sup.wait_state("FATAL", 60)
        error = assert_unavailable(http.post("/completion", json={"prompt": "Hi"}))
        assert "FATAL" in error["message"], error
        assert_unavailable(http.get("/health"))
        # A good apply clears FATAL, and the front door routes again.
        r, _ = apply(sup, {"-m": str(real_model)})
        assert r.status_code == 200, r.text
        assert http.get("/health").status_code == 200


# ---- 4: a transparent proxy: slots freed, headers and big bodies pass ---------------------

API_KEY = "front-door-test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, real_binary: Path,
          real_model: Path) -> Iterator[tuple[SupervisorProcess, str]]:
    """One supervisor with the front door, whose llama-server wants ``--api-key``."""
    tmp = tmp_path_factory.mktemp("keyed")
    listen = free_port()
    with supervisor(tmp, real_binary, real_model, [*LLAMA_ARGS, "--api-key", API_KEY],
                    extra_cli=front_cli(listen)) as sup:
        sup.wait_running(READY)
        yield sup, f"http://127.0.0.1:{listen}"


def processing_slots(http: httpx.Client) -> int:
    r = http.get("/slots", headers=AUTH)
    assert r.status_code == 200, r.text
    return sum(1 for s in r.json() if s.get("is_processing"))


def test_a_disconnecting_streaming_client_frees_its_slot(
        keyed: tuple[SupervisorProcess, str]) -> None:
    """A streaming client that disconnects frees its llama-server slot, counted as no cut."""
    sup, front = keyed
    with httpx.Client(base_url=front, timeout=60) as http:
        # Long enough (minutes at this machine's pace) that only a cancel frees the slot
        # before the deadline below.
        body = {"prompt": "Once upon a time", "n_predict": 1000, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=front, timeout=60) as client, \
                client.stream("POST", "/completion", json=body, headers=AUTH) as stream:
            assert stream.status_code == 200
            first_event(stream.iter_lines())
            assert processing_slots(http) == 1
        # The client is gone: llama-server must stop generating for it.
        wait_for(lambda: processing_slots(http) == 0 and front_status(sup)["in_flight"] == 0,
                 30, "the slot freed")
        assert front_status(sup)["cut"] == 0


def test_headers_and_large_bodies_pass_through(keyed: tuple[SupervisorProcess, str]) -> None:
    """llama-server's own --api-key works through the front door (its 401 passes as it is),
    and a request body far past 64 KiB arrives whole."""
    sup, front = keyed
    with httpx.Client(base_url=front, timeout=60) as http:
        r = http.post("/completion", json={"prompt": "Hi", "n_predict": 1})
        assert r.status_code == 401, r.text
        oai = openai.OpenAI(base_url=f"{front}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        with oai:
            assert oai.completions.create(model="x", prompt="Hi", max_tokens=1).choices
        filler = "x" * (4 << 20)   # an unknown field llama-server ignores: 4 MiB of body
        r = http.post("/completion", headers=AUTH,
                      json={"prompt": "Hi", "n_predict": 1, "filler": filler})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["stop"] is True
        assert front_status(sup)["failed"] == {}


# ---- 5: --listen is what start-first and a private --port need -----------------------------

def test_start_first_without_listen_is_a_usage_error(tmp_path: Path, real_binary: Path,
                                                      real_model: Path) -> None:
    """--swap start-first without --listen exits 2 with a usage error naming --listen."""
    cmd = [sys.executable, "-m", "corral", "supervise", "--swap", "start-first",
           "--supervisor-addr", f"127.0.0.1:{free_port()}", "--binary", str(real_binary),
           "--model", str(real_model), "--config-file", str(tmp_path / "config.toml"),
           "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "--listen" in done.stderr, done.stderr


def test_port_is_private_with_listen(tmp_path: Path, real_model: Path,
                                     gated_binary: tuple[Path, Path, Path]) -> None:
    """The API refuses to move llama-server's port or host: they are Corral's business."""
    binary, _, _ = gated_binary
    listen = free_port()
    with supervisor(tmp_path, binary, real_model, LLAMA_ARGS,
                    extra_cli=front_cli(listen, "--swap", "start-first")) as sup:
        wait_for(lambda: front_status(sup), 30, "the API up")
        for args in ({"--port": 9000}, {"--host": "0.0.0.0"}, {"--port": 9000, "-np": 2}):
            r = sup.post(args)
            assert r.status_code == 422, r.text
            assert "--listen" in r.text, r.text
        assert sup.status()["config"]["args"]["--parallel"] == "1"
        assert sup.stop() == 0
