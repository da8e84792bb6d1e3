"""Fleet rollouts with the real llama-server and a real etcd (issue 12's main paths).

Three supervisors with ``--swap stop-first`` (so unavailability is visible) share a config;
every llama-server's /health is probed every 50 ms while a rollout runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import (
    etcd_args,
    fleet_applies,
    fleet_json,
    instance_of,
    phase,
    probing,
    stored,
    watching_proc,
)
from tests.harness import SupervisorProcess, corrupt_gguf, props, supervisor, wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.real, pytest.mark.slow]

NAME = "real"


@contextmanager
def real_fleet(tmp_path: Path, etcd: EtcdServer, binary: Path,
               model: Path) -> Iterator[list[SupervisorProcess]]:
    with ExitStack() as stack:
        sups = []
        for i in range(3):
            d = tmp_path / f"r{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, binary, model, store_args=etcd_args(etcd, NAME, canary_s=1.0),
                extra_cli=["--swap", "stop-first"])))
        for s in sups:
            s.wait_running(120)
        wait_for(lambda: (r := phase(etcd, "done", NAME)) and len(r["progress"]) == 3, 30,
                 "the boot config stored, all in sync")
        yield sups


def put(etcd: EtcdServer, binary: Path, args: list[list[str]]) -> None:
    import json

    etcd.etcdctl("put", f"/corral/configs/{NAME}",
                 json.dumps({"binary": str(binary), "args": args}))


@pytest.mark.timing  # probes or timed steps: run alone
def test_real_rollout_keeps_two_of_three_serving(
        tmp_path: Path, etcd_server: EtcdServer, real_binary: Path, real_model: Path,
        model_alias) -> None:  # type: ignore[no-untyped-def]
    """etcdctl put of a good config: at no probe fewer than two llama-servers serve, every
    instance ends on the new config, the rollout ends done."""
    other = model_alias("fleet-b")
    with real_fleet(tmp_path, etcd_server, real_binary, real_model) as sups:
        with probing([s.port for s in sups]) as probes:
            put(etcd_server, real_binary, [["--model", str(other)], ["--parallel", "2"]])
            done = wait_for(lambda: phase(etcd_server, "done", NAME), 180, "rollout done")
        assert len(probes.samples) > 50
        assert probes.min_serving() >= 2, "never more than one instance down"
        assert any(not all(up) for _, up in probes.samples), "stop-first: each was down once"
        for s in sups:
            assert props(s.port)["model_path"] == str(other)
            assert props(s.port)["total_slots"] == 2
        assert set(done["progress"]) == {instance_of(s) for s in sups}
        assert all(i["runs_fleet_config"] for i in fleet_json(etcd_server, NAME)["instances"])


def test_real_config_that_fails_to_load_runs_on_one_host_only(
        tmp_path: Path, etcd_server: EtcdServer, real_binary: Path,
        real_model: Path) -> None:
    """A GGUF truncated after its header: exactly one llama-server ever runs it, the key
    holds the old config again, ``corral fleet`` says why, the others never restarted."""
    bad = corrupt_gguf(tmp_path, real_model)
    with real_fleet(tmp_path, etcd_server, real_binary, real_model) as sups:
        before = stored(etcd_server, NAME)
        pids = [s.llama_pid() for s in sups]
        with watching_proc(str(bad)) as seen:
            put(etcd_server, real_binary, [["--model", str(bad)]])
            failed = wait_for(lambda: phase(etcd_server, "failed", NAME), 120, "rollout failed")
            wait_for(lambda: stored(etcd_server, NAME) == before, 10, "the key reverted")
            for s in sups:
                s.wait_running(120)
        # Who tried it: each host's change history (a llama-server that fails at once on a
        # truncated file can live less than one /proc scan; the sample may only miss it).
        tried = [fleet_applies(s.http.get("/v1/changes", params={"limit": 1000}).json()
                               ["changes"]) for s in sups]
        canary = [instance_of(s) for s in sups].index(failed["canary"])
        assert [len(t) for t in tried] == [int(i == canary) for i in range(len(sups))], tried
        assert tried[canary][0]["outcome"] == "rejected", tried[canary]
        assert "exited with code" in tried[canary][0]["error"], tried[canary]
        assert len(seen.pids) <= 1, f"llama-servers that ran it: {seen.pids} ({seen.others})"
        assert [s.llama_pid() for i, s in enumerate(sups) if i != canary] == \
            [p for i, p in enumerate(pids) if i != canary], "a non-canary instance restarted"
        report = fleet_json(etcd_server, NAME)
        assert report["rollout"]["phase"] == "failed"
        assert report["rollout"]["reason"].startswith(failed["canary"])
        assert all(i["runs_fleet_config"] for i in report["instances"])
