"""Fleet rollouts on simulated hosts (issue 12): each supervisor and its llama-server in a
network namespace of its own, every host on the same ``--port 8081``, etcd on its own host.

The hosts are the ones of tests/netns.py; the llama-server is the fake one. A partition is a
link set down on the bridge: the host keeps running, cut off from etcd, from its peers and
from the test process (which then asks it from inside, ``Host.http_get``).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests import procfs
from tests.fleet_helpers import fleet_applies
from tests.harness import FAKE, make_fake_model, wait_for
from tests.netns import (
    API_PORT,
    LLAMA_PORT,
    Host,
    HostSupervisor,
    NsEtcd,
    SimulatedNetwork,
    host_supervisor,
    simulated_network_fixture,  # noqa: F401 - the simulated_network fixture
    start_etcd,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

NAME = "fleet"
TTL_S = 5.0  # the registration lease (corral.store.etcd.registration.DEFAULT_TTL)
CONFIG_KEY = f"/corral/configs/{NAME}"
ROLLOUT_KEY = f"/corral/rollouts/{NAME}"





# etcd, read and written from the test process (the root namespace reaches etcd's host) ----

def get_kv(etcd: NsEtcd, key: str) -> dict[str, Any] | None:
    """``key``'s value (parsed JSON) and mod_revision, or None."""
    out = etcd.etcdctl("get", key, "-w", "json").stdout
    kvs = json.loads(out).get("kvs") or []
    if not kvs:
        return None
    value: dict[str, Any] = json.loads(base64.b64decode(kvs[0]["value"]))
    return {"value": value, "mod_revision": int(kvs[0]["mod_revision"])}


def record(etcd: NsEtcd) -> dict[str, Any] | None:
    """The rollout record of the fleet."""
    found = get_kv(etcd, ROLLOUT_KEY)
    return found["value"] if found else None


def stored(etcd: NsEtcd) -> tuple[dict[str, Any], int]:
    """The fleet config and its revision."""
    found = get_kv(etcd, CONFIG_KEY)
    assert found is not None, "no fleet config stored"
    return found["value"], found["mod_revision"]


def put_config(etcd: NsEtcd, **changes: str) -> int:
    """Write the stored fleet config with ``changes`` (flag -> value) as an operator would,
    with etcdctl; returns the new revision."""
    config, _ = stored(etcd)
    args = {k: v for k, v in config["args"]} | {f"--{k.replace('_', '-')}": v
                                                 for k, v in changes.items()}
    etcd.etcdctl("put", CONFIG_KEY, json.dumps({"binary": config["binary"],
                                               "args": [[k, v] for k, v in args.items()]}))
    _, revision = stored(etcd)
    return revision


def slot_holders(etcd: NsEtcd) -> list[str]:
    """Who holds or waits for a rollout slot (the slot keys live under their leases)."""
    out = etcd.etcdctl("get", "--prefix", "--keys-only", f"/corral/slots/{NAME}/").stdout
    return [key.rsplit("/", 1)[1] for key in out.split()]


def phase_of(etcd: NsEtcd, revision: int, phase: str) -> dict[str, Any] | None:
    r = record(etcd)
    return r if r and r["revision"] == revision and r["phase"] == phase else None


# the fleet --------------------------------------------------------------------------------

def fleet_cli(etcd: NsEtcd, canary_s: float, *extra: str) -> list[str]:
    """What a user of real hosts types: the same flags everywhere, no --local-port."""
    return ["--etcd", etcd.endpoint, "--name", NAME, "--canary-seconds", str(canary_s), *extra]


