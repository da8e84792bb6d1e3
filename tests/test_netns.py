"""The simulated hosts of tests/netns.py: same port on every host, partitions, etcd on its own
address, a supervisor inside a host, and nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import netns, procfs
from tests.harness import FAKE, make_fake_model, wait_for, wait_gone
from tests.netns import (
    API_PORT,
    LLAMA_PORT,
    SimulatedNetwork,
    host_supervisor,
    netns_list,
    root_links,
    simulated_network_fixture,  # noqa: F401 - the simulated_network fixture
    skip_unless_netns,
    start_etcd,
    start_fake_llama,
)


def get(url: str, timeout: float = 2.0) -> httpx.Response:
    return httpx.get(url, timeout=timeout, trust_env=False)


def answers(url: str) -> bool:
    try:
        return get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def net_ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def test_two_hosts_serve_the_same_port_at_their_own_addresses(
        simulated_network: SimulatedNetwork) -> None:
    """Two hosts serve the same port at their own addresses, each server in its namespace."""
    a, b = simulated_network.hosts[:2]
    assert a.addr != b.addr and a.addr.startswith("10.78.") and a.addr.endswith(".11")
    server_a = start_fake_llama(a, bind=a.addr)     # bound to the host's own address
    server_b = start_fake_llama(b)                  # 0.0.0.0:8081 in its namespace
    for host, server in ((a, server_a), (b, server_b)):
        assert get(host.url(LLAMA_PORT, "/health")).status_code == 200
        # ip netns exec execs in place: the Popen pid is the server's own pid ...
        assert get(host.url(LLAMA_PORT, "/props")).json()["pid"] == server.pid
        assert "fake_llama_server" in " ".join(
            Path(f"/proc/{server.pid}/cmdline").read_text().split("\0"))
        # ... and that process lives in the host's namespace
        assert net_ns_inode(f"/proc/{server.pid}/ns/net") == net_ns_inode(f"/run/netns/{host.ns}")
    assert server_a.pid != server_b.pid


def test_hosts_have_loopback_and_no_route_outside(simulated_network: SimulatedNetwork) -> None:
    """Every host has loopback up and no default route: outside addresses are unreachable."""
    etcd_host = simulated_network.etcd_host
    assert etcd_host.addr.endswith(".2")
    for host in [*simulated_network.hosts, etcd_host]:
        routes = host.run(["ip", "-4", "route", "show"]).stdout
        assert "default" not in routes, routes
        assert "lo" in host.run(["ip", "-br", "link", "show", "up"]).stdout
        # an address outside the LAN (and the root namespace's other addresses) is not
        # routable: the connect fails at once, nothing leaves the host
        probe = ("import errno, socket, sys\n"
                 "for addr in sys.argv[1:]:\n"
                 "    s = socket.socket(); s.settimeout(2)\n"
                 "    print(s.connect_ex((addr, 80)) == errno.ENETUNREACH)\n")
        out = host.run([sys.executable, "-c", probe, "198.51.100.1", "1.1.1.1"]).stdout
        assert out.split() == ["True", "True"], out


@pytest.mark.slow
def test_partition_cuts_a_host_off_and_heal_restores_it(
        simulated_network: SimulatedNetwork) -> None:
    """A partitioned host still serves locally but nobody reaches it; heal restores it."""
    a, b = simulated_network.hosts[:2]
    start_fake_llama(a)
    url = a.url(LLAMA_PORT, "/health")
    assert answers(url) and b.http_get(url).status == 200

    a.partition()
    assert a.partitioned and not a.reachable()
    with pytest.raises(httpx.TransportError):
        get(url, timeout=0.5)                         # the test process cannot reach it
    with pytest.raises(ConnectionError):
        b.http_get(url, timeout=0.5)                  # nor can another host
    assert a.http_get(url).status == 200              # it still serves, locally
    assert b.reachable()                              # the others are untouched

    a.heal()
    assert not a.partitioned
    wait_for(lambda: answers(url), 10, "host1 answers again from the root namespace")
    assert b.http_get(url).status == 200


@pytest.mark.etcd
@pytest.mark.slow
def test_etcd_on_its_own_host_reachable_until_partitioned(
        simulated_network: SimulatedNetwork) -> None:
    """etcd on its own host serves every host until one is cut off; either side heals."""
    etcd = start_etcd(simulated_network)
    a, b = simulated_network.hosts[:2]
    assert etcd.endpoint == f"{simulated_network.etcd_host.addr}:2379"
    etcd.etcdctl("put", "/corral/probe", "from-host1", host=a)
    assert etcd.etcdctl("get", "--print-value-only", "/corral/probe",
                        host=b).stdout.strip() == "from-host1"
    assert net_ns_inode(f"/proc/{etcd.proc.pid}/ns/net") == net_ns_inode(
        f"/run/netns/{etcd.host.ns}")

    a.partition()
    cut = etcd.etcdctl("endpoint", "health", host=a, check=False, timeout=1)
    assert cut.returncode != 0, cut.stdout
    assert etcd.etcdctl("get", "/corral/probe", host=b).returncode == 0

    a.heal()
    assert etcd.etcdctl("endpoint", "health", host=a).returncode == 0

    # the etcd host itself cut off: nobody reaches it, and it comes back
    etcd.host.partition()
    assert not etcd.healthy()
    etcd.host.heal()
    wait_for(etcd.healthy, 10, "etcd healthy after heal")


@pytest.mark.slow
def test_supervisors_in_two_hosts_run_on_the_same_ports(
        simulated_network: SimulatedNetwork, tmp_path: Path) -> None:
    """Supervisors on two hosts share ports, demand a token, and keep running when cut off."""
    model = make_fake_model(tmp_path / "model.gguf")
    a, b = simulated_network.hosts[:2]
    with host_supervisor(a, FAKE, model) as sa, host_supervisor(b, FAKE, model) as sb:
        pids = {}
        for host, sup in ((a, sa), (b, sb)):
            running = sup.wait_running()
            pids[host.name] = running["pid"]
            assert sup.port == LLAMA_PORT and sup.api_port == API_PORT
            props = get(host.url(LLAMA_PORT, "/props")).json()
            assert props["pid"] == running["pid"]
            assert sup.proc is not None
            assert net_ns_inode(f"/proc/{sup.proc.pid}/ns/net") == net_ns_inode(
                f"/run/netns/{host.ns}")
            # a non-loopback API: the token is required
            unauthenticated = get(host.url(API_PORT, "/v1/status"))
            assert unauthenticated.status_code == 401
            assert (host.dir / "state").is_dir()
        assert pids[a.name] != pids[b.name]

        a.partition()
        with pytest.raises(httpx.TransportError):
            get(a.url(LLAMA_PORT, "/health"), timeout=0.5)
        inside = sa.status_inside()                 # asked from inside the host
        assert inside["state"] == "RUNNING" and inside["pid"] == pids[a.name]
        assert a.http_get(a.url(LLAMA_PORT, "/health")).status == 200
        a.heal()
        assert sa.status()["state"] == "RUNNING"


def test_cleanup_leaves_nothing_behind(tmp_path: Path) -> None:
    """Leaving the network removes its namespaces and link and ends tracked and stray pids."""
    skip_unless_netns()
    with SimulatedNetwork(tmp_path, hosts=2) as net:
        net.stray_grace = 0.2
        namespaces = net.namespaces
        assert len(namespaces) == 4                 # bridge, etcd, host1, host2
        assert set(namespaces) <= set(netns_list())
        assert net.root_link in root_links() and len(net.root_link) <= 15
        tracked = net.hosts[0].popen(["sleep", "600"])
        # started behind the network's back: found in the namespace and ended at exit
        stray = subprocess.Popen(["ip", "netns", "exec", net.hosts[1].ns, "sleep", "600"],
                                 stdin=subprocess.DEVNULL)
        wait_for(lambda: str(stray.pid) in subprocess.run(
            ["ip", "netns", "pids", net.hosts[1].ns], capture_output=True, text=True).stdout,
            5, "the stray in host2's namespace")
    try:
        assert net.leftovers() == []
        assert not set(namespaces) & set(netns_list())
        assert net.root_link not in root_links()
        assert tracked.returncode is not None
        assert net.stray_pids == [stray.pid]
        assert stray.wait(5) is not None
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait(5)


def test_cleanup_after_a_failure(tmp_path: Path) -> None:
    """A network left by an exception is still cleaned up and its processes ended."""
    skip_unless_netns()
    net = SimulatedNetwork(tmp_path, hosts=1)
    with pytest.raises(RuntimeError, match="boom"), net:
        proc = net.hosts[0].popen(["sleep", "600"])
        raise RuntimeError("boom")
    assert net.leftovers() == []
    wait_gone([proc.pid], 5, "the process started in the failed test")
    assert not procfs.is_alive(proc.pid)


@pytest.mark.slow
def test_parallel_networks_do_not_clash(tmp_path: Path) -> None:
    """Two networks at once get their own subnet, namespaces and link; neither reaches the other."""
    skip_unless_netns()
    with SimulatedNetwork(tmp_path / "one", hosts=1) as one, \
            SimulatedNetwork(tmp_path / "two", hosts=1) as two:
        assert one.subnet != two.subnet
        assert not set(one.namespaces) & set(two.namespaces)
        assert one.root_link != two.root_link
        start_fake_llama(one.hosts[0])
        start_fake_llama(two.hosts[0])
        for net in (one, two):
            assert answers(net.hosts[0].url(LLAMA_PORT, "/health"))
        # separate LANs: a host of one cannot reach a host of the other
        with pytest.raises(ConnectionError):
            one.hosts[0].http_get(two.hosts[0].url(LLAMA_PORT, "/health"), timeout=0.5)
    assert one.leftovers() == [] and two.leftovers() == []


def test_what_a_killed_run_left_is_swept_at_the_next_start(tmp_path: Path) -> None:
    """A SIGKILLed pytest cannot clean up: the next network removes what it left."""
    skip_unless_netns()
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from tests.netns import SimulatedNetwork\n"
              "net = SimulatedNetwork(Path(sys.argv[1]), hosts=1).__enter__()\n"
              "print(net.root_link, *net.namespaces, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == -9, done.stderr
    # they exist now (unless a parallel worker's start swept them already)
    root_link, *namespaces = done.stdout.split()
    assert len(namespaces) == 3
    with SimulatedNetwork(tmp_path / "next", hosts=0):
        assert root_link not in root_links()
        assert not set(namespaces) & set(netns_list())


def test_the_reason_to_skip_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """netns_unavailable says why: root is needed, or iproute2's ip is missing."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "need root" in (netns.netns_unavailable() or "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "`ip` (iproute2)" in (netns.netns_unavailable() or "")
