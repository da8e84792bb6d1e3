"""A fleet rollout on a real 3-member etcd cluster whose leader is killed mid-rollout (issue
12): the rollout completes, and every instance applies the revision exactly once.

Three supervisors on this machine (fake llama-server, ``--local-port``) are given all three
endpoints. etcd drops a proposal whose leader died; the client retries it at the next
endpoint after its timeout. Every rollout step is a compare-and-swap or idempotent, so a
retried step must never make an instance apply twice; this test counts the applies in each
supervisor's log and in its status (generation).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_etcd import EtcdCluster, EtcdServer
from tests.fleet_helpers import fleet_applies
from tests.harness import FAKE, SupervisorProcess, make_fake_model, props, supervisor, wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

NAME = "cluster"
CONFIG_KEY = f"/corral/configs/{NAME}"
ROLLOUT_KEY = f"/corral/rollouts/{NAME}"





def get(cluster: EtcdCluster, key: str) -> tuple[dict[str, Any], int] | None:
    """``key``'s JSON value and mod_revision, read from the running members."""
    out = json.loads(cluster.etcdctl("get", key, "-w", "json"))
    kvs = out.get("kvs") or []
    if not kvs:
        return None
    return json.loads(base64.b64decode(kvs[0]["value"])), int(kvs[0]["mod_revision"])


def record(cluster: EtcdCluster) -> dict[str, Any] | None:
    found = get(cluster, ROLLOUT_KEY)
    return found[0] if found else None


def make_leader(cluster: EtcdCluster, member: EtcdServer) -> None:
    """Hand the raft leadership to ``member`` (``etcdctl move-leader``), if it lacks it."""
    current = wait_for(cluster.leader, 5, "a leader")
    if current is member:
        return
    status = json.loads(member.etcdctl("endpoint", "status", "-w", "json",
                                       endpoints=member.url))
    member_id = int(status[0]["Status"]["header"]["member_id"])
    current.etcdctl("move-leader", format(member_id, "x"), endpoints=current.url)
    wait_for(lambda: cluster.leader() is member, 5, f"{member.name} the leader")


def fleet(tmp_path: Path, stack: ExitStack, cluster: EtcdCluster, endpoints: list[EtcdServer],
          model: Path) -> Iterator[SupervisorProcess]:
    driver = json.dumps({"type": "etcd", "addr": ",".join(m.addr for m in endpoints),
                         "name": NAME})
    for i in range(3):
        workdir = tmp_path / f"s{i}"
        workdir.mkdir()
        yield stack.enter_context(supervisor(
            workdir, FAKE, model, store_args=["--config-driver", driver,
                                              "--canary-seconds", "1", "--local-port"]))


@pytest.mark.parametrize(("in_use", "moment"), [
    ("leader in use", "canary"), ("a follower in use", "canary"), ("leader in use", "rolling")])
def test_leader_killed_mid_rollout_the_rollout_completes_and_each_applies_once(
        tmp_path: Path, etcd_cluster: EtcdCluster, in_use: str, moment: str) -> None:
    """The leader is killed once the canary claimed the revision (it is loading it), or once
    the rollout is rolling (the others take slots and apply): the rollout ends ``done``,
    every instance runs the revision, and each applied it exactly once."""
    leader = etcd_cluster.leader()
    followers = [m for m in etcd_cluster.members if m is not leader]
    # The supervisors use the first endpoint: the leader itself, or a follower that
    # forwards their writes to the leader (a proposal in flight is then dropped).
    first = leader if in_use == "leader in use" else followers[0]
    order = [first, *(m for m in etcd_cluster.members if m is not first)]
    model = make_fake_model(tmp_path / "model.gguf")
    with ExitStack() as stack:
        sups = list(fleet(tmp_path, stack, etcd_cluster, order, model))
        for sup in sups:
            sup.wait_running()
        wait_for(lambda: all(s.status()["fleet"]["in_sync"] for s in sups), 20,
                 "every instance in sync with the seeded config")
        ids = {s.status()["fleet"]["instance_id"] for s in sups}
        wait_for(lambda: set(sups[0].status()["fleet"]["rollout"]["live"]) == ids, 20,
                 "three registrations")
        boot = {s.status()["fleet"]["instance_id"]: s.status() for s in sups}

        seed = get(etcd_cluster, CONFIG_KEY)
        assert seed is not None
        args = dict(seed[0]["args"]) | {"--parallel": "4", "--fake-load-s": "1"}
        assert "--port" not in args, "--local-port: the port is not stored"
        etcd_cluster.etcdctl("put", CONFIG_KEY, json.dumps(
            {"binary": seed[0]["binary"], "args": [[k, v] for k, v in args.items()]}))
        written = get(etcd_cluster, CONFIG_KEY)
        assert written is not None
        revision = written[1]

        claimed = wait_for(lambda: (r := record(etcd_cluster)) and r["revision"] == revision
                        and r["canary"] and r["phase"] == moment and r, 20,
                        f"the rollout in phase {moment} (a canary claimed it)")
        # raft may have moved the leadership meanwhile (a loaded machine, 100 ms elections)
        if in_use == "leader in use":
            make_leader(etcd_cluster, first)
        elif etcd_cluster.leader() is first:
            make_leader(etcd_cluster, next(m for m in order if m is not first))
        leader = etcd_cluster.leader()
        assert (leader is first) == (in_use == "leader in use")
        etcd_cluster.kill(leader)
        new_leader = wait_for(lambda: etcd_cluster.leader(), 10, "a new leader")
        assert new_leader is not leader
        during = record(etcd_cluster)
        assert during is not None and during["phase"] in ("canary", "rolling"), \
            f"the leader was killed during the rollout, not after: {during}"

        done = wait_for(lambda: (r := record(etcd_cluster)) and r["revision"] == revision
                        and r["phase"] in ("done", "failed") and r, 45, "the rollout ended")
        assert done["phase"] == "done", done
        assert done["canary"] == claimed["canary"], "the canary never changed"
        assert done["progress"] == {i: "done" for i in ids}, done
        stored = get(etcd_cluster, CONFIG_KEY)
        assert stored is not None and stored[1] == revision, "nobody wrote the key again"

        def in_sync(sup: SupervisorProcess) -> bool:
            fleet = sup.status()["fleet"]
            return bool(fleet["in_sync"] and fleet["revision"] == revision)

        for sup in sups:
            wait_for(partial(in_sync, sup), 10, "in sync")
            status = sup.status()
            me = status["fleet"]["instance_id"]
            assert status["state"] == "RUNNING"
            assert props(sup.port)["total_slots"] == 4
            # exactly once: one restart since boot, one fleet change of the revision's config
            # in the change history (the audit log), and it ran
            assert status["generation"] == boot[me]["generation"] + 1, (me, status)
            applies = fleet_applies(sup.http.get("/v1/changes", params={"limit": 1000})
                                    .json()["changes"], **{"--parallel": "4"})
            assert [(a["outcome"], a["restarted"]) for a in applies] == [("applied", True)], \
                applies