@contextmanager
def fleet(network: SimulatedNetwork, etcd: NsEtcd, model: Path, *, canary_s: float = 1.0,
          llama_args: list[str] | None = None) -> Iterator[list[HostSupervisor]]:
    """A supervisor on every host, all RUNNING, registered and in sync with the seed."""
    with ExitStack() as stack:
        sups = [stack.enter_context(host_supervisor(
            host, FAKE, model, list(llama_args or []), store_args=fleet_cli(etcd, canary_s)))
            for host in network.hosts]
        for sup in sups:
            sup.wait_running()
        wait_for(lambda: all(s.status()["fleet"]["in_sync"] for s in sups), 20,
                 "every host in sync with the seeded config")
        ids = {instance_id(s) for s in sups}
        wait_for(lambda: set((record(etcd) or {}).get("progress", {})) <= ids
                 and set(live(sups[0])) == ids, 20, "every host registered")
        yield sups


def instance_id(sup: HostSupervisor) -> str:
    return str(sup.status()["fleet"]["instance_id"])


def live(sup: HostSupervisor) -> list[str]:
    rollout = sup.status()["fleet"]["rollout"] or {}
    return list(rollout.get("live") or [])


def fleet_changes(sup: HostSupervisor, outcome: str | None = None) -> list[dict[str, Any]]:
    """``sup``'s fleet changes (its audit log, asked from inside), oldest first."""
    return fleet_applies(sup.changes_inside(), outcome)


def in_sync_at(sup: HostSupervisor, revision: int) -> dict[str, Any] | None:
    s = sup.status()
    return s if s["fleet"]["in_sync"] and s["fleet"]["revision"] == revision \
        and s["state"] == "RUNNING" else None


def serving_inside(host: Host) -> dict[str, Any]:
    """Asked from inside ``host`` (works while it is partitioned): it serves, and with what."""
    assert host.http_get(host.url(LLAMA_PORT, "/health")).status == 200
    props: dict[str, Any] = host.http_get(host.url(LLAMA_PORT, "/props")).json()
    return props


@pytest.fixture
def netns_etcd(simulated_network: SimulatedNetwork) -> NsEtcd:
    return start_etcd(simulated_network)


# a. a host cut off from etcd ---------------------------------------------------------------

