"""A real, private etcd for tests: its own free ports on 127.0.0.1, its own data directory.

``etcd_server`` starts one per test (it is ready in ~0.1 s with the fast raft timings used
here) and kills it afterwards, also when the test paused it. A system etcd on 2379 is never
touched. Without the ``etcd`` binary, tests using the fixture are skipped.

Beyond the plain server, :class:`EtcdServer` can run etcd as people run it:

- TLS: ``tls=make_certs(dir)`` (a CA, a server certificate for 127.0.0.1 and a client
  certificate, made with the ``openssl`` CLI) serves ``https://``; ``client_cert_auth=True``
  makes etcd require a client certificate signed by the CA.
- Auth: ``auth_token_ttl=2`` starts etcd with ``--auth-token=simple --auth-token-ttl=2`` so
  an idle token expires within seconds; :meth:`EtcdServer.enable_auth` then creates root, a
  user with readwrite on a prefix, and enables auth (``etcdctl`` keeps working as root).
- Anywhere: ``host``, fixed ``client_port``/``peer_port``, ``name``, ``initial_cluster``
  and ``exec_prefix`` (e.g. ``["ip", "netns", "exec", "ns1"]``, also used for ``etcdctl``).

``etcd_cluster`` starts three members on loopback ports (:class:`EtcdCluster`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import procfs
from tests.harness import free_port, wait_for

READY_DEADLINE = 15.0
ROOT_PASSWORD = "root-secret"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one test PKI: a CA, a server certificate and a client certificate."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path, hosts: Sequence[str] = ("127.0.0.1",),
               client_cn: str = "") -> TLSFiles:
    """A fresh CA with a server certificate for ``hosts`` (IP or DNS SANs, usable as a client
    certificate too, as etcd's gateway dials etcd with it) and a client certificate.

    The client certificate has no CommonName by default: with auth enabled, etcd 3.4's JSON
    gateway answers 400 to a client certificate that has one (the CN would be ignored).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", f"/CN=corral-test-ca-{directory.name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    server = _signed(directory, "server", "etcd-server", ca, ca_key,
                     f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    client = _signed(directory, "client", client_cn, ca, ca_key,
                     "extendedKeyUsage=clientAuth\n")
    return TLSFiles(ca, ca_key, server[0], server[1], client[0], client[1])


def _signed(directory: Path, stem: str, cn: str, ca: Path, ca_key: Path,
            extensions: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{stem}.pem", directory / f"{stem}.key",
                      directory / f"{stem}.csr")
    ext = directory / f"{stem}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n" + extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/O=corral-test/CN={cn}" if cn else
             "/O=corral-test")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return cert, key


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl not found: needed to make test certificates")
    done = subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))} failed: {done.stderr}")


def _is_ip(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


class EtcdServer:
    """One etcd process; ``stop``/``start`` keep the ports and the data directory."""

    def __init__(
        self,
        binary: str,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "corral-test",
        initial_cluster: str | None = None,
        initial_cluster_state: str = "new",
        exec_prefix: Sequence[str] = (),
        tls: TLSFiles | None = None,
        client_cert_auth: bool = False,
        auth_token_ttl: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.host = host
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.initial_cluster = initial_cluster
        self.initial_cluster_state = initial_cluster_state
        self.exec_prefix = list(exec_prefix)
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.auth_token_ttl = auth_token_ttl
        self.log_path = log_path or data_dir.parent / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.pids: list[int] = []  # every etcd process started, for the leftover check
        self.root_password: str | None = None  # set once auth is enabled

    @property
    def addr(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.addr}"

    @property
    def peer_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.peer_port}"

    def argv(self) -> list[str]:
        argv = [
            *self.exec_prefix,
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            f"--initial-cluster-state={self.initial_cluster_state}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        if self.tls:
            argv += [f"--cert-file={self.tls.server_cert}", f"--key-file={self.tls.server_key}",
                     f"--trusted-ca-file={self.tls.ca}"]
            if self.client_cert_auth:
                argv.append("--client-cert-auth")
        if self.auth_token_ttl is not None:
            argv += ["--auth-token=simple", f"--auth-token-ttl={self.auth_token_ttl}"]
        return argv

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting (a cluster's members must start together)."""
        assert self.proc is None, "etcd is already running"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        self.pids.append(self.proc.pid)
        self.paused = False

    def http_client(self, timeout: float = 0.5) -> httpx.Client:
        """A client for this server's gateway, with the test CA and client certificate."""
        verify: ssl.SSLContext | bool = False
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.tls.ca))
            ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            verify = ctx
        return httpx.Client(timeout=timeout, trust_env=False, verify=verify)

    def healthy(self) -> str | None:
        """None when etcd answers /health with a leader; else what it answered."""
        try:
            with self.http_client() as http:
                answer = http.get(f"{self.url}/health")
            if answer.status_code == 200 and answer.json().get("health") == "true":
                return None
            return answer.text
        except (httpx.HTTPError, ValueError) as exc:
            return repr(exc)

    def wait_ready(self) -> None:
        _wait_healthy([self])

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 5 s); always reaped."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: etcd freezes with its sockets open. Returns once every thread stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        self._wait_stopped(True)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False
        self._wait_stopped(False)

    def _wait_stopped(self, stopped: bool, deadline: float = 5.0) -> None:
        """A signal is delivered asynchronously: wait until /proc shows its effect."""
        assert self.proc is not None
        pid = self.proc.pid
        if not procfs.threads(pid):
            return  # no procfs: best effort
        def reached() -> bool:
            states = [procfs.state(pid, tid) for tid in procfs.threads(pid)]
            return all((state == "T") == stopped for state in states if state)
        wait_for(reached, deadline, f"etcd {'stopped' if stopped else 'continued'}",
                 interval=0.002)

    def etcdctl(self, *args: str, check: bool = True, user: str | None = None,
                endpoints: str | None = None) -> str:
        """Run ``etcdctl`` (API v3) against this server; returns its stdout.

        With TLS it uses the test CA and client certificate; once :meth:`enable_auth` ran it
        acts as root unless ``user`` ("name:password") is given.
        """
        env = {**os.environ, "ETCDCTL_API": "3"}
        argv = [*self.exec_prefix, _etcdctl(), f"--endpoints={endpoints or self.url}",
                "--command-timeout=5s"]
        if self.tls:
            argv += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}",
                     f"--key={self.tls.client_key}"]
        if user is None and self.root_password is not None:
            user = f"root:{self.root_password}"
        if user is not None:
            argv.append(f"--user={user}")
        done = subprocess.run([*argv, *args], env=env, capture_output=True, text=True,
                              timeout=10, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self, user: str = "corral", password: str = "corral-secret",
                    prefix: str = "/corral/", root_password: str = ROOT_PASSWORD) -> None:
        """Create root and ``user`` (readwrite on ``prefix`` only), then enable auth."""
        role = f"{user}-rw"
        self.etcdctl("user", "add", f"root:{root_password}")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", role, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")
        self.root_password = root_password

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _wait_healthy(servers: Sequence[EtcdServer]) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    waiting = list(servers)
    last = "no answer yet"
    while waiting and time.monotonic() < deadline:
        for server in list(waiting):
            assert server.proc is not None
            if server.proc.poll() is not None:
                raise RuntimeError(f"etcd {server.name} exited ({server.proc.returncode}):\n"
                                   f"{server.log_tail()}")
            problem = server.healthy()
            if problem is None:
                waiting.remove(server)
            else:
                last = f"{server.name}: {problem}"
        if waiting:
            time.sleep(0.02)
    if waiting:
        raise RuntimeError(f"etcd not ready within {READY_DEADLINE} s ({last}):\n"
                           + "\n".join(s.log_tail() for s in waiting))


