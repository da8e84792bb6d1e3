"""``corral balance`` with a real HAProxy and a real etcd (issue 20): the backend follows the
fleet's registrations, with no HAProxy reload.

HAProxy runs on loopback ports with its admin socket in the test's directory; what is
asserted is HAProxy's own ``show servers state`` and requests sent through it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from corral.fleet.drain import DrainKeys, drained
from corral.fleet.keys import FleetKeys
from corral.store.etcd import EtcdStore
from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import etcd_args, fleet_json, instance_of, phase, put_config
from tests.haproxy_helpers import HAPROXY, Clients, balancer, haproxy, p99, registration
from tests.harness import FAKE, SupervisorProcess, free_port, make_fake_model, supervisor
from tests.waiting import wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


def test_a_host_joins_gets_traffic_and_leaves_when_its_lease_expires(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A supervisor that registers is added (its front door) and answers through HAProxy;
    killed with SIGKILL, its server is drained and deleted within the lease TTL; the
    static server in the backend is never touched."""
    model = make_fake_model(tmp_path / "a.gguf")
    listen = f"127.0.0.1:{free_port()}"
    with haproxy(tmp_path) as h, balancer(tmp_path, etcd_server, h):
        static = h.servers()["static1"]
        with supervisor(tmp_path, FAKE, model, store_args=etcd_args(etcd_server),
                        extra_cli=["--listen", listen]) as sup:
            sup.wait_running()
            name = f"corral-{instance_of(sup)}"
            server = wait_for(lambda: (s := h.ours().get(name)) and s.op == 2 and s, 20,
                              "the supervisor's server added, ready and up",
                              explain=lambda: h.ask("show servers state"))
            assert (server.address, server.port, server.admin) == ("127.0.0.1",
                                                                   int(listen.split(":")[1]), 0)
            with httpx.Client(base_url=h.url, timeout=10, trust_env=False) as http:
                assert http.get("/v1/models").status_code == 200
            wait_for(lambda: fleet_json(etcd_server)["instances"][0]["balancer"] == "ready",
                     10, "corral fleet shows the instance ready in HAProxy")
            sup.kill()
            killed = time.monotonic()
            wait_for(lambda: name not in h.servers(), 15, "the dead host's server deleted",
                     explain=lambda: h.ask("show servers state"))
            gone_after = time.monotonic() - killed
        print(f"host killed -> its server deleted from HAProxy in {gone_after:.2f} s")
        assert gone_after < 5 + 3  # the lease TTL (5 s) and a round or two
        assert h.servers()["static1"] == static


