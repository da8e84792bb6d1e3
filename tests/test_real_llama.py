"""Every user-facing path against the real llama-server and the real gemma-3 270M model."""

from __future__ import annotations

import os
import signal
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.harness import corrupt_gguf, free_port, pid_alive, props, supervisor, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_supervises_real_server(tmp_path: Path, real_binary: Path, real_model: Path) -> None:
    """The real llama-server starts with the CLI args, serves them, and they are stored."""
    with supervisor(tmp_path, real_binary, real_model, ["-np", "2", "-c", "2048"]) as sup:
        status = sup.wait_running(120)
        p = props(sup.port)
        assert p["model_path"] == str(real_model)
        assert p["total_slots"] == 2
        assert status["config"]["args"]["--ctx-size"] == "2048"
        assert sup.stored()["args"]["--parallel"] == "2"
        assert "is ready after" in sup.log()


def test_kill_9_ten_times_revives_with_same_args(tmp_path: Path, real_binary: Path,
                                                 real_model: Path) -> None:
    """Ten SIGKILLs of the real llama-server: each is revived with the same config."""
    with supervisor(tmp_path, real_binary, real_model, ["-np", "3"]) as sup:
        first = sup.wait_running(120)
        for i in range(10):
            pid = sup.llama_pid()
            os.kill(pid, signal.SIGKILL)
            status = wait_for(lambda p=pid: (s := sup.status())["state"] == "RUNNING"
                              and s["pid"] not in (None, p) and s, 60, f"revival {i + 1}")
            assert status["restarts"] == i + 1
            assert status["config"] == first["config"]
            assert props(sup.port)["total_slots"] == 3
            assert not pid_alive(pid)


def test_sigterm_stops_cleanly_and_exits_0(tmp_path: Path, real_binary: Path,
                                            real_model: Path) -> None:
    """SIGTERM stops the real llama-server with the supervisor, which exits 0."""
    with supervisor(tmp_path, real_binary, real_model) as sup:
        pid = sup.wait_running(120)["pid"]
        assert sup.stop(signal.SIGTERM) == 0
        assert not pid_alive(pid)
        with pytest.raises(httpx.ConnectError):
            props(sup.port)


def test_supervisor_sigkill_leaves_no_llama_server(tmp_path: Path, real_binary: Path,
                                                    real_model: Path) -> None:
    """SIGKILL of the supervisor takes the real llama-server with it within 1 s."""
    with supervisor(tmp_path, real_binary, real_model) as sup:
        pid = sup.wait_running(120)["pid"]
        sup.kill()
        wait_for(lambda: not pid_alive(pid), 1.0, "llama-server gone within 1 s")


def test_binary_that_fails_at_once_backs_off_then_fatal(tmp_path: Path, real_binary: Path,
                                                        real_model: Path) -> None:
    """A model that fails to load backs off, goes FATAL, stores nothing; a good apply clears it."""
    bad = corrupt_gguf(tmp_path, real_model)
    with supervisor(tmp_path, real_binary, bad, extra_cli=["--max-start-failures", "3"]) as sup:
        assert sup.wait_state("BACKOFF", 60)["consecutive_failures"] >= 1
        fatal = sup.wait_state("FATAL", 120)
        assert fatal["consecutive_failures"] == 3 and fatal["pid"] is None
        assert "exited with code" in fatal["last_error"]
        assert sup.log().count("started llama-server") == 3
        assert not sup.config_file.exists() or "default" not in sup.config_file.read_text()
        # A good apply clears FATAL.
        r = sup.post({"-m": str(real_model)})
        assert r.status_code == 200, r.text
        assert sup.wait_running(60)["consecutive_failures"] == 0


def test_apply_changes_slots_model_and_port(tmp_path: Path, real_binary: Path,
                                            real_model: Path, model_alias) -> None:  # type: ignore[no-untyped-def]
    """Slots, model and port changes reach the real llama-server and the store."""
    with supervisor(tmp_path, real_binary, real_model) as sup:
        sup.wait_running(120)
        other = model_alias("other")
        r = sup.post({"-m": str(other), "-np": 4})
        assert r.status_code == 200, r.text
        p = props(sup.port)
        assert p["model_path"] == str(other) and p["total_slots"] == 4
        assert sup.stored()["args"]["--model"] == str(other)

        new_port = free_port()
        r = sup.post({"--port": new_port})
        assert r.status_code == 200, r.text
        assert props(new_port)["total_slots"] == 4
        with pytest.raises(httpx.ConnectError):
            props(sup.port)
        assert sup.stored()["args"]["--port"] == str(new_port)