class EtcdCluster:
    """Several etcd members (plain HTTP, loopback ports) forming one cluster."""

    def __init__(self, binary: str, directory: Path, size: int = 3) -> None:
        self.members = [
            EtcdServer(binary, directory / f"m{i}" / "data", name=f"m{i}",
                       log_path=directory / f"m{i}.log")
            for i in range(size)
        ]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = cluster

    @property
    def endpoints(self) -> str:
        """Every member's address, comma-separated (what ``addr`` takes)."""
        return ",".join(m.addr for m in self.members)

    def start(self) -> None:
        for member in self.members:
            member.launch()
        _wait_healthy(self.members)

    def leader(self) -> EtcdServer:
        """The member that is the raft leader now (asked of the running members)."""
        ids: dict[int, EtcdServer] = {}
        leader_id = 0
        for member in self.members:
            if member.proc is None:
                continue
            try:
                with member.http_client(timeout=1) as http:
                    status = http.post(f"{member.url}/v3/maintenance/status", json={}).json()
            except (httpx.HTTPError, ValueError):
                continue
            ids[int(status["header"]["member_id"])] = member
            leader_id = int(status.get("leader", 0)) or leader_id
        if leader_id not in ids:
            raise RuntimeError(f"no running member is the leader ({leader_id:x})")
        return ids[leader_id]

    def kill(self, member: EtcdServer) -> None:
        member.kill()

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """``etcdctl`` against every running member's endpoint."""
        running = [m for m in self.members if m.proc is not None]
        return running[0].etcdctl(*args, check=check,
                                  endpoints=",".join(m.url for m in running))

    def close(self) -> None:
        for member in self.members:
            member.kill()

    @property
    def pids(self) -> list[int]:
        return [pid for m in self.members for pid in m.pids]


def _etcdctl() -> str:
    found = shutil.which("etcdctl")
    if found is None:
        pytest.skip("etcdctl not found (apt-get install etcd-client)")
    return found


def etcd_binary() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd not found (apt-get install etcd-server etcd-client)")
    return binary


@contextlib.contextmanager
def reaped(*servers: EtcdServer | EtcdCluster) -> Iterator[None]:
    """Kill ``servers`` on exit and assert that no etcd process they started is left."""
    try:
        yield
    finally:
        for server in servers:
            if isinstance(server, EtcdCluster):
                server.close()
            else:
                server.kill()
        leftovers = [pid for s in servers for pid in s.pids if procfs.is_alive(pid)]
        assert not leftovers, f"etcd processes left behind: {leftovers}"


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(etcd_binary(), tmp_path / "etcd-data")
    with reaped(server):
        server.start()
        yield server


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback ports: ``.members``, ``.endpoints``, ``.leader()``,
    ``.kill(member)``."""
    cluster = EtcdCluster(etcd_binary(), tmp_path / "etcd-cluster")
    with reaped(cluster):
        cluster.start()
        yield cluster
