"""Simulated hosts for the fleet tests: one Linux network namespace per host.

A :class:`SimulatedNetwork` is a small LAN, 10.78.<k>.0/24 with ``<k>`` free on this machine:

* a *bridge* namespace holding a Linux bridge (the switch);
* one namespace per :class:`Host`, joined to the bridge by a veth pair (``eth0`` inside the
  host, ``p<i>`` on the bridge), addresses 10.78.<k>.11, .12, ... and 10.78.<k>.2 for the
  ``etcd`` host; every namespace has ``lo`` up and *no default route*, so nothing in it can
  reach an address outside the LAN;
* one more veth pair from the root namespace into the bridge (10.78.<k>.1), so the test
  process itself reaches every host's address with plain httpx.

Every host can use the same ports (``--port 8081`` everywhere, as on real machines).
``Host.partition()`` sets the host's port on the bridge down: the host is cut from etcd,
from the other hosts and from the test process, and keeps running; ``Host.http_get`` runs
inside the namespace, so it still reaches what the host serves. ``heal()`` brings the link
back and returns once the host answers again.

Namespaces share the file system and the pid space: a host gets its own directory under the
test's tmp dir (state dir, lock, pid file). ``ip netns exec`` execs the program in place, so
a ``Popen``'s pid is the real process's pid.

Everything is removed on exit (processes first, then the root-side veth, then the
namespaces), also when the test fails. Needs root and ``ip`` (iproute2); the
``simulated_network`` fixture skips otherwise. Names carry the test process's pid and a
counter, and the subnet is chosen under a file lock, so parallel pytest workers never clash;
what a SIGKILLed run left behind (its pid is gone) is swept at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import procfs
from tests.harness import FAKE, SupervisorProcess, end_process, wait_for, wait_gone

__all__ = [
    "API_PORT", "ETCD_CLIENT_PORT", "LLAMA_PORT", "TOKEN", "HttpAnswer", "Host",
    "HostSupervisor", "NsEtcd", "SimulatedNetwork", "host_supervisor", "netns_unavailable",
    "simulated_network_fixture", "skip_unless_netns", "start_etcd", "start_fake_llama",
]

LLAMA_PORT = 8081          # every host's llama-server, as on real machines
API_PORT = 8084            # every host's management API
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
TOKEN = "netns-test-token"  # a non-loopback API needs one
NS_PREFIX = "corral-"       # namespaces: corral-<pid>-<n>-<host>
ROOT_LINK = re.compile(r"^crl(\d+)r\d+$")  # root-side veth: crl<pid>r<n> (<= 15 chars)
SUPERNET = ipaddress.ip_network("10.78.0.0/16")
LOCK_PATH = Path(tempfile.gettempdir()) / "corral-netns.lock"
_counter = itertools.count()


def netns_unavailable() -> str | None:
    """Why simulated hosts cannot run here, or None."""
    if shutil.which("ip") is None:
        return "simulated hosts need `ip` (iproute2), not found"
    if os.geteuid() != 0:
        return "simulated hosts need root (ip netns, veth, bridge)"
    return None


def skip_unless_netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done


def netns_list() -> list[str]:
    """Names from ``ip netns list`` (its lines may carry an ``(id: N)`` suffix)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def root_links() -> list[str]:
    """Interface names in the root namespace."""
    return [line.split()[0].split("@")[0]
            for line in ip("-br", "link", "show").stdout.splitlines() if line.strip()]


@dataclass
class HttpAnswer:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


# Runs inside a namespace: GET argv[1] with headers argv[3], no proxies; prints JSON.
_HTTP_GET = """\
import json, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[3]))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(request, timeout=float(sys.argv[2])) as answer:
        status, body = answer.status, answer.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
sys.stdout.write(json.dumps({"status": status, "text": body.decode("utf-8", "replace")}))
"""


