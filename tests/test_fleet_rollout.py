"""Fleet rollouts through a real etcd (issue 12): slots, canary first, revert, API changes.

Three supervisors of the fake llama-server share a config on one machine (``--local-port``:
each keeps its own port). Every instance's llama-server is probed while a rollout runs, so
"one at a time" and "canary first" are checked from what a client would see.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import (
    etcd_args,
    fleet_json,
    instance_of,
    phase,
    probing,
    put_config,
    record,
    stored,
)
from tests.harness import FAKE, SupervisorProcess, make_fake_model, supervisor, wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@contextmanager
def fleet_of(tmp_path: Path, etcd: EtcdServer, n: int = 3, *, extra: list[str] | None = None,
             canary_s: float = 0.5) -> Iterator[tuple[list[SupervisorProcess], Path]]:
    model = make_fake_model(tmp_path / "a.gguf")
    with ExitStack() as stack:
        sups = []
        for i in range(n):
            d = tmp_path / f"s{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, FAKE, model, store_args=etcd_args(etcd, canary_s=canary_s),
                extra_cli=extra)))
        for s in sups:
            s.wait_running()
        wait_for(lambda: (r := record(etcd)) and r["revision"] > 0
                 and len(r["progress"]) == n, 20, "the boot config stored, all in sync")
        yield sups, model


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_a_put_rolls_out_one_host_at_a_time_canary_first(tmp_path: Path,
                                                        etcd_server: EtcdServer) -> None:
    """etcdctl put: one instance down at a time, the canary alone until it has run for
    --canary-seconds, every instance applies the revision once, the rollout ends done."""
    canary_s = 1.0
    with fleet_of(tmp_path, etcd_server, canary_s=canary_s) as (sups, model):
        generations = [s.status()["generation"] for s in sups]
        with probing([s.port for s in sups]) as probes:
            put_config(etcd_server, [["--model", str(model)], ["--parallel", "4"],
                                     ["--fake-load-s", "0.4"]])
            done = wait_for(lambda: phase(etcd_server, "done"), 60, "rollout done")
            for s in sups:
                wait_for(lambda s=s: s.status()["state"] == "RUNNING", 10, "serving")
        assert probes.min_serving() >= 2, "never more than --max-unavailable 1 down"
        assert [s.status()["generation"] for s in sups] == [g + 1 for g in generations]
        assert all(s.status()["config"]["args"]["--parallel"] == "4" for s in sups)
        ids = [instance_of(s) for s in sups]
        canary = ids.index(done["canary"])
        assert set(done["progress"]) == set(ids) and done["reason"] is None
        # The others went down only after the canary had served for --canary-seconds.
        canary_up = probes.back_up(canary)
        assert canary_up is not None
        for i in set(range(3)) - {canary}:
            down = probes.first_down(i)
            assert down is not None and down >= canary_up + canary_s - 0.1, (i, down, canary_up)
        report = fleet_json(etcd_server)
        assert report["rollout"]["phase"] == "done" and report["rollout"]["canary"] == ids[canary]


def test_a_config_that_fails_at_the_canary_is_reverted_and_tried_nowhere_else(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A config that fails to start fails the rollout at its canary: only one llama-server
    ever runs it, the key holds the old config again, the others never restart."""
    with fleet_of(tmp_path, etcd_server) as (sups, model):
        before = stored(etcd_server)
        pids = [s.llama_pid() for s in sups]
        put_config(etcd_server, [["--model", str(model)], ["--fake-exit-at-start", "3"]])
        failed = wait_for(lambda: phase(etcd_server, "failed"), 60, "rollout failed")
        assert "exited with code 3" in failed["reason"]
        assert failed["reason"].startswith(failed["canary"])
        wait_for(lambda: stored(etcd_server) == before, 10, "the key reverted")
        for s in sups:
            s.wait_running()
        assert sum(s.started_with("--fake-exit-at-start") for s in sups) == 1
        canary = [instance_of(s) for s in sups].index(failed["canary"])
        for i, s in enumerate(sups):
            if i != canary:
                assert s.llama_pid() == pids[i], "a non-canary instance restarted"
        report = fleet_json(etcd_server)
        assert report["rollout"]["phase"] == "failed"
        assert "exited with code 3" in report["rollout"]["reason"]
        assert all(i["runs_fleet_config"] for i in report["instances"])


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_a_canary_killed_mid_apply_hands_over(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """SIGKILL of the canary while it loads: its slot and role come back within the lease
    TTL, another instance becomes the canary, and the rollout ends done."""
    with fleet_of(tmp_path, etcd_server) as (sups, model):
        ids = [instance_of(s) for s in sups]
        put_config(etcd_server, [["--model", str(model)], ["--parallel", "2"],
                                 ["--fake-load-s", "3"]])
        first = wait_for(lambda: (r := record(etcd_server)) and r["canary"], 30, "a canary")
        victim = sups[ids.index(first)]
        wait_for(lambda: victim.started_with("--fake-load-s 3"), 10, "the canary loading")
        victim.kill()
        killed_at = time.monotonic()
        second = wait_for(lambda: (r := record(etcd_server)) and r["canary"] not in (None, first)
                          and r["canary"], 20, "another canary")
        assert time.monotonic() - killed_at < 5 + 3, "within the lease TTL (5 s) and a margin"
        assert second in ids
        done = wait_for(lambda: phase(etcd_server, "done"), 60, "rollout done")
        survivors = [s for s in sups if s is not victim]
        assert all(s.status()["config"]["args"]["--parallel"] == "2" for s in survivors)
        assert set(done["progress"]) >= {instance_of(s) for s in survivors}


def test_an_api_change_is_tried_here_first_then_rolled_out(tmp_path: Path,
                                                          etcd_server: EtcdServer) -> None:
    """A change posted to one supervisor makes it the canary; the key is written only after
    its own success; ?wait=rollout answers 200 when the fleet is done, 504 with the progress
    after ?timeout=, and a change refused here never reaches the key."""
    with fleet_of(tmp_path, etcd_server) as (sups, model):
        answer = sups[1].http.post("/v1/params", params={"wait": "rollout", "timeout": 60},
                                   json={"args": {"-np": 3}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "applied" and body["rollout"]["phase"] == "done"
        assert body["rollout"]["canary"] == instance_of(sups[1])
        assert all(s.status()["config"]["args"]["--parallel"] == "3" for s in sups)
        # Refused here (pre-flight): nothing written, nobody restarted.
        revision = fleet_json(etcd_server)["revision"]
        pids = [s.llama_pid() for s in sups]
        refused = sups[0].post({"-m": str(tmp_path / "missing.gguf")})
        assert refused.status_code == 422
        assert fleet_json(etcd_server)["revision"] == revision
        assert [s.llama_pid() for s in sups] == pids
        # A rollout slower than ?timeout=: 504 with the progress so far.
        slow = sups[2].http.post("/v1/params", params={"wait": "rollout", "timeout": 0.5},
                                 json={"args": {"--fake-load-s": 1}})
        assert slow.status_code == 504, slow.text
        assert slow.json()["rollout"]["phase"] in ("canary", "rolling")
        wait_for(lambda: phase(etcd_server, "done"), 60, "the slow rollout done")


def test_a_late_joiner_starts_the_last_good_config_then_takes_part(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A supervisor starting while a canary proves a revision starts the last config that
    succeeded (not the untried one), then applies the revision like the others."""
    with fleet_of(tmp_path, etcd_server, n=2, canary_s=8.0) as (sups, model):
        put_config(etcd_server, [["--model", str(model)], ["--parallel", "6"]])
        wait_for(lambda: (r := record(etcd_server)) and r["phase"] == "canary"
                 and r["canary"] in r["progress"], 30, "the canary proving the revision")
        d = tmp_path / "late"
        d.mkdir()
        with supervisor(d, FAKE, model, store_args=etcd_args(etcd_server, canary_s=8.0)) as late:
            status = late.wait_running()
            assert status["generation"] == 1 and "--parallel" not in status["config"]["args"], \
                (status, record(etcd_server))
            first = next(line for line in late.starts() if "--model" in line)
            assert re.fullmatch(rf"--model {re.escape(str(model))} --port \d+", first), \
                late.starts()
            wait_for(lambda: phase(etcd_server, "done"), 60, "rollout done")
            wait_for(lambda: late.status()["config"]["args"].get("--parallel") == "6", 20,
                     "the late joiner took part")


def test_a_newer_revision_supersedes_one_still_rolling(tmp_path: Path,
                                                       etcd_server: EtcdServer) -> None:
    """A put while a rollout runs: everyone ends on the newest, which had its own canary."""
    with fleet_of(tmp_path, etcd_server) as (sups, model):
        put_config(etcd_server, [["--model", str(model)], ["--parallel", "2"],
                                 ["--fake-load-s", "1"]])
        wait_for(lambda: (r := record(etcd_server)) and r["canary"], 30, "first canary")
        put_config(etcd_server, [["--model", str(model)], ["--parallel", "5"]])
        done = wait_for(lambda: (r := phase(etcd_server, "done"))
                        and r["revision"] == fleet_json(etcd_server)["revision"] and r,
                        60, "the newest rolled out")
        assert done["canary"] is not None
        for s in sups:
            wait_for(lambda s=s: s.status()["config"]["args"].get("--parallel") == "5", 20,
                     "on the newest")


@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_max_unavailable_as_a_percentage(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """--max-unavailable 50% of 4 instances: two apply at once after the canary, never three."""
    with fleet_of(tmp_path, etcd_server, n=4, canary_s=0.3,
                  extra=["--max-unavailable", "50%"]) as (sups, model):
        with probing([s.port for s in sups]) as probes:
            put_config(etcd_server, [["--model", str(model)], ["--parallel", "3"],
                                     ["--fake-load-s", "1"]])
            wait_for(lambda: phase(etcd_server, "done"), 60, "rollout done")
        assert probes.min_serving() == 2, "two down at once (50 % of 4), never three"


def test_a_fleet_config_naming_a_binary_not_allowed_fails_its_canary(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """Least privilege in a fleet: a binary this host does not allow is a failed apply here,
    so a failed canary: the rollout fails with that reason and the key is reverted."""
    with fleet_of(tmp_path, etcd_server, n=2) as (sups, model):
        before = stored(etcd_server)
        marker = tmp_path / "ran"
        script = tmp_path / "not-llama.sh"
        script.write_text(f"#!/bin/sh\ntouch {marker}\n")
        script.chmod(0o755)
        etcd_server.etcdctl("put", "/corral/configs/fleet", json.dumps(
            {"binary": str(script), "args": [["--model", str(model)]]}))
        failed = wait_for(lambda: phase(etcd_server, "failed"), 30, "rollout failed")
        assert "binary not allowed" in failed["reason"]
        wait_for(lambda: stored(etcd_server) == before, 10, "the key reverted")
        assert not marker.exists(), "a binary that is not allowed never runs, not even --help"