@pytest.mark.parametrize("args, reason", [
    ({"-m": "/nonexistent/model.gguf"}, "does not exist"),
    ({"--definitely-not-a-flag": 1}, "unknown llama-server flag"),
    ({"binary": "/nonexistent/llama-server"}, "does not exist"),
])
@pytest.mark.timing  # probes or timed steps: run alone
def test_preflight_rejections_cause_no_downtime(tmp_path: Path, real_binary: Path,
                                                real_model: Path, health_watch,  # type: ignore[no-untyped-def]
                                                args: dict, reason: str) -> None:
    """A change rejected by the checks costs not one failed /health probe."""
    with supervisor(tmp_path, real_binary, real_model) as sup:
        pid = sup.wait_running(120)["pid"]
        before = sup.config_file.read_bytes()
        with health_watch(sup.port) as watch:
            wait_for(lambda: watch.probes >= 3, 5, "a few health probes")
            r = sup.post(args)
            start = watch.probes
            wait_for(lambda: watch.probes >= start + 3, 5, "health probes after the change")
        assert r.status_code == 422, r.text
        assert reason in r.json()["error"]
        assert watch.failures == [], watch.failures
        assert sup.llama_pid() == pid
        assert sup.config_file.read_bytes() == before


@pytest.mark.parametrize("change", ["corrupt-model", "bad-value"])
def test_start_failure_rolls_back_to_last_good(tmp_path: Path, real_binary: Path,
                                               real_model: Path, change: str) -> None:
    """A change the real llama-server fails on is a 422 with its log, and is rolled back."""
    args = ({"-m": str(corrupt_gguf(tmp_path, real_model))} if change == "corrupt-model"
            else {"--ctx-size": "not-a-number"})
    with supervisor(tmp_path, real_binary, real_model, ["-np", "2"]) as sup:
        sup.wait_running(120)
        before = sup.config_file.read_bytes()
        r = sup.post(args)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["status"] == "rejected" and "exited with code" in body["error"]
        assert body["log"], "the tail of llama-server's output explains the failure"
        sup.wait_running(120)
        p = props(sup.port)
        assert p["model_path"] == str(real_model) and p["total_slots"] == 2
        assert sup.config_file.read_bytes() == before


@pytest.mark.parametrize("first_end", ["sigterm", "sigkill-right-after-the-apply"])
def test_stored_config_wins_after_sigterm_and_sigkill(tmp_path: Path, real_binary: Path,
                                                      real_model: Path, model_alias,  # type: ignore[no-untyped-def]
                                                      first_end: str) -> None:
    """An applied config outlives the supervisor and wins over other CLI flags at each restart."""
    applied = model_alias("applied")
    state = tmp_path / "state"
    with supervisor(tmp_path, real_binary, real_model, state_dir=state) as sup:
        sup.wait_running(120)
        assert sup.post({"-m": str(applied), "-np": 3}).status_code == 200
        port = sup.port
        if first_end == "sigterm":
            assert sup.stop(signal.SIGTERM) == 0
        else:
            sup.kill()  # at once: no graceful anything
    # Restart with different CLI flags: the stored config wins, after a SIGTERM and a SIGKILL.
    for how in ("sigterm", "sigkill"):
        with supervisor(tmp_path, real_binary, real_model, ["-np", "1"], port=port,
                        state_dir=state) as sup:
            status = sup.wait_running(120)
            p = props(port)
            assert p["model_path"] == str(applied) and p["total_slots"] == 3, how
            assert status["config"]["args"]["--parallel"] == "3"
            assert "wins over the command line" in sup.log()
            if how == "sigterm":
                sup.stop(signal.SIGTERM)
            else:
                sup.kill()


@pytest.mark.timing  # probes or timed steps: run alone
def test_proposal_example_2_with_slow_restarts(tmp_path: Path, slow_binary, model_alias,  # type: ignore[no-untyped-def]
                                               real_model: Path) -> None:
    """foo is applied; bar, superseded while foo applies, never starts; baz follows foo."""
    binary = slow_binary(2)
    foo, bar, baz = model_alias("foo"), model_alias("bar"), model_alias("baz")
    with supervisor(tmp_path, binary, real_model, extra_cli=["--debounce-ms", "300"]) as sup:
        sup.wait_running(120)
        t0 = time.monotonic()
        ids = []
        for at, model in ((0.0, foo), (0.6, bar), (1.2, baz)):
            wait_for(lambda at=at: time.monotonic() - t0 >= at, 5, "the request's time")
            ids.append(sup.post({"-m": str(model)}, wait=False).json()["change_id"])
        outcomes = [wait_for(lambda i=i: (c := sup.http.get(f"/v1/changes/{i}").json())
                             ["status"] != "pending" and c, 120, "outcome") for i in ids]
        assert [o["status"] for o in outcomes] == ["applied"] * 3
        assert props(sup.port)["model_path"] == str(baz)
        started = [line for line in sup.log().splitlines() if "started llama-server" in line]
        assert len(started) == 3  # boot, foo, baz
        assert str(foo) in started[1] and str(baz) in started[2]
        assert not any(str(bar) in line for line in started)


