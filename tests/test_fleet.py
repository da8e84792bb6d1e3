"""Fleets through a real etcd: shared configs, registration, outages (issue: etcd driver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import etcd_args, fleet_json, stored
from tests.harness import (
    FAKE,
    SupervisorProcess,
    make_fake_model,
    pid_alive,
    props,
    supervisor,
    wait_for,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


def test_the_stored_config_wins_port_included(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """As with the file driver, the stored config wins at start, port included: a restart
    with another --port comes back on the stored one."""
    model = make_fake_model(tmp_path / "a.gguf")
    shared = etcd_args(etcd_server, local_port=False)
    with supervisor(tmp_path, FAKE, model, store_args=shared) as sup:
        sup.wait_running()
        value = wait_for(lambda: stored(etcd_server), 10, "the boot config in etcd")
        assert dict(value["args"])["--port"] == str(sup.port), "the port is the fleet's"
        answer = sup.http.post("/v1/params", params={"wait": "rollout"}, json={"args": {"-np": 3}})
        assert answer.status_code == 200, answer.text  # proven here: not a rollout under way
        port = sup.port
        sup.stop()
    with supervisor(tmp_path, FAKE, model, ["-np", "1"], store_args=shared) as sup:
        assert sup.port != port
        status = sup.wait_running()
        assert status["config"]["args"]["--parallel"] == "3"
        assert status["port"] == port and props(port)["total_slots"] == 3
        assert status["config"]["args"] == {k: v for k, v in stored(etcd_server)["args"]}


def test_a_config_stored_without_a_port_runs_on_the_command_lines(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """Configs stored by earlier versions have no port: the command line's is used, so an
    upgrade moves nobody."""
    model = make_fake_model(tmp_path / "a.gguf")
    config = {"binary": str(FAKE), "args": [["--model", str(model)], ["--parallel", "2"]]}
    etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(config))
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server,
                                                                local_port=False)) as sup:
        assert sup.wait_running()["port"] == sup.port
        assert props(sup.port)["total_slots"] == 2


def test_local_port_keeps_this_instances_port(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """With --local-port an apply is stored without the port, and the API may not change it."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server)) as sup:
        sup.wait_running()
        value = wait_for(lambda: stored(etcd_server), 10, "the boot config in etcd")
        assert "--port" not in dict(value["args"]), "the port is per instance"
        answer = sup.http.post("/v1/params", params={"wait": "rollout"}, json={"args": {"-np": 3}})
        assert answer.status_code == 200, answer.text  # proven here: not a rollout under way
        assert dict(stored(etcd_server)["args"])["--parallel"] == "3"
        refused = sup.post({"--port": sup.port + 1})
        assert refused.status_code == 422 and "--local-port" in refused.json()["error"]
        port = sup.port
        sup.stop()
    with supervisor(tmp_path, FAKE, model, ["-np", "1"], port=port,
                    store_args=etcd_args(etcd_server)) as sup:
        assert sup.wait_running()["config"]["args"]["--parallel"] == "3"
        assert props(port)["total_slots"] == 3


def test_three_supervisors_follow_an_etcdctl_put(tmp_path: Path,
                                                 etcd_server: EtcdServer) -> None:
    """Three supervisors register, follow a config put with etcdctl, and follow a peer's apply."""
    model = make_fake_model(tmp_path / "a.gguf")
    other = make_fake_model(tmp_path / "b.gguf")
    with ExitStack() as stack:
        sups: list[SupervisorProcess] = []
        for i in range(3):
            d = tmp_path / f"s{i}"
            d.mkdir()
            sups.append(stack.enter_context(
                supervisor(d, FAKE, model, store_args=etcd_args(etcd_server))))
        for s in sups:
            s.wait_running()
        wait_for(lambda: len(fleet_json(etcd_server)["instances"]) == 3, 15, "3 registrations")
        config = {"binary": str(FAKE), "args": [["--model", str(other)], ["--parallel", "5"]]}
        etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(config))
        for s in sups:
            wait_for(lambda s=s: props(s.port)["total_slots"] == 5, 30, "fleet config applied")
            assert props(s.port)["model_path"] == str(other)
            wait_for(lambda s=s: s.status()["fleet"]["in_sync"], 10, "in sync")
        # Nobody applied it twice: one restart each (boot + the fleet config).
        assert all(s.status()["generation"] == 2 for s in sups)
        report = wait_for(lambda: (r := fleet_json(etcd_server))["instances"] and all(
            i["runs_fleet_config"] for i in r["instances"]) and r, 15, "all on the fleet config")
        assert len(report["instances"]) == 3
        assert {i["port"] for i in report["instances"]} == {s.port for s in sups}
        # An API apply on one supervisor reaches the other two.
        assert sups[0].post({"-np": 2}).status_code == 200
        for s in sups[1:]:
            wait_for(lambda s=s: props(s.port)["total_slots"] == 2, 30, "peer apply followed")