def test_a_partitioned_host_applies_nothing_and_catches_up_or_keeps_the_last_good(
        simulated_network: SimulatedNetwork, netns_etcd: NsEtcd, tmp_path: Path) -> None:
    """host3 cut off from etcd keeps serving its config and applies nothing while host1 and
    host2 roll out an etcdctl write (done once its lease expired); healed, it applies the
    latest revision, once. Cut off again while a bad config fails at its canary and the key
    is reverted: healed, it stays on the last good config without a restart."""
    etcd = netns_etcd
    model = make_fake_model(tmp_path / "model.gguf")
    with fleet(simulated_network, etcd, model) as sups:
        cut, cut_host = sups[2], simulated_network.hosts[2]
        boot = {s.host.name: s.status() for s in sups}
        cut_id = instance_id(cut)

        # 1. cut off while a good config rolls out over the others
        cut_host.partition()
        revision = put_config(etcd, parallel="4")
        served: list[object] = []  # what the cut-off host served meanwhile, seen inside

        def done_while_serving() -> dict[str, Any] | None:
            try:  # recorded, not asserted: wait_for would retry a failed assertion
                health = cut_host.http_get(cut_host.url(LLAMA_PORT, "/health")).status
                slots = cut_host.http_get(cut_host.url(LLAMA_PORT, "/props")).json()
                served.append((health, slots["total_slots"]))
            except ConnectionError as exc:
                served.append(repr(exc))
            return phase_of(etcd, revision, "done")

        done = wait_for(done_while_serving, TTL_S + 20,
                     f"the rollout of revision {revision} done without {cut_host.name}")
        assert cut_id not in done["progress"], done
        assert len(served) >= 2 and set(served) == {(200, 1)}, served
        for sup in sups[:2]:
            assert in_sync_at(sup, revision), sup.status()
            assert sup.status()["config"]["args"]["--parallel"] == "4"
        # meanwhile the cut-off host served its running config and applied nothing
        assert serving_inside(cut_host)["total_slots"] == 1
        inside = cut.status_inside()
        assert inside["state"] == "RUNNING"
        assert inside["pid"] == boot[cut_host.name]["pid"]
        assert inside["generation"] == boot[cut_host.name]["generation"]
        assert inside["config"]["args"].get("--parallel") in (None, "1"), inside["config"]
        assert fleet_changes(cut) == [], "it applied no fleet write while cut off"
        assert cut_id not in live(sups[0]), "its lease expired"

        # ... and catches up once the link is back: one apply, of the latest revision
        cut_host.heal()
        status = wait_for(lambda: in_sync_at(cut, revision), 30,
                          f"{cut_host.name} in sync with revision {revision} after the heal")
        assert status["config"]["args"]["--parallel"] == "4"
        assert status["generation"] == boot[cut_host.name]["generation"] + 1
        assert status["pid"] != boot[cut_host.name]["pid"]
        applied = fleet_changes(cut)  # one apply, of the latest revision's config
        assert [(c["after"]["args"].get("--parallel"), c["outcome"]) for c in applied] == \
            [("4", "applied")], applied
        wait_for(lambda: (record(etcd) or {}).get("progress", {}).get(cut_id) == "done", 10,
                 f"{cut_host.name} marked done in the record")
        wait_for(lambda: cut_id in live(sups[0]), 10, f"{cut_host.name} registered again")
        good = {s.host.name: s.status() for s in sups}

        # 2. cut off again while a bad config fails at its canary and is reverted
        cut_host.partition()
        bad = put_config(etcd, fake_exit_at_start="2")
        failed = wait_for(lambda: phase_of(etcd, bad, "failed"), 30,
                          f"the rollout of revision {bad} failed")
        assert "exited with code 2" in failed["reason"], failed
        assert failed["canary"] in {instance_id(s) for s in sups[:2]}, failed
        reverted_config, reverted = wait_for(
            lambda: (c := stored(etcd))[1] > bad and c, 10, "the key reverted")
        assert "--fake-exit-at-start" not in dict(reverted_config["args"])
        assert dict(reverted_config["args"])["--parallel"] == "4"
        for sup in sups[:2]:
            wait_for(partial(in_sync_at, sup, reverted), 20,
                     f"{sup.host.name} on the reverted config")
        # the only fleet write that fails is the bad config: one rejected change in all
        assert sum(len(fleet_changes(s, "rejected")) for s in sups[:2]) == 1, \
            "exactly one instance (the canary) tried the bad config"
        assert cut.status_inside()["pid"] == good[cut_host.name]["pid"]

        cut_host.heal()
        status = wait_for(lambda: in_sync_at(cut, reverted), 30,
                          f"{cut_host.name} in sync with the reverted revision {reverted}")
        # it stayed on the last good config: never started the bad one, never restarted
        assert status["pid"] == good[cut_host.name]["pid"]
        assert status["generation"] == good[cut_host.name]["generation"]
        assert status["config"]["args"]["--parallel"] == "4"
        assert "--fake-exit-at-start" not in status["config"]["args"]
        assert fleet_changes(cut, "rejected") == [], "it never tried the bad config"
        applied = fleet_changes(cut)  # one apply, of the latest revision's config
        assert [(c["after"]["args"].get("--parallel"), c["outcome"]) for c in applied] == \
            [("4", "applied")], applied
        assert serving_inside(cut_host)["total_slots"] == 4
        final = record(etcd)
        assert final is not None and final["revision"] == bad and final["phase"] == "failed"
        wait_for(lambda: cut_id in live(sups[0]), 10, f"{cut_host.name} registered again")


# b. the canary cut off mid-rollout ---------------------------------------------------------

