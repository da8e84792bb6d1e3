"""RELIABILITY.md's "tests we owe", against the fake llama-server, through real processes.

Numbers below are the items of RELIABILITY.md. Items 1, 8, 10, 11, 16 and 17 are not in this
file (they belong to test_supervise_fake.py, test_real_llama.py, test_store_faults.py, the
etcd suite and test_api.py). What is proven elsewhere, and what cannot apply here:
- 2's "injected clock": the exact backoff delays and the ready deadline are pinned
  in-process, on a fake clock (test_controller.py); here the real process shows the same
  outcomes (how many starts, FATAL, what clears it), without reading times from its log.
- 13's "the log buffer stays bounded" is not observable from outside the process: the
  supervisor's RSS stands in for it (and for 15's "memory bounded").

Every wait has a deadline (harness.wait_for); every loop is bounded in count and time; each
test checks that no llama-server, grandchild or supervisor it caused is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_llama_server import HEALTH_LOGGED
from tests.harness import (
    FAKE,
    SupervisorProcess,
    make_fake_model,
    pid_alive,
    props,
    supervisor,
    wait_for,
    wait_gone,
)
from tests.reliability_helpers import (
    STARTED,
    fake_servers,
    grandchildren,
    health_code,
    kill_all,
    one_fake_server,
    pidfile_lines,
    rss_mb,
    starts,
    timed,
)

RSS_LIMIT_MB = 200
FLOOD_MB = 16


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "a.gguf")


def started_pids(sup: SupervisorProcess) -> list[int]:
    return [int(p) for p in re.findall(r"started llama-server \(pid (\d+)", sup.log())]


def wait_exit(sup: SupervisorProcess, timeout: float) -> int:
    """The supervisor's exit code, or a failed test if it is still running after ``timeout``."""
    assert sup.proc is not None
    try:
        return sup.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"supervisor still running {timeout} s later:\n"
                             + sup.log()[-2000:]) from None


def watch_states(sup: SupervisorProcess, until: str, timeout: float) -> list[dict[str, Any]]:
    """Every status seen (polling) until the state is ``until``."""
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        s = sup.status()
        seen.append(s)
        return bool(s["state"] == until)

    wait_for(reached, timeout, f"state {until}", interval=0.03)
    return seen


# ---- 2, 3: failed starts, backoff, FATAL ---------------------------------------------------


@pytest.mark.slow
def test_exit_at_once_backs_off_to_fatal_and_stays_there(tmp_path: Path, model: Path) -> None:
    """N failed starts end FATAL; it holds, nothing scheduled, until a good apply clears it."""
    with supervisor(tmp_path, FAKE, model, ["--fake-exit-at-start", "1"],
                    extra_cli=["--max-start-failures", "4"]) as sup:
        fatal = sup.wait_state("FATAL", 30)
        assert fatal["consecutive_failures"] == 4 and fatal["pid"] is None
        assert fatal["retry_in_s"] is None
        assert starts(sup) == 4  # the delays between them: test_controller.py

        # FATAL means no more starts: it must hold, with nothing scheduled, for > 3 s.
        seen: list[dict[str, Any]] = []
        since = time.monotonic()
        wait_for(lambda: seen.append(sup.status()) or time.monotonic() - since > 3, 10,
                 "3 s of FATAL", interval=0.1)
        assert {(s["state"], s["pid"], s["retry_in_s"]) for s in seen} == {("FATAL", None, None)}
        assert starts(sup) == 4

        # A change that fails too leaves it FATAL, with nothing scheduled ...
        r = sup.post({"--fake-exit-at-start": 2})
        assert r.status_code == 422 and "exited with code 2" in r.json()["error"]
        after = sup.status()
        assert after["state"] == "FATAL" and after["retry_in_s"] is None
        assert starts(sup) == 5
        # ... and a valid one clears it.
        r = sup.post({"--fake-exit-at-start": False})
        assert r.status_code == 200, r.text
        running = sup.wait_running()
        assert running["consecutive_failures"] == 0 and starts(sup) == 6
        wait_gone(started_pids(sup)[:-1], 2, "the failed starts")