def test_kill_9_of_a_supervisor_drops_its_registration(tmp_path: Path,
                                                       etcd_server: EtcdServer) -> None:
    """A SIGKILLed supervisor's llama-server dies and its registration expires with the lease."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server)) as sup:
        pid = sup.wait_running()["pid"]
        wait_for(lambda: len(fleet_json(etcd_server)["instances"]) == 1, 15, "registered")
        sup.kill()
        wait_for(lambda: not pid_alive(pid), 1, "llama-server gone")
        wait_for(lambda: fleet_json(etcd_server)["instances"] == [], 10, "key gone within TTL")


def test_a_host_where_the_fleet_config_fails_keeps_its_last_good(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A fleet config that fails here (the canary) fails the rollout: the key goes back to
    the last good config, and the last good one keeps running."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server)) as sup:
        sup.wait_running()
        bad = {"binary": str(FAKE), "args": [["--model", str(model)],
                                             ["--fake-exit-at-start", "2"]]}
        etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(bad))
        status = wait_for(lambda: (s := sup.status())["fleet"]["rollout"]["phase"] == "failed"
                          and s, 30, "the rollout failed")
        assert "exited with code 2" in status["fleet"]["rollout"]["reason"]
        assert sup.wait_running()["config"]["args"].get("--fake-exit-at-start") is None
        assert props(sup.port)["model_path"] == str(model)
        wait_for(lambda: "--fake-exit-at-start" not in dict(stored(etcd_server)["args"]), 10,
                 "the key reverted")
        assert sup.status()["fleet"]["in_sync"] is True  # with the reverted key


def test_etcd_outages(tmp_path: Path, etcd_server: EtcdServer, health_watch) -> None:  # type: ignore[no-untyped-def]
    """Paused (10 s) and restarted etcd: serving goes on, writes fail clearly, changes catch up."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server)) as sup:
        pid = sup.wait_running()["pid"]
        wait_for(lambda: stored(etcd_server), 10, "boot config stored")
        paused_at = time.monotonic()
        etcd_server.pause()
        try:
            with health_watch(sup.port) as watch:
                wait_for(lambda: sup.status()["store_connected"] is False, 15, "outage noticed")
                r = sup.post({"-np": 4})
                assert r.status_code == 503 and "unreachable" in r.json()["error"]
                wait_for(lambda: time.monotonic() - paused_at >= 10, 15, "10 s of SIGSTOP")
            assert watch.failures == [] and watch.probes > 50
            assert props(sup.port)["total_slots"] == 1 and sup.llama_pid() == pid
        finally:
            etcd_server.resume()
        wait_for(lambda: sup.status()["store_connected"] is True, 15, "reconnected")
        etcd_server.stop()
        wait_for(lambda: sup.status()["store_connected"] is False, 15, "etcd stop noticed")
        assert props(sup.port)["total_slots"] == 1
        etcd_server.start()
        # A change made by someone else right after the restart is applied here.
        config = {"binary": str(FAKE), "args": [["--model", str(model)], ["--parallel", "6"]]}
        etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(config))
        wait_for(lambda: props(sup.port)["total_slots"] == 6, 30, "caught up after restart")
        wait_for(lambda: len(fleet_json(etcd_server)["instances"]) == 1, 15, "re-registered")


def test_start_with_etcd_down_runs_cli_config_then_catches_up(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """With etcd down at start the CLI config runs; the fleet config follows once etcd is up."""
    model = make_fake_model(tmp_path / "a.gguf")
    config = {"binary": str(FAKE), "args": [["--model", str(model)], ["--parallel", "7"]]}
    etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(config))
    etcd_server.stop()
    with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server)) as sup:
        sup.wait_running()
        assert props(sup.port)["total_slots"] == 1
        assert sup.status()["store_connected"] is False, "etcd is known to be unreachable"
        etcd_server.start()
        wait_for(lambda: props(sup.port)["total_slots"] == 7, 30, "caught up")


def test_etcd_driver_without_server_and_two_drivers(tmp_path: Path) -> None:
    """Two config drivers at once are a usage error."""
    model = make_fake_model(tmp_path / "a.gguf")
    out = subprocess.run(
        [sys.executable, "-m", "corral", "supervise", "--binary", str(FAKE), "--model",
         str(model), "--config-file", str(tmp_path / "c.toml"), "--etcd", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 2 and "choose one config driver" in out.stderr