@pytest.mark.timing  # probes or timed steps: run alone
def test_proposal_example_1_merges_into_one_restart(tmp_path: Path, real_binary: Path,
                                                    real_model: Path, model_alias) -> None:  # type: ignore[no-untyped-def]
    """The proposal's example 1: four quick changes become one restart, the last write winning."""
    foo, baz = model_alias("foo"), model_alias("baz")
    with supervisor(tmp_path, real_binary, real_model, extra_cli=["--debounce-ms", "400"]) as sup:
        sup.wait_running(120)
        t0 = time.monotonic()
        ids = []
        for at, args in ((0.0, {"model": str(foo)}), (0.02, {"model": str(baz), "c": 512}),
                         (0.1, {"model": str(foo)}), (0.2, {"c": 1024})):
            wait_for(lambda at=at: time.monotonic() - t0 >= at, 5, "the request's time")
            ids.append(sup.post(args, wait=False).json()["change_id"])
        outcomes = [wait_for(lambda i=i: (c := sup.http.get(f"/v1/changes/{i}").json())
                             ["status"] != "pending" and c, 120, "outcome") for i in ids]
        assert all(o["status"] == "applied" for o in outcomes)
        assert sup.status()["generation"] == 2  # boot + exactly one restart
        assert outcomes[-1]["config"]["args"]["--model"] == str(foo)
        assert outcomes[-1]["config"]["args"]["--ctx-size"] == "1024"
        assert props(sup.port)["model_path"] == str(foo)


@pytest.mark.timing  # probes or timed steps: run alone
def test_flood_of_posts_while_restarts_take_2_s(tmp_path: Path, slow_binary,  # type: ignore[no-untyped-def]
                                                real_model: Path) -> None:
    """Hundreds of POSTs from 8 clients: no 5xx, bounded restarts, last write wins."""
    import random
    import threading

    import psutil

    binary = slow_binary(2)
    with supervisor(tmp_path, binary, real_model) as sup:
        sup.wait_running(120)
        gen0 = sup.status()["generation"]
        codes: list[int] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=f"http://127.0.0.1:{sup.api_port}", timeout=120) as c:
                for i in range(25):
                    args = rng.choice([{"-np": rng.randint(1, 4)},
                                       {"--alias": f"client{seed}-{i}"},
                                       {"parallel": rng.randint(1, 4), "c": 1024}])
                    wait = "true" if rng.random() < 0.2 else "false"
                    r = c.post("/v1/params", params={"wait": wait}, json={"args": args})
                    with lock:
                        codes.append(r.status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        final = sup.post({"--alias": "last-write", "-np": 3})
        duration = time.monotonic() - started
        assert final.status_code == 200, final.text
        assert len(codes) == 200 and set(codes) <= {200, 202}, sorted(set(codes))
        restarts = sup.status()["generation"] - gen0
        restart_s = 2.0 + 1.0  # the wrapper's 2 s sleep + the model load, at least
        assert restarts <= duration / restart_s + 2, (restarts, duration)
        p = props(sup.port)
        assert p["total_slots"] == 3
        assert sup.stored()["args"]["--alias"] == "last-write"
        rss_mb = psutil.Process(sup.proc.pid).memory_info().rss / 2**20  # type: ignore[union-attr]
        assert rss_mb < 250, rss_mb


def test_two_supervisors_two_names_one_file(tmp_path: Path, real_binary: Path,
                                            real_model: Path) -> None:
    """Two supervisors with different --name keep their configs apart in one file."""
    config = tmp_path / "shared.toml"
    store = ["--config-file", str(config)]
    with supervisor(tmp_path, real_binary, real_model,
                    store_args=[*store, "--name", "alpha"]) as a, \
         supervisor(tmp_path, real_binary, real_model,
                    store_args=[*store, "--name", "beta"]) as b:
        a.wait_running(120)
        b.wait_running(120)
        assert a.post({"-np": 3}).status_code == 200
        assert b.post({"-np": 2, "-c": 1024}).status_code == 200
        data = tomllib.loads(config.read_text())
        assert data["alpha"]["args"]["--parallel"] == "3"
        assert data["beta"]["args"]["--parallel"] == "2"
        assert data["beta"]["args"]["--ctx-size"] == "1024"
        assert props(a.port)["total_slots"] == 3 and props(b.port)["total_slots"] == 2


def test_binary_change_runs_the_new_program(tmp_path: Path, real_binary: Path,
                                            real_model: Path) -> None:
    """A binary change runs the new program, and the new binary is stored."""
    import psutil

    other = tmp_path / "llama-server-other"
    other.symlink_to(real_binary)
    with supervisor(tmp_path, real_binary, real_model) as sup:
        sup.wait_running(120)
        r = sup.post({"binary": str(other)})
        assert r.status_code == 200, r.text
        status = sup.wait_running(60)
        assert status["config"]["binary"] == str(other)
        # What runs is the file checked at the start, exec'd through its open descriptor
        # (nothing re-pointed or renamed after the check can change it), under the real
        # file's name; the config keeps the name it was given.
        running = psutil.Process(status["pid"])
        assert running.exe() == os.path.realpath(other)
        assert running.name() == os.path.basename(os.path.realpath(other))
        assert running.cmdline()[0].endswith("/" + running.name())
        assert sup.stored()["binary"] == str(other)