def test_exit_0_at_boot_is_a_failed_start(tmp_path: Path, model: Path) -> None:
    """An exit with code 0 before ready counts as a failed start, up to FATAL."""
    with supervisor(tmp_path, FAKE, model, ["--fake-exit-at-start", "0"],
                    extra_cli=["--max-start-failures", "2"]) as sup:
        seen = watch_states(sup, "FATAL", 20)
        assert "RUNNING" not in {s["state"] for s in seen}
        fatal = seen[-1]
        assert fatal["consecutive_failures"] == 2 and starts(sup) == 2
        assert "exited with code 0" in fatal["last_error"]
        wait_gone(started_pids(sup), 2, "the failed starts")


def test_apply_that_exits_0_is_rejected_and_rolled_back(tmp_path: Path, model: Path) -> None:
    """A new config that exits 0 at start is a 422 and the last good one runs again."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"]) as sup:
        old_pid = sup.wait_running()["pid"]
        before = sup.config_file.read_bytes()
        r = sup.post({"--fake-exit-at-start": 0, "-np": 3})
        assert r.status_code == 422, r.text
        assert "exited with code 0" in r.json()["error"]
        status = sup.wait_running()
        assert status["config"]["args"]["--parallel"] == "2"
        assert "--fake-exit-at-start" not in status["config"]["args"]
        assert props(sup.port)["total_slots"] == 2
        assert sup.config_file.read_bytes() == before
        wait_gone([old_pid, *started_pids(sup)[1:-1]], 2, "the old and the failed server")


# ---- 4: readiness ---------------------------------------------------------------------------


def test_state_stays_starting_while_health_is_503(tmp_path: Path, model: Path) -> None:
    """The state is STARTING while /health answers 503, and RUNNING only after its 200."""
    with supervisor(tmp_path, FAKE, model, ["--fake-load-s", "2"]) as sup:
        samples: list[tuple[float, str, int | None, int | None]] = []

        def running() -> bool:
            s = sup.status()
            samples.append((time.monotonic(), s["state"], s["pid"], health_code(sup.port)))
            return bool(s["state"] == "RUNNING")

        wait_for(running, 30, "state RUNNING", interval=0.05)
        before = samples[:-1]
        assert {state for _, state, _, _ in before} == {"STARTING"}, before
        loading = [t for t, _, _, code in before if code == 503]
        assert len(loading) >= 3, before  # the 503 phase was seen, as STARTING
        assert samples[-1][3] == 200
        assert samples[-1][0] - loading[0] >= 1.5  # not RUNNING before the load ended
        assert {pid for _, _, pid, _ in samples if pid} == {samples[-1][2]}


def test_never_ready_at_boot_is_killed_at_the_deadline(tmp_path: Path, model: Path) -> None:
    """A server never ready is killed at --ready-timeout and counts as a failed start."""
    with supervisor(tmp_path, FAKE, model, ["--fake-never-ready"],
                    extra_cli=["--ready-timeout", "1", "--max-start-failures", "2"]) as sup:
        seen = watch_states(sup, "BACKOFF", 20)
        first = started_pids(sup)[0]
        assert any(s["pid"] == first and s["state"] == "STARTING" for s in seen)
        backoff = seen[-1]
        assert backoff["consecutive_failures"] == 1, backoff
        assert "did not become ready within 1 s" in backoff["last_error"]
        wait_gone([first], 1, "the never-ready server")

        fatal = sup.wait_state("FATAL", 20)
        assert fatal["consecutive_failures"] == 2 and starts(sup) == 2
        wait_gone(started_pids(sup), 2, "both never-ready servers")


# ---- 5: a child that ignores SIGTERM --------------------------------------------------------


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_child_ignoring_sigterm_is_killed_on_apply_and_on_stop(tmp_path: Path,
                                                                 model: Path) -> None:
    """A server that ignores SIGTERM is SIGKILLed after --stop-timeout, on apply and on stop."""
    with supervisor(tmp_path, FAKE, model, ["--fake-ignore-sigterm"],
                    extra_cli=["--stop-timeout", "1"]) as sup:
        old = sup.wait_running()["pid"]
        took, r = timed(lambda: sup.post({"-np": 2}))
        assert r.status_code == 200, r.text
        assert took >= 0.9  # it waited the stop timeout before SIGKILL
        assert not pid_alive(old)
        new = sup.llama_pid()
        assert new != old and props(sup.port)["total_slots"] == 2

        took, code = timed(lambda: sup.stop(signal.SIGTERM, timeout=20))
        assert code == 0
        assert 0.9 <= took < 8
        wait_gone([new], 1, "the server that ignored SIGTERM")
        assert sup.log().count("ignored SIGTERM for 1.0 s: SIGKILL") == 2


# ---- 6, 7: grandchildren --------------------------------------------------------------------


@pytest.mark.parametrize("how", [
    # crash: Child.exited resolves on reaping, not when the (grandchild-held) pipe closes.
    "stop", "apply", "crash",
])
def test_no_grandchild_survives(tmp_path: Path, model: Path, how: str) -> None:
    """No grandchild of llama-server outlives its stop, replacement or crash."""
    pidfile = tmp_path / "fake.pids"
    try:
        with supervisor(tmp_path, FAKE, model,
                        ["--fake-grandchild", "--fake-pidfile", str(pidfile)]) as sup:
            child = sup.wait_running()["pid"]
            [(leader, grandchild)] = pidfile_lines(pidfile)
            assert leader == child and pid_alive(grandchild)
            if how == "stop":
                assert sup.stop(signal.SIGTERM) == 0
            elif how == "apply":
                assert sup.post({"-np": 2}).status_code == 200
                assert len(pidfile_lines(pidfile)) == 2
            else:
                os.kill(child, signal.SIGKILL)
                wait_for(lambda: (s := sup.status())["state"] == "RUNNING"
                         and s["pid"] not in (None, child), 8, "revival")
                assert len(pidfile_lines(pidfile)) == 2
            wait_gone([child, grandchild], 5, f"the old server and its grandchild ({how})")
            if how != "stop":
                assert sup.stop(signal.SIGTERM) == 0
            wait_gone(grandchildren(pidfile), 5, "every grandchild")
    finally:
        kill_all(grandchildren(pidfile))


def test_restarted_supervisor_kills_stale_grandchild_first(tmp_path: Path, model: Path) -> None:
    """A restarted supervisor kills what its SIGKILLed predecessor left before it starts anew."""
    pidfile = tmp_path / "fake.pids"
    args = ["--fake-grandchild", "--fake-pidfile", str(pidfile)]
    try:
        with supervisor(tmp_path, FAKE, model, args) as first:
            child = first.wait_running()["pid"]
            first.kill()
            wait_gone([child], 1.0, "the child after the supervisor's SIGKILL")
        stale = grandchildren(pidfile)[0]
        # PR_SET_PDEATHSIG reaches only the child: the pid file must cover the rest.
        assert pid_alive(stale), "precondition: the grandchild outlived the supervisor"

        with supervisor(tmp_path, FAKE, model, args, port=first.port) as second:
            second.wait_running()
            assert not pid_alive(stale)
            log = second.log()
            killed = log.find("left running by a previous supervisor")
            assert 0 <= killed < log.find(STARTED), log[-2000:]
            assert one_fake_server(model).pid == second.llama_pid()
            assert len(pidfile_lines(pidfile)) == 2
            assert second.stop(signal.SIGTERM) == 0  # a clean stop takes its grandchild along
        wait_gone(grandchildren(pidfile), 5, "every grandchild")
    finally:
        kill_all(grandchildren(pidfile))


# ---- 9: the supervisor killed at each step of an apply ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("step, committed", [
    ("after_stop", "2"), ("after_awaitready", "2"),
    ("before_persist", "2"), ("after_persist", "4"),
])
def test_killed_mid_apply_restarts_one_server_with_a_committed_config(
        tmp_path: Path, model: Path, step: str, committed: str) -> None:
    """After a SIGKILL at any apply step the next supervisor runs one server, old or new config."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"],
                    env={"CORRAL_FAILPOINT": step}) as first:
        first.wait_running()
        assert first.stored()["args"]["--parallel"] == "2"
        with pytest.raises(httpx.TransportError):
            first.post({"-np": 4})
        assert wait_exit(first, 10) == -signal.SIGKILL
        assert starts(first) == (1 if step == "after_stop" else 2)
        wait_gone(started_pids(first), 2, "the dead supervisor's servers")

    with supervisor(tmp_path, FAKE, model, ["-np", "2"], port=first.port) as second:
        status = second.wait_running()
        assert one_fake_server(model).pid == status["pid"]
        assert status["config"]["args"]["--parallel"] == committed
        assert props(second.port)["total_slots"] == int(committed)
        assert second.stored()["args"] == status["config"]["args"]


