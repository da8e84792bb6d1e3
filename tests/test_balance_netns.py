"""``corral balance`` with simulated hosts (issue 20): a supervisor on each network
namespace of tests/netns.py, etcd on its own host, HAProxy and the balancer in the test's
namespace. A partitioned host leaves the backend and comes back when healed."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.haproxy_helpers import balancer, haproxy
from tests.harness import FAKE, make_fake_model, wait_for
from tests.netns import (
    LLAMA_PORT,
    SimulatedNetwork,
    host_supervisor,
    simulated_network_fixture,  # noqa: F401 - the simulated_network fixture
    start_etcd,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


def test_a_partitioned_host_is_drained_and_deleted_then_comes_back(
        simulated_network: SimulatedNetwork, tmp_path: Path) -> None:
    """Three hosts behind HAProxy at their own addresses (llama-server's port, no
    --listen); host3 cut off: HAProxy marks it down, its lease expires and the balancer
    deletes its server; healed, it registers again and is added back, ready and up."""
    etcd = start_etcd(simulated_network)
    model = make_fake_model(tmp_path / "a.gguf")
    hosts = simulated_network.hosts
    with ExitStack() as stack:
        h = stack.enter_context(haproxy(tmp_path))
        stack.enter_context(balancer(tmp_path, etcd.endpoint, h))
        sups = [stack.enter_context(host_supervisor(
            host, FAKE, model, store_args=["--etcd", etcd.endpoint, "--name", "fleet",
                                           "--canary-seconds", "0.5"]))
            for host in hosts]
        for sup in sups:
            sup.wait_running()

        def up() -> set[str]:
            return {s.address for s in h.ours().values()
                    if s.op == 2 and s.admin == 0 and s.port == LLAMA_PORT}

        everyone = {host.addr for host in hosts}
        wait_for(lambda: up() == everyone, 20, "every host added at its address and up",
                 explain=lambda: h.ask("show servers state"))
        cut = hosts[2]
        cut.partition()
        wait_for(lambda: cut.addr not in {s.address for s in h.ours().values()}, 20,
                 "the cut-off host's server deleted (its lease expired)",
                 explain=lambda: h.ask("show servers state"))
        assert up() == everyone - {cut.addr}
        cut.heal()
        wait_for(lambda: up() == everyone, 30, "the healed host back, ready and up",
                 explain=lambda: h.ask("show servers state"))