class Host:
    """One simulated machine: a network namespace with ``eth0`` at ``addr``."""

    def __init__(self, network: SimulatedNetwork, name: str, ns: str, addr: str,
                 bridge_port: str) -> None:
        self.network = network
        self.name = name
        self.ns = ns
        self.addr = addr
        self.bridge_port = bridge_port  # this host's veth end in the bridge namespace
        self.partitioned = False
        self.dir = network.tmp / name   # this host's own files (state dir, logs, data)
        self.dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr}, ns={self.ns!r})"

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def url(self, port: int = LLAMA_PORT, path: str = "") -> str:
        return f"http://{self.addr}:{port}{path}"

    # processes
    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host; the network ends it at exit. The pid is the
        program's own (``ip netns exec`` execs it in place)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen([*self.exec_prefix, *argv], **kwargs)
        self.network.track(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30, check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host; its output as text."""
        done = subprocess.run([*self.exec_prefix, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def http_get(self, url: str, headers: dict[str, str] | None = None,
                 timeout: float = 5.0) -> HttpAnswer:
        """GET ``url`` from inside this host (works while it is partitioned). Any HTTP status
        is an answer; no connection raises ConnectionError."""
        done = self.run([sys.executable, "-I", "-c", _HTTP_GET, url, str(timeout),
                         json.dumps(headers or {})], timeout=timeout + 10, check=False)
        if done.returncode != 0:
            raise ConnectionError(f"GET {url} from {self.name}: "
                                  f"{done.stderr.strip().splitlines()[-1:]}")
        answer = json.loads(done.stdout)
        return HttpAnswer(int(answer["status"]), str(answer["text"]))

    # the link
    def reachable(self, timeout: float = 0.3) -> bool:
        """Does this host answer on the LAN, seen from the test process? A TCP connect to a
        port: accepted or refused both prove a round trip; a timeout or an unreachable
        host (no ARP answer) mean cut off."""
        try:
            with socket.create_connection((self.addr, 9), timeout=timeout):
                return True
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def partition(self) -> None:
        """Cut this host off: its port on the bridge goes down (packets are dropped, as
        with a pulled cable). Processes inside keep running and keep serving locally."""
        ip("-n", self.network.bridge_ns, "link", "set", self.bridge_port, "down")
        self.partitioned = True
        wait_for(lambda: not self.reachable(0.1), 10, f"{self.name} cut off")

    def heal(self, timeout: float = 10) -> None:
        """Bring the link back; returns once the host answers again from the LAN."""
        ip("-n", self.network.bridge_ns, "link", "set", self.bridge_port, "up")
        self.partitioned = False
        # ARP entries that failed during the partition are retried only once a second:
        # forget them, on both sides, so the first packet after the heal resolves at once.
        ip("-n", self.ns, "neigh", "flush", "dev", "eth0", check=False)
        ip("neigh", "flush", "to", self.addr, "dev", self.network.root_link, check=False)
        for other in self.network.all_hosts():
            if other is not self:
                ip("-n", other.ns, "neigh", "flush", "to", self.addr, check=False)
        wait_for(self.reachable, timeout, f"{self.name} reachable again")


class SimulatedNetwork:
    """A LAN of simulated hosts; a context manager (or the ``simulated_network`` fixture)."""

    def __init__(self, tmp: Path, hosts: int = 3) -> None:
        self.tmp = tmp
        self.id = f"{os.getpid()}-{next(_counter)}"
        self.bridge_ns = f"{NS_PREFIX}{self.id}-bridge"
        self.root_link = f"crl{self.id.replace('-', 'r')}"
        assert len(self.root_link) <= 15, self.root_link
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: list[Host] = []
        self._etcd_host: Host | None = None
        self._initial_hosts = hosts
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.stray_pids: list[int] = []  # found in a namespace at exit, not started via popen
        self.stray_grace = 2.0           # seconds strays get to exit on their own at close

    # addresses
    def _addr(self, last: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + last)

    @property
    def root_addr(self) -> str:
        return self._addr(1)

    @property
    def etcd_host(self) -> Host:
        """The host etcd runs on, at 10.78.<k>.2."""
        assert self._etcd_host is not None, "the network is not started"
        return self._etcd_host

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    # lifecycle
    def __enter__(self) -> SimulatedNetwork:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        sweep_stale()
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        with _lock():
            self.subnet = _free_subnet()
            ip("link", "add", self.root_link, "type", "veth",
               "peer", "name", "uplink", "netns", self.bridge_ns)
            ip("addr", "add", f"{self.root_addr}/24", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        ip("-n", self.bridge_ns, "link", "set", "uplink", "master", "br0", "up")
        self._etcd_host = self._host("etcd", 2)
        for _ in range(self._initial_hosts):
            self.add_host()

    def add_host(self, name: str | None = None) -> Host:
        """Another host, at the next address from .11 on."""
        index = len(self.hosts) + 1
        host = self._host(name or f"host{index}", 10 + index)
        self.hosts.append(host)
        return host

    def all_hosts(self) -> list[Host]:
        """The hosts and the etcd host."""
        return [*self.hosts, *([self._etcd_host] if self._etcd_host else [])]

    def _host(self, name: str, last: int) -> Host:
        ns = f"{NS_PREFIX}{self.id}-{name}"
        port = f"p{last}"
        self._add_ns(ns)
        ip("-n", self.bridge_ns, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{self._addr(last)}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return Host(self, name, ns, self._addr(last), port)

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._namespaces.append(ns)

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        """End ``proc`` when the network closes (before the namespaces go)."""
        self._procs.append(proc)

    def close(self) -> None:
        """Processes, the root-side veth, the namespaces; whatever failed before."""
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                end_process(proc, timeout=5)
        self._end_strays()
        ip("link", "del", self.root_link, check=False)
        for ns in reversed(self._namespaces):
            ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        self._procs.clear()

    def _end_strays(self) -> None:
        """Processes still inside our namespaces (a llama-server whose supervisor was just
        killed is usually on its way out, by PR_SET_PDEATHSIG): give them ``stray_grace``
        seconds, then SIGKILL. Only namespaces this network created are looked at."""
        def inside() -> list[int]:
            pids: list[int] = []
            for ns in self._namespaces:
                done = ip("netns", "pids", ns, check=False)
                pids += [int(p) for p in done.stdout.split() if p.isdigit()]
            return [p for p in pids if procfs.is_alive(p)]

        with contextlib.suppress(AssertionError):
            wait_for(lambda: not inside(), self.stray_grace, "processes in the namespaces gone")
        left = inside()
        self.stray_pids += left
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        with contextlib.suppress(AssertionError):
            wait_gone(left, 5, "stray processes in the namespaces")

    def leftovers(self) -> list[str]:
        """What of this network still exists in the root namespace (for tests)."""
        left = [ns for ns in netns_list() if ns.startswith(f"{NS_PREFIX}{self.id}-")]
        return left + [link for link in root_links() if link == self.root_link]


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialises subnet choice between test processes (parallel pytest workers)."""
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.78.<k>.0/24 that no address or route of the root namespace overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            iface = ipaddress.ip_interface(fields[fields.index("inet") + 1])
            used.append(ipaddress.IPv4Network(iface.network))
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if word != "default" and not word.startswith(("broadcast", "local")):
                used.append(ipaddress.IPv4Network(word, strict=False))
    start = os.getpid() % 256
    for k in itertools.chain(range(start, 256), range(start)):
        subnet = ipaddress.IPv4Network(f"10.78.{k}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free /24 left in {SUPERNET}")


def sweep_stale() -> None:
    """Remove namespaces and root-side veths of test processes that no longer exist (a
    SIGKILLed pytest cannot clean up after itself)."""
    for ns in netns_list():
        m = re.match(rf"^{NS_PREFIX}(\d+)-\d+-", ns)
        if m and not procfs.is_alive(int(m.group(1))):
            ip("netns", "del", ns, check=False)
    for link in root_links():
        m = ROOT_LINK.match(link)
        if m and not procfs.is_alive(int(m.group(1))):
            ip("link", "del", link, check=False)


@pytest.fixture(name="simulated_network")
def simulated_network_fixture(tmp_path: Path) -> Iterator[SimulatedNetwork]:
    """Three hosts (``hosts``) and an ``etcd_host``; removed after the test. In a test
    module: ``from tests.netns import simulated_network_fixture  # noqa: F401`` and take a
    ``simulated_network`` argument."""
    skip_unless_netns()
    with SimulatedNetwork(tmp_path) as network:
        yield network


# llama-server (fake) -----------------------------------------------------------------------

def start_fake_llama(host: Host, *args: str, port: int = LLAMA_PORT,
                     bind: str = "0.0.0.0", timeout: float = 15) -> subprocess.Popen[bytes]:
    """The fake llama-server inside ``host`` on ``bind:port``; returns once ``/health``
    answers 200 at the host's address."""
    with (host.dir / f"fake-llama-{port}.log").open("ab") as log:
        proc = host.popen([sys.executable, str(FAKE), "--host", bind, "--port", str(port),
                           *args], stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"fake llama-server in {host.name} exited {proc.returncode}")
        return host.http_get(host.url(port, "/health"), timeout=1).status == 200
    wait_for(healthy, timeout, f"fake llama-server on {host.name}:{port}", interval=0.05)
    return proc


# etcd --------------------------------------------------------------------------------------

@dataclass
class NsEtcd:
    """A single-member etcd on the network's ``etcd_host``."""

    host: Host
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    pids: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host.addr}:{ETCD_CLIENT_PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def etcdctl(self, *args: str, host: Host | None = None, check: bool = True,
                timeout: float = 5) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` (API v3) against this etcd, run inside ``host`` (default: the test
        process's root namespace)."""
        binary = shutil.which("etcdctl")
        if binary is None:
            pytest.skip("etcdctl not found (apt-get install etcd-client)")
        argv = [binary, f"--endpoints={self.url}", f"--dial-timeout={timeout}s",
                f"--command-timeout={timeout}s", *args]
        env = {**os.environ, "ETCDCTL_API": "3"}
        if host is not None:
            return host.run(argv, timeout=timeout + 10, check=check, env=env)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10,
                              check=False, env=env, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def healthy(self) -> bool:
        try:
            answer = httpx.get(f"{self.url}/health", timeout=0.5, trust_env=False)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json().get("health") == "true"

    def stop(self) -> None:
        end_process(self.proc, timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_etcd(network: SimulatedNetwork, data_dir: Path | None = None,
               timeout: float = 15) -> NsEtcd:
    """etcd inside ``network.etcd_host`` on its address (client 2379, peer 2380, the fast
    raft timings of tests/fixtures_etcd.py); returns once ``/health`` says true. The
    network reaps it at exit."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd not found (apt-get install etcd-server etcd-client)")
    host = network.etcd_host
    data_dir = data_dir or host.dir / "data"
    client = f"http://{host.addr}:{ETCD_CLIENT_PORT}"
    peer = f"http://{host.addr}:{ETCD_PEER_PORT}"
    argv = [binary, "--name=corral-netns", f"--data-dir={data_dir}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=corral-netns={peer}",
            "--heartbeat-interval=10", "--election-timeout=100",
            "--logger=zap", "--log-outputs=stderr", "--log-level=warn"]
    log_path = host.dir / "etcd.log"
    with log_path.open("ab") as log:
        proc = host.popen(argv, stdout=log, stderr=log)
    etcd = NsEtcd(host, proc, data_dir, log_path, [proc.pid])

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited ({proc.returncode}):\n{etcd.log_tail()}")
        return etcd.healthy()
    try:
        wait_for(ready, timeout, f"etcd on {etcd.endpoint}", interval=0.02)
    except AssertionError as exc:
        raise RuntimeError(f"{exc}\n{etcd.log_tail()}") from None
    return etcd


# supervisors -------------------------------------------------------------------------------

class HostSupervisor(SupervisorProcess):
    """``corral supervise`` inside ``host``: llama-server on ``--port 8081`` (the same on
    every host) bound to all of the host's addresses (``--host 0.0.0.0``, unless
    ``llama_args`` says otherwise), the API on ``<host addr>:8084`` with a token, and the
    host's own directory (``workdir``, default ``host.dir``) for state dir, config file and
    log. Other keyword arguments are SupervisorProcess's (``store_args``, ``extra_cli``,
    ``env``, ...)."""

    def __init__(self, host: Host, binary: str | Path, model: str | Path | None,
                 llama_args: list[str] | None = None, *, port: int = LLAMA_PORT,
                 api_port: int = API_PORT, token: str = TOKEN, workdir: Path | None = None,
                 **kwargs: Any) -> None:
        workdir = workdir or host.dir
        workdir.mkdir(parents=True, exist_ok=True)
        llama_args = list(llama_args or [])
        if "--host" not in llama_args:
            llama_args += ["--host", "0.0.0.0"]
        kwargs["extra_cli"] = [*(kwargs.get("extra_cli") or []), "--api-token", token]
        kwargs.setdefault("state_dir", workdir / "state")
        super().__init__(workdir, binary, model, llama_args, port=port, api_port=api_port,
                         token=token, api_host=host.addr, exec_prefix=host.exec_prefix,
                         **kwargs)
        self.host = host
        # the same client, minus proxies from the environment (10.78.x is never proxied)
        self.http.close()
        self.http = httpx.Client(base_url=self.host.url(self.api_port), timeout=60,
                                 headers={"authorization": f"Bearer {token}"}, trust_env=False)

    def start(self) -> HostSupervisor:
        super().start()
        assert self.proc is not None
        self.host.network.track(self.proc)
        return self

    @property
    def llama_url(self) -> str:
        return self.host.url(self.port)

    def status_inside(self) -> dict[str, Any]:
        """``/v1/status`` asked from inside the host: works while it is partitioned."""
        answer = self.host.http_get(self.host.url(self.api_port, "/v1/status"),
                                    headers={"authorization": f"Bearer {self.token}"})
        result: dict[str, Any] = answer.json()
        return result

    def changes_inside(self) -> list[dict[str, Any]]:
        """The audit log (``/v1/changes``, newest first) asked from inside the host."""
        answer = self.host.http_get(self.host.url(self.api_port, "/v1/changes?limit=1000"),
                                    headers={"authorization": f"Bearer {self.token}"})
        changes: list[dict[str, Any]] = answer.json()["changes"]
        return changes


@contextlib.contextmanager
def host_supervisor(host: Host, binary: str | Path, model: str | Path | None,
                    *args: Any, **kwargs: Any) -> Iterator[HostSupervisor]:
    """Start a supervisor in ``host``; on exit kill it and assert that no llama-server it
    ran is left."""
    sup = HostSupervisor(host, binary, model, *args, **kwargs).start()
    try:
        yield sup
    finally:
        sup.close()
        wait_gone(sup.seen_pids, 5, f"every llama-server the supervisor on {host.name} ran")