# ---- 12: a second supervisor of the same config ---------------------------------------------


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_second_supervisor_of_the_same_config_refuses(tmp_path: Path, model: Path) -> None:
    """A second supervisor of the same config exits at once and disturbs nothing."""
    with supervisor(tmp_path, FAKE, model) as first:
        pid = first.wait_running()["pid"]
        assert first.proc is not None
        with supervisor(tmp_path, FAKE, model, port=first.port) as second:
            took, code = timed(lambda: wait_exit(second, 15))
            assert code != 0 and took < 15
            log = second.log()
            assert "already runs this config" in log
            assert f"pid {first.proc.pid}" in log
            assert STARTED not in log
        status = first.status()
        assert status["state"] == "RUNNING" and status["pid"] == pid
        assert props(first.port)["model_path"] == str(model)
        assert [p.pid for p in fake_servers(model)] == [pid]


# ---- 13: an output flood --------------------------------------------------------------------


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_output_flood_never_blocks_and_supervisor_stays_responsive(tmp_path: Path,
                                                                    model: Path) -> None:
    """A server writing 16 MiB at once never blocks, and the API stays fast and small."""
    with supervisor(tmp_path, FAKE, model) as sup:
        sup.wait_running()
        assert sup.proc is not None
        log_before = sup.log_path.stat().st_size
        r = sup.post({"--fake-flood-mb": FLOOD_MB}, wait=False)
        assert r.status_code == 202, r.text
        polls: list[tuple[float, int, float]] = []  # latency, log size, supervisor RSS

        def flooded_and_ready() -> bool:
            took, s = timed(sup.status)
            polls.append((took, sup.log_path.stat().st_size, rss_mb(sup.proc.pid)))  # type: ignore[union-attr]
            return bool(s["state"] == "RUNNING" and s["generation"] == 2)

        wait_for(flooded_and_ready, 60, "the flooding server to become ready", interval=0.005)
        assert sup.http.get(f"/v1/changes/{r.json()['change_id']}").json()["status"] == "applied"
        log_after = sup.log_path.stat().st_size
        assert log_after - log_before >= FLOOD_MB * 2**20  # the flood went through the supervisor
        margin = 2**18
        during = [p for p in polls if log_before + margin < p[1] < log_after - margin]
        assert len(during) >= 3, f"too few status calls during the flood: {len(polls)} in all"
        assert max(p[0] for p in polls) < 1.0, sorted(p[0] for p in polls)[-5:]
        assert max(p[2] for p in polls) < RSS_LIMIT_MB
        assert rss_mb(sup.proc.pid) < RSS_LIMIT_MB