@pytest.mark.timing  # asserts on wall-clock durations: run alone
def test_a_canary_partitioned_mid_rollout_is_replaced_and_the_rollout_ends_done(
        simulated_network: SimulatedNetwork, netns_etcd: NsEtcd, tmp_path: Path) -> None:
    """The canary's host is cut off while it loads a slow config: its slot key goes with
    its lease (within the TTL), another instance claims the canary and the rollout ends
    ``done``; healed, the former canary (which finished its apply alone) is in sync,
    registered again and marked done, having applied the revision once."""
    etcd = netns_etcd
    model = make_fake_model(tmp_path / "model.gguf")
    load_s, canary_s = 3.0, 2.0
    with fleet(simulated_network, etcd, model, canary_s=canary_s) as sups:
        by_id = {instance_id(s): s for s in sups}
        boot = {i: s.status() for i, s in by_id.items()}
        revision = put_config(etcd, parallel="3", fake_load_s=str(load_s))
        first = wait_for(lambda: (r := record(etcd)) and r["revision"] == revision
                         and r["canary"] and r, 10, "a canary claimed the new revision")
        canary = by_id[first["canary"]]
        assert first["canary"] in slot_holders(etcd)
        canary.host.partition()
        cut_at = time.monotonic()

        # its lease expires: its slot returns and another instance becomes the canary
        wait_for(lambda: first["canary"] not in slot_holders(etcd), TTL_S + 2,
                 "the partitioned canary's slot back within the lease TTL")
        second = wait_for(lambda: (r := record(etcd)) and r["canary"] not in (
            None, first["canary"]) and r, TTL_S + 3 - (time.monotonic() - cut_at),
            "another canary within the lease TTL (and a margin)")
        assert second["revision"] == revision and second["phase"] == "canary", second
        others = [s for s in sups if s is not canary]
        # then: the new canary's load and proof, the last instance's load
        budget = TTL_S + 2 * load_s + canary_s + 15  # the margin: a loaded 2-core machine
        done = wait_for(lambda: phase_of(etcd, revision, "done"),
                        budget - (time.monotonic() - cut_at), "the rollout done")
        assert done["canary"] == second["canary"]
        assert {i for i, p in done["progress"].items() if p == "done"} >= {
            instance_id(s) for s in others}
        for sup in others:
            status = in_sync_at(sup, revision)
            assert status and status["config"]["args"]["--parallel"] == "3", sup.status()
            assert status["generation"] == boot[instance_id(sup)]["generation"] + 1
            assert [c["after"]["args"].get("--parallel") for c in fleet_changes(sup)] == ["3"]

        # the cut-off canary finished its own apply alone, and converges after the heal
        canary.host.heal()
        status = wait_for(lambda: in_sync_at(canary, revision), 30,
                          "the former canary in sync after the heal")
        assert status["config"]["args"]["--parallel"] == "3"
        assert status["generation"] == boot[first["canary"]]["generation"] + 1
        assert [c["after"]["args"].get("--parallel") for c in fleet_changes(canary)] == ["3"]
        wait_for(lambda: all(first["canary"] in live(s) for s in sups), 10,
                 "its registration back, seen by everyone")
        wait_for(lambda: (record(etcd) or {}).get("progress", {}).get(first["canary"])
                 == "done", 10, "the former canary marked done")
        final = record(etcd)
        assert final is not None and final["phase"] == "done" and final["revision"] == revision
        assert stored(etcd)[1] == revision


# c. corral fleet lists hosts by address ----------------------------------------------------