def test_fatal_goes_to_maintenance_and_a_restarted_haproxy_is_rebuilt(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A registration whose state is FATAL puts its server in maintenance, RUNNING again
    makes it ready; after HAProxy restarts (servers gone) the backend is rebuilt."""
    port = free_port()
    info = {"supervisor": "127.0.0.1:1", "listen": f"127.0.0.1:{port}", "state": "RUNNING"}
    with haproxy(tmp_path) as h, balancer(tmp_path, etcd_server, h):
        lease = registration(etcd_server, "a", json.dumps(info), ttl=30)
        wait_for(lambda: (s := h.ours().get("corral-a")) and s.admin == 0, 10, "added ready")
        etcd_server.etcdctl("put", "--lease", lease, "/corral/instances/fleet/a",
                            json.dumps({**info, "state": "FATAL"}))
        wait_for(lambda: h.ours()["corral-a"].admin & 1, 10, "FATAL: in maintenance")
        etcd_server.etcdctl("put", "--lease", lease, "/corral/instances/fleet/a",
                            json.dumps(info))
        wait_for(lambda: h.ours()["corral-a"].admin == 0, 10, "RUNNING: ready again")
        h.stop()
        h.start()
        assert "corral-a" not in h.servers()
        wait_for(lambda: (s := h.ours().get("corral-a")) and s.admin == 0, 10,
                 "the restarted HAProxy's backend rebuilt")


def test_two_balancers_on_one_haproxy_agree(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """Two ``corral balance`` on one HAProxy converge to one server per instance and both
    remove it when the instance leaves."""
    info = {"supervisor": "127.0.0.1:1", "listen": f"127.0.0.1:{free_port()}",
            "state": "RUNNING"}
    with haproxy(tmp_path) as h, balancer(tmp_path, etcd_server, h), \
            balancer(tmp_path, etcd_server, h):
        leases = [registration(etcd_server, i, json.dumps(info), ttl=30) for i in "abc"]
        wait_for(lambda: set(h.ours()) == {"corral-a", "corral-b", "corral-c"}, 10,
                 "three servers")
        etcd_server.etcdctl("lease", "revoke", leases[1])
        wait_for(lambda: set(h.ours()) == {"corral-a", "corral-c"}, 10, "b deleted")
        assert all(s.admin == 0 for s in h.ours().values())


@pytest.mark.timing  # measures request latencies during a rollout: run alone
@pytest.mark.parametrize("trigger", ["etcdctl put", "API change"])
def test_a_stop_first_rollout_through_haproxy_loses_nothing_and_holds_nothing(
        tmp_path: Path, etcd_server: EtcdServer, trigger: str) -> None:
    """Three supervisors (--listen, stop-first, a 2 s model load) behind HAProxy and corral
    balance; 4 clients through HAProxy while a rollout runs (started by a put, or by an API
    change whose supervisor is the canary): 0 failed requests, and none waited for a model
    load (each host was drained before it applied)."""
    load_s = 2.0
    model = make_fake_model(tmp_path / "a.gguf")
    with ExitStack() as stack:
        h = stack.enter_context(haproxy(tmp_path))
        stack.enter_context(balancer(tmp_path, etcd_server, h))
        sups = []
        for i in range(3):
            d = tmp_path / f"s{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, FAKE, model, store_args=etcd_args(etcd_server, canary_s=0.5),
                extra_cli=["--listen", f"127.0.0.1:{free_port()}", "--swap", "stop-first",
                           "--balancer-drain-timeout", "10"])))
        for s in sups:
            s.wait_running()
        wait_for(lambda: len([s for s in h.ours().values() if s.op == 2 and s.admin == 0])
                 == 3, 20, "three servers up and ready", explain=lambda: h.ask(
                     "show servers state"))
        clients = stack.enter_context(Clients(h.url))
        wait_for(lambda: len(clients.sent) >= 200, 30, "traffic before the rollout")
        before = time.monotonic()
        wait_for(lambda: time.monotonic() - before > 3 and clients.sent, 10, "3 s of traffic")
        begin = time.monotonic()
        if trigger == "API change":
            answer = sups[0].post({"--fake-load-s": load_s})
            assert answer.status_code == 200, answer.text
        else:
            put_config(etcd_server, [["--model", str(model)], ["--fake-load-s", str(load_s)]])
        wait_for(lambda: phase(etcd_server, "done") and all(
            s.status()["state"] == "RUNNING" for s in sups), 90, "rollout done")
        end = time.monotonic()
        wait_for(lambda: len([s for s in h.ours().values() if s.admin == 0]) == 3, 10,
                 "all three ready again")
    warm = [s.end - s.start for s in clients.between(before, begin) if s.ok]
    during = clients.between(begin, end)
    worst = max(s.end - s.start for s in during)
    failed = [s for s in during if not s.ok]
    rate_before = len(warm) / (begin - before)
    rate_during = len(during) / (end - begin)
    print(f"\nrollout ({trigger}) through HAProxy with corral balance: {len(during)} requests in "
          f"{end - begin:.1f} s, {len(failed)} failed; p99 before {p99(warm) * 1000:.0f} ms, "
          f"worst during {worst * 1000:.0f} ms (by hand, static backend: 11.95 s); "
          f"{rate_before:.0f} req/s before, {rate_during:.0f} req/s during")
    assert not failed
    assert worst < load_s, "a request waited for a model load: a host was not drained"
    assert rate_during >= rate_before * 2 / 3


class _Facts:
    """The keys under /corral/ as a watcher would keep them, re-read at every wait."""

    def __init__(self, etcd: EtcdStore) -> None:
        self.etcd, self.kvs, self.version = etcd, {}, 0

    async def refresh(self) -> None:
        found = await self.etcd.client.range("/corral/", prefix=True)
        self.kvs = {kv.key: kv for kv in found.kvs}
        self.version += 1

    async def changed_since(self, seen: int, timeout: float | None) -> None:
        await asyncio.sleep(min(timeout or 0.05, 0.05))  # paces the polls of this stand-in
        await self.refresh()


@pytest.mark.timing  # the drain timeout is wall-clock time
async def test_the_drain_hand_shake_without_a_balancer_and_with_a_silent_one(
        etcd_server: EtcdServer) -> None:
    """No balancer registered: nothing is written and nothing waits; a balancer that never
    acknowledges holds the apply back only for the drain timeout; the request is deleted
    after the block."""
    etcd = EtcdStore.connect(etcd_server.addr)
    try:
        keys = DrainKeys(FleetKeys.of(etcd, "fleet"))
        facts = _Facts(etcd)
        await facts.refresh()
        lease = await etcd.client.lease_grant(10)
        async with drained(etcd.client, keys, "me", lease, facts, 5.0) as outcome:
            assert outcome == "no balancer"
            assert await etcd.client.get(keys.drain("me")) is None
        await etcd.client.put(keys.balancer("b1"), "{}", lease=lease)
        await facts.refresh()
        started = time.monotonic()
        async with drained(etcd.client, keys, "me", lease, facts, 0.3) as outcome:
            assert outcome == "timed out" and 0.3 <= time.monotonic() - started < 2
            assert await etcd.client.get(keys.drain("me")) is not None
        assert await etcd.client.get(keys.drain("me")) is None
    finally:
        await etcd.close()


@pytest.mark.timing  # measures how soon a joiner gets traffic
def test_under_load_a_killed_host_costs_only_its_requests_in_flight_and_a_joiner_serves(
        tmp_path: Path, etcd_server: EtcdServer) -> None:
    """4 clients through HAProxy: a supervisor killed with SIGKILL leaves the backend within
    the lease TTL and only requests in flight at the kill may fail; a fourth supervisor
    that joins serves requests within seconds."""
    model = make_fake_model(tmp_path / "a.gguf")

    def start(stack: ExitStack, i: int) -> SupervisorProcess:
        d = tmp_path / f"s{i}"
        d.mkdir()
        return stack.enter_context(supervisor(
            d, FAKE, model, store_args=etcd_args(etcd_server),
            extra_cli=["--listen", f"127.0.0.1:{free_port()}"]))

    with ExitStack() as stack:
        h = stack.enter_context(haproxy(tmp_path))
        stack.enter_context(balancer(tmp_path, etcd_server, h))
        sups = [start(stack, i) for i in range(3)]
        for s in sups:
            s.wait_running()
        wait_for(lambda: len([s for s in h.ours().values() if s.op == 2]) == 3, 20, "3 up")
        with Clients(h.url) as clients:  # stopped before any supervisor is
            wait_for(lambda: len(clients.sent) >= 100, 30, "traffic")
            victim = f"corral-{instance_of(sups[0])}"
            killed = time.monotonic()
            sups[0].kill()
            wait_for(lambda: victim not in h.servers(), 15, "the killed host's server deleted")
            removed = time.monotonic() - killed
            joined = time.monotonic()
            joiner = start(stack, 3)
            joiner.wait_running()
            name = f"corral-{instance_of(joiner)}"
            wait_for(lambda: h.sessions_total().get(name, 0) > 0, 15, "the joiner served")
            served = time.monotonic() - joined
            wait_for(lambda: len(clients.between(joined + served, 1e18)) >= 20, 15, "load")
    failed = [s for s in clients.sent if not s.ok]
    print(f"\nSIGKILL -> server deleted in {removed:.2f} s; {len(failed)} of "
          f"{len(clients.sent)} requests failed; a joiner served {served:.2f} s after it was "
          f"started")
    assert all(s.start <= killed for s in failed), [
        (s.what, round(s.start - killed, 3), round(s.end - killed, 3)) for s in failed]
    assert removed < 5 + 3 and served < 10


def test_print_config_is_a_configuration_haproxy_accepts(tmp_path: Path) -> None:
    """``corral balance --print-config`` prints an haproxy.cfg that ``haproxy -c`` accepts,
    with the backend, its health checks and the admin socket asked for."""
    sock = tmp_path / "admin.sock"
    out = subprocess.run([sys.executable, "-m", "corral", "balance", "--print-config",
                          "--backend", "llm", "--haproxy-socket", str(sock)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "backend llm" in out and "option httpchk GET /health" in out
    assert f"stats socket {sock} mode 600 level admin" in out
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(out.replace("bind 0.0.0.0:8000", f"bind 127.0.0.1:{free_port()}"))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