# ---- 14: signals to the supervisor ----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_child_gracefully_and_exits_0(tmp_path: Path, model: Path,
                                                        sig: signal.Signals) -> None:
    """SIGTERM or SIGINT stops the child with SIGTERM and the supervisor exits 0."""
    with supervisor(tmp_path, FAKE, model) as sup:
        pid = sup.wait_running()["pid"]
        assert sup.stop(sig, timeout=20) == 0
        assert not pid_alive(pid)
        log = sup.log()
        assert f"{sig.name}: stopping llama-server" in log
        assert f"llama-server (pid {pid}) stopped (code 0)" in log  # SIGTERM, not SIGKILL


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_second_signal_during_shutdown_kills_at_once(tmp_path: Path, model: Path) -> None:
    """A second SIGTERM while stopping SIGKILLs the child at once: exit 0, nothing left."""
    with supervisor(tmp_path, FAKE, model, ["--fake-ignore-sigterm"],
                    extra_cli=["--stop-timeout", "30"]) as sup:
        pid = sup.wait_running()["pid"]
        assert sup.proc is not None
        sup.proc.send_signal(signal.SIGTERM)
        # STOPPING is set right before the child gets its SIGTERM, in the same loop turn.
        wait_for(lambda: sup.status()["state"] == "STOPPING", 10, "state STOPPING")
        assert pid_alive(pid)
        sup.proc.send_signal(signal.SIGTERM)
        took, code = timed(lambda: wait_exit(sup, 6))
        assert code == 0 and took < 5
        wait_gone([pid], 1, "the server that ignored SIGTERM")


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_sigterm_during_apply_exits_promptly_and_keeps_the_old_config(tmp_path: Path,
                                                                        model: Path) -> None:
    """SIGTERM during an apply exits promptly, answers 503 or nothing, and stores nothing new."""
    with supervisor(tmp_path, FAKE, model, ["-np", "2"]) as sup:
        old = sup.wait_running()["pid"]
        before = sup.config_file.read_bytes()
        outcome: dict[str, Any] = {}

        def post() -> None:
            with httpx.Client(base_url=str(sup.http.base_url), timeout=30) as client:
                try:
                    outcome["response"] = client.post(
                        "/v1/params", json={"args": {"--fake-load-s": 5, "-np": 3}})
                except httpx.TransportError as exc:
                    outcome["error"] = exc

        poster = threading.Thread(target=post)
        poster.start()
        try:
            new = wait_for(lambda: (s := sup.status())["state"] == "APPLYING"
                           and s["pid"] not in (None, old) and s["pid"], 20, "the slow start")
            assert sup.proc is not None
            sup.proc.send_signal(signal.SIGTERM)
            took, code = timed(lambda: wait_exit(sup, 6))
            assert code == 0 and took < 5
            poster.join(10)
            assert not poster.is_alive()
            if "response" in outcome:
                assert outcome["response"].status_code == 503, outcome["response"].text
            else:
                assert "error" in outcome
            assert sup.config_file.read_bytes() == before
            wait_gone([old, new], 1, "both servers")
        finally:
            sup.close()
            poster.join(15)