def test_corral_fleet_lists_the_hosts_by_their_addresses(
        simulated_network: SimulatedNetwork, netns_etcd: NsEtcd, tmp_path: Path) -> None:
    """corral fleet, as JSON and as a table, lists each host by its address and the done rollout."""
    etcd = netns_etcd
    model = make_fake_model(tmp_path / "model.gguf")
    with fleet(simulated_network, etcd, model, canary_s=0.5) as sups:
        revision = put_config(etcd, parallel="2")
        wait_for(lambda: phase_of(etcd, revision, "done"), 30, "the rollout done")
        for sup in sups:
            wait_for(partial(in_sync_at, sup, revision), 10, "in sync")

        def corral_fleet(*extra: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "corral", "fleet", "--etcd", etcd.endpoint,
                 "--name", NAME, *extra], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        # wait for the registrations to carry the new config (refreshed every 0.5 s)
        report = wait_for(lambda: (r := json.loads(corral_fleet("--json")))["instances"]
                          and all(i["runs_fleet_config"] for i in r["instances"]) and r,
                          10, "every host on the fleet config in the report")
        assert report["revision"] == revision
        assert sorted(i["supervisor"] for i in report["instances"]) == sorted(
            f"{h.addr}:{API_PORT}" for h in simulated_network.hosts)
        assert {i["port"] for i in report["instances"]} == {LLAMA_PORT}
        assert report["rollout"]["revision"] == revision
        assert report["rollout"]["phase"] == "done"

        table = corral_fleet()
        lines = table.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("INSTANCE"))
        column = lines[header].index("SUPERVISOR")
        rows = [line for line in lines[header + 1:] if line.strip() and "instance(s)" not in line]
        assert sorted(row[column:].split()[0] for row in rows) == sorted(
            f"{h.addr}:{API_PORT}" for h in simulated_network.hosts), table
        assert all(row.split()[2] == str(LLAMA_PORT) for row in rows), table
        assert f"rollout of revision {revision}: DONE" in table, table
        assert f"canary {report['rollout']['canary']}" in table, table
        assert "3 instance(s)" in table


# d. one host's clean-up never touches another host's server -------------------------------

def test_a_restarted_supervisor_cleans_up_only_its_own_host(
        simulated_network: SimulatedNetwork, netns_etcd: NsEtcd, tmp_path: Path) -> None:
    """Every host's llama-server leaves a grandchild behind (PDEATHSIG reaches only the
    server): the restarted supervisor of host1 kills what host1's predecessor left, and
    nothing of host2's or host3's."""
    etcd = netns_etcd
    model = make_fake_model(tmp_path / "model.gguf")
    pids_file = tmp_path / "fake-pids"  # "<server pid> <grandchild pid>" per start
    llama_args = ["--fake-grandchild", "--fake-pidfile", str(pids_file)]
    with fleet(simulated_network, etcd, model, llama_args=llama_args) as sups:
        grandchild = {int(line.split()[0]): int(line.split()[1])
                      for line in pids_file.read_text().splitlines()}
        before = {s.host.name: s.status() for s in sups}
        victim, host = sups[0], simulated_network.hosts[0]
        old_server = before[host.name]["pid"]
        old_grandchild = grandchild[old_server]
        assert victim.proc is not None

        victim.kill()                                   # SIGKILL the supervisor
        wait_for(lambda: not procfs.is_alive(old_server), 5, "its llama-server gone (PDEATHSIG)")
        assert procfs.is_alive(old_grandchild), "the grandchild outlives it"

        with host_supervisor(host, FAKE, model, list(llama_args),
                             store_args=fleet_cli(etcd, 1.0)) as restarted:
            status = restarted.wait_running()
            assert status["pid"] != old_server
            wait_for(lambda: not procfs.is_alive(old_grandchild), 5,
                     "host1's leftover killed by host1's restarted supervisor")
            wait_for(lambda: restarted.status()["fleet"]["in_sync"], 10, "host1 in sync")
            for sup in sups[1:]:
                now = sup.status()
                name = sup.host.name
                assert now["pid"] == before[name]["pid"], f"{name}'s llama-server restarted"
                assert now["generation"] == before[name]["generation"]
                assert procfs.is_alive(before[name]["pid"])
                assert procfs.is_alive(grandchild[before[name]["pid"]]), \
                    f"{name}'s grandchild killed by host1's clean-up"