# ---- 15: a flood of changes -----------------------------------------------------------------


@pytest.mark.slow
def test_flood_of_changes_batches_restarts_and_last_write_wins(tmp_path: Path,
                                                                model: Path) -> None:
    """Hundreds of concurrent changes: no error, few restarts, the last write wins."""
    import random

    threads_n, posts_n = 8, 20
    keys_np = ["-np", "--parallel", "np"]  # one flag, three spellings
    with supervisor(tmp_path, FAKE, model, ["--fake-load-s", "0.5"]) as sup:
        sup.wait_running()
        assert sup.proc is not None
        gen0 = sup.status()["generation"]
        results: list[tuple[int, dict[str, Any], dict[str, Any]]] = []  # code, args, body
        failures: list[BaseException] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            rng = random.Random(k)
            try:
                with httpx.Client(base_url=str(sup.http.base_url), timeout=60) as client:
                    for i in range(posts_n):
                        args: dict[str, Any] = {}
                        if rng.random() < 0.6:
                            args["--alias"] = f"w{k}-{i}"
                        if not args or rng.random() < 0.5:
                            args[rng.choice(keys_np)] = rng.randint(1, 8)
                        params = {} if rng.random() < 0.15 else {"wait": "false"}
                        r = client.post("/v1/params", params=params, json={"args": args})
                        with lock:
                            results.append((r.status_code, args, r.json()))
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        t0 = time.monotonic()
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
        for w in workers:
            w.start()
        rss: list[float] = []
        wait_for(lambda: rss.append(rss_mb(sup.proc.pid)) or not any(  # type: ignore[union-attr]
            w.is_alive() for w in workers), 120, "the posting threads", interval=0.2)
        assert not failures, failures
        assert len(results) == threads_n * posts_n
        assert {code for code, _, _ in results} <= {200, 202}, [
            (c, b) for c, _, b in results if c not in (200, 202)][:3]

        # Wait until every change is decided (an idle RUNNING controller has answered all
        # it took); none may be rejected or failed.
        wait_for(lambda: (s := sup.status())["pending_changes"] == 0 and s["state"] == "RUNNING",
                 30, "every change decided", interval=0.1)
        later = [body["change_id"] for code, _, body in results if code == 202]
        with ThreadPoolExecutor(threads_n) as pool:
            outcomes = set(pool.map(
                lambda i: sup.http.get(f"/v1/changes/{i}").json()["status"], later))
        outcomes |= {body["status"] for code, _, body in results if code == 200}
        assert outcomes == {"applied"}

        # Last write wins, in the order the supervisor received them (change ids count up).
        expected: dict[str, str] = {}
        for _, args, _ in sorted(results, key=lambda x: _sequence(x[2]["change_id"])):
            for key, value in args.items():
                expected["--parallel" if key in keys_np else key] = str(value)
        effective = sup.status()["config"]["args"]
        assert {k: effective.get(k) for k in expected} == expected

        # And a last change, sent after all others, is what runs and what is stored.
        r = sup.post({"--alias": "final", "-np": 7})
        assert r.status_code == 200, r.text
        duration = time.monotonic() - t0
        status = sup.status()
        assert status["config"]["args"]["--alias"] == "final"
        assert status["config"]["args"]["--parallel"] == "7"
        assert props(sup.port)["total_slots"] == 7
        assert sup.stored()["args"] == status["config"]["args"]

        restarts = status["generation"] - gen0
        restart_s = 0.5 + 0.3  # --fake-load-s + --min-healthy: no restart is faster
        assert restarts <= duration / restart_s + 2, (restarts, duration)
        assert restarts <= len(results) / 4, (restarts, len(results))  # batched
        rss.append(rss_mb(sup.proc.pid))
        assert max(rss) < RSS_LIMIT_MB, max(rss)
        wait_gone(started_pids(sup)[:-1], 2, "replaced servers")


def test_rollback_that_fails_too_is_fatal_with_both_reasons(tmp_path: Path, model: Path) -> None:
    """RELIABILITY 8: new config and last good both fail -> FATAL, no flip-flop."""
    broken = tmp_path / "broken"
    wrapper = tmp_path / "flaky-llama-server"
    wrapper.write_text(f"""#!/bin/sh
case "$1" in --help) exec "{FAKE}" "$@";; esac
if [ -e "{broken}" ]; then echo "flaky: broken on purpose"; exit 4; fi
exec "{FAKE}" "$@"
""")
    wrapper.chmod(0o755)
    with supervisor(tmp_path, wrapper, model) as sup:
        sup.wait_running()
        before = sup.config_file.read_bytes()
        broken.touch()
        r = sup.post({"-np": 2})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "exited with code 4" in error and "the rollback failed too" in error
        status = sup.wait_state("FATAL", 10)
        assert status["pid"] is None and "rollback failed too" in status["last_error"]
        assert starts(sup) == 3  # boot, the new config, one rollback attempt
        # No flip-flop: FATAL stays put with nothing scheduled.
        assert status["retry_in_s"] is None
        assert sup.config_file.read_bytes() == before
        broken.unlink()
        r = sup.post({"-np": 2})
        assert r.status_code == 200, r.text
        assert sup.wait_running()["config"]["args"]["--parallel"] == "2"
        assert starts(sup) == 4


def test_hang_detection_restarts_a_frozen_server(tmp_path: Path, model: Path) -> None:
    """--monitoring-interval: /health failing 3 times in a row is treated as a crash."""
    with supervisor(tmp_path, FAKE, model, ["--fake-hang-after", "0.5"],
                    extra_cli=["--monitoring-interval", "0.3"]) as sup:
        first = sup.wait_running()["pid"]
        revived = wait_for(lambda: (s := sup.status())["restarts"] >= 1 and s, 30, "revival")
        assert "failed 3 health checks in a row" in sup.log()
        wait_for(lambda: not pid_alive(first), 5, "the frozen server killed")
        assert revived["config"]["args"]["--fake-hang-after"] == "0.5"


def test_no_hang_detection_by_default(tmp_path: Path, model: Path) -> None:
    """With the default flags nothing probes /health once the server is RUNNING."""
    with supervisor(tmp_path, FAKE, model, ["--fake-log-health"]) as sup:
        pid = sup.wait_running()["pid"]
        # the readiness probes all came >= --min-healthy (0.3 s) before RUNNING
        before = sup.log().count(HEALTH_LOGGED)
        assert before >= 1, "the fake logs the probes it answers"
        since = time.monotonic()
        # 2 s: a detector at even a 1.9 s interval would have probed by then
        wait_for(lambda: time.monotonic() - since > 2, 5, "2 s of RUNNING", interval=0.1)
        assert sup.log().count(HEALTH_LOGGED) == before
        assert sup.llama_pid() == pid


def _sequence(change_id: str) -> int:
    """The order a supervisor received a change in: ``c<n>-<run tag>`` -> n."""
    return int(change_id[1:].split("-", 1)[0])
