"""etcd as people run it: TLS (CA, client certificates) and user/password auth with tokens
that expire, against a real etcd (issue 12).

Certificates are made per test with ``openssl``; auth runs with ``--auth-token=simple`` and
a 1 s ``--auth-token-ttl``, so an idle token expires within about 2 s. Every wait polls a
condition under a deadline; the one wait on time itself is letting a token expire, and even
that polls the gateway until it rejects the token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.core.args import LlamaConfig
from corral.errors import StoreUnavailable, UsageError
from corral.store.base import StoredConfig
from corral.store.etcd import AuthFailed, EtcdClient, EtcdTLS
from corral.store.etcd.transport import GatewayTransport
from corral.store.factory import driver_spec, open_store
from tests.etcd_helpers import next_of, opened, watching
from tests.fixtures_etcd import (
    EtcdServer,
    TLSFiles,
    _signed,
    etcd_binary,
    make_certs,
    reaped,
)
from tests.harness import FAKE, make_fake_model, supervisor, wait_for

pytestmark = pytest.mark.etcd

TOKEN_TTL = 1  # seconds; etcd drops expired simple tokens on a 1 s tick
USER, PASSWORD = "corral", "corral-secret"


def config(n: int) -> StoredConfig:
    return StoredConfig(LlamaConfig("/usr/bin/llama-server", (("--parallel", str(n)),)),
                        f"2026-01-01T00:00:0{n}+00:00", "test")


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> TLSFiles:
    return make_certs(tmp_path / "pki")


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: TLSFiles) -> Iterator[EtcdServer]:
    """etcd on https, requiring a client certificate signed by the test CA."""
    server = EtcdServer(etcd_binary(), tmp_path / "etcd-data", tls=pki, client_cert_auth=True)
    with reaped(server):
        server.start()
        yield server


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """etcd (plain http) with auth enabled, user ``corral`` with readwrite on /corral/."""
    server = EtcdServer(etcd_binary(), tmp_path / "etcd-data", auth_token_ttl=TOKEN_TTL)
    with reaped(server):
        server.start()
        server.enable_auth(USER, PASSWORD)
        yield server


@pytest.fixture
def secure_etcd(tmp_path: Path, pki: TLSFiles) -> Iterator[EtcdServer]:
    """Both: https with client certificates, and auth."""
    server = EtcdServer(etcd_binary(), tmp_path / "etcd-data", tls=pki, client_cert_auth=True,
                        auth_token_ttl=TOKEN_TTL)
    with reaped(server):
        server.start()
        server.enable_auth(USER, PASSWORD)
        yield server


def full_tls(pki: TLSFiles) -> EtcdTLS:
    return EtcdTLS(str(pki.ca), str(pki.client_cert), str(pki.client_key))


async def until_token_expired(server: EtcdServer, token: str | None) -> None:
    """Wait until etcd rejects ``token``: asked at intervals longer than its TTL plus etcd's
    1 s expiry tick, as every use that still succeeds renews it."""
    assert token
    interval = TOKEN_TTL + 1.1
    deadline = time.monotonic() + 4 * interval
    with server.http_client(timeout=2) as http:
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            answer = http.post(f"{server.url}/v3/kv/range", json={"key": "L2NvcnJhbC94"},
                               headers={"Authorization": token})
            if answer.status_code == 401:
                assert "invalid auth token" in answer.text, answer.text
                return
    raise AssertionError("the auth token never expired")


def revision(server: EtcdServer) -> int:
    out = server.etcdctl("get", "/", "--prefix", "--keys-only", "--write-out=json")
    return int(json.loads(out)["header"]["revision"])


# -- TLS ----------------------------------------------------------------------------------


async def test_put_get_watch_lease_over_tls(tls_etcd: EtcdServer, pki: TLSFiles) -> None:
    """With the right CA and a client certificate everything works over https; a bare
    host:port becomes https:// because TLS settings were given."""
    async with opened(tls_etcd.addr, tls=full_tls(pki)) as store:
        assert store.client.endpoints == f"https://{tls_etcd.addr}"
        assert await store.load("tls") is None
        await store.save("tls", config(1))
        assert await store.load("tls") == config(1)
        async with watching(store, "tls") as queue:
            tls_etcd.etcdctl("put", "/corral/configs/tls", json.dumps(
                {"binary": "/usr/bin/llama-server", "args": [["--parallel", "2"]]}))
            assert dict((await next_of(queue)).config.args)["--parallel"] == "2"
        lease = await store.client.lease_grant(5)
        await store.client.put("/corral/leased", "x", lease=lease)
        assert await store.client.lease_keepalive(lease) > 0
        await store.client.lease_revoke(lease)
        assert await store.client.get("/corral/leased") is None
        assert store.is_connected


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_wrong_ca_is_refused_clearly(tls_etcd: EtcdServer, tmp_path: Path,
                                           pki: TLSFiles) -> None:
    """A server certificate from another CA: a clear StoreUnavailable naming the endpoint,
    at once (no timeout), for calls and for watches."""
    wrong = make_certs(tmp_path / "other-pki")
    tls = EtcdTLS(str(wrong.ca), str(pki.client_cert), str(pki.client_key))
    async with opened(tls_etcd.addr, tls=tls, timeout=5) as store:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.load("tls")
        assert time.monotonic() - start < 2, "a handshake failure is not a timeout"
        message = str(caught.value)
        assert "certificate could not be verified" in message, message
        assert f"https://{tls_etcd.addr}" in message and str(wrong.ca) in message, message
        assert not store.is_connected and "certificate" in (store.last_error or "")
        with pytest.raises(StoreUnavailable, match="certificate could not be verified"):
            async for _ in store.client.watch("/corral/x", 1):
                pass


async def test_no_client_certificate_is_refused_clearly(tls_etcd: EtcdServer,
                                                        pki: TLSFiles) -> None:
    """etcd with --client-cert-auth and a client with only the CA: the error says so."""
    async with opened(tls_etcd.addr, tls=EtcdTLS(str(pki.ca))) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.load("tls")
    message = str(caught.value)
    assert "requires a client certificate and none was given" in message, message
    assert f"https://{tls_etcd.addr}" in message


async def test_an_alert_read_mid_response_is_a_tls_failure(pki: TLSFiles) -> None:
    """The server's 'bad certificate' alert can arrive while the answer is read; httpcore
    lets that ssl.SSLError through unwrapped (CI saw it): it is still a clear TLS failure."""
    def alert(request: httpx.Request) -> httpx.Response:
        raise ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")

    transport = GatewayTransport("127.0.0.1:1", timeout=1, probe_interval=1,
                                 tls=EtcdTLS(str(pki.ca)))
    transport._http = httpx.AsyncClient(transport=httpx.MockTransport(alert))
    with pytest.raises(StoreUnavailable) as caught:
        await transport.call("/v3/kv/range", {"key": "eA=="}, dict)
    await transport.aclose()
    message = str(caught.value)
    assert message.startswith("etcd TLS handshake failed"), message
    assert "requires a client certificate and none was given" in message, message


def test_unusable_tls_files_are_usage_errors(tmp_path: Path, pki: TLSFiles) -> None:
    """A missing CA file, a key without its certificate, TLS with an http:// endpoint."""
    with pytest.raises(UsageError, match="cannot use CA file"):
        EtcdClient("127.0.0.1:1", tls=EtcdTLS(str(tmp_path / "missing.pem")))
    with pytest.raises(UsageError, match="needs its certificate"):
        EtcdClient("127.0.0.1:1", tls=EtcdTLS(str(pki.ca), key=str(pki.client_key)))
    with pytest.raises(UsageError, match="http:// endpoint"):
        EtcdClient("http://127.0.0.1:1", tls=EtcdTLS(str(pki.ca)))


# -- auth ---------------------------------------------------------------------------------


@pytest.mark.timing  # asserts on wall-clock durations: run alone
async def test_right_password_works_and_wrong_is_refused(auth_etcd: EtcdServer) -> None:
    """The right password reads and writes /corral/; a wrong one is AuthFailed at once;
    no user at all names the cause; outside the role's prefix is permission denied."""
    async with opened(auth_etcd.addr, user=USER, password=PASSWORD) as store:
        await store.save("auth", config(1))
        assert await store.load("auth") == config(1)
        with pytest.raises(StoreUnavailable, match="permission denied"):
            await store.client.put("/elsewhere", "x")
    async with opened(auth_etcd.addr, user=USER, password="wrong") as store:
        for _ in range(2):  # each call asks once, never in a loop
            start = time.monotonic()
            with pytest.raises(AuthFailed) as caught:
                await store.load("auth")
            assert time.monotonic() - start < 1
            assert str(caught.value).startswith(
                f"etcd refused user {USER}: authentication failed"), caught.value
        assert not store.is_connected
        with pytest.raises(AuthFailed, match="authentication failed"):
            async for _ in store.client.watch("/corral/x", 1):
                pass
    async with opened(auth_etcd.addr) as store:
        with pytest.raises(StoreUnavailable, match="give a user and password"):
            await store.load("auth")


async def test_password_from_the_environment(auth_etcd: EtcdServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without "password" the user's password comes from $CORRAL_ETCD_PASSWORD; with
    neither, the store cannot be made."""
    monkeypatch.delenv("CORRAL_ETCD_PASSWORD", raising=False)
    spec = driver_spec(json.dumps({"type": "etcd", "addr": auth_etcd.addr, "user": USER}),
                       None, None, None)
    with pytest.raises(UsageError, match="CORRAL_ETCD_PASSWORD"):
        open_store(spec)
    monkeypatch.setenv("CORRAL_ETCD_PASSWORD", PASSWORD)
    store = open_store(spec)
    try:
        await store.save("env", config(1))
        assert await store.load("env") == config(1)
    finally:
        await store.close()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_idle_client_past_token_ttl_still_works(auth_etcd: EtcdServer) -> None:
    """Clients idle past --auth-token-ttl authenticate again by themselves: a unary call
    (etcd answers 401 "invalid auth token") and a watch opened with the stale token (etcd
    cancels it at once as Unauthenticated) both just work."""
    watcher = EtcdClient(auth_etcd.addr, user=USER, password=PASSWORD)
    caller = EtcdClient(auth_etcd.addr, user=USER, password=PASSWORD)
    try:
        await watcher.put("/corral/w", "1")
        await caller.put("/corral/c", "1")
        stale_watcher, stale_caller = watcher.transport.token, caller.transport.token
        await until_token_expired(auth_etcd, stale_caller)  # the watcher's is older still

        assert (await caller.get("/corral/c")) is not None
        assert caller.transport.token not in (None, stale_caller)

        start = (await caller.range("/corral/w")).revision + 1
        events = watcher.watch("/corral/w", start)
        first = asyncio.ensure_future(anext(events))
        auth_etcd.etcdctl("put", "/corral/w", "2")
        event = await asyncio.wait_for(first, 10)
        assert event.kv.value == b"2"
        assert watcher.transport.token not in (None, stale_watcher)
        await events.aclose()
    finally:
        await watcher.aclose()
        await caller.aclose()


@pytest.mark.slow
async def test_store_watch_lives_through_token_expiry_and_restart(
        auth_etcd: EtcdServer) -> None:
    """An open watch keeps delivering after its token expired, and after etcd restarts
    (which forgets every token) EtcdStore.watch re-establishes itself with a new one."""
    async with opened(auth_etcd.addr, user=USER, password=PASSWORD,
                      probe_interval=60) as store, watching(store, "w") as queue:
        await store.save("w", config(1))
        assert await next_of(queue) == config(1)
        await until_token_expired(auth_etcd, store.client.transport.token)
        auth_etcd.etcdctl("put", "/corral/configs/w", json.dumps(
            {"binary": "/usr/bin/llama-server", "args": [["--parallel", "2"]]}))
        assert dict((await next_of(queue)).config.args)["--parallel"] == "2"
        stale = store.client.transport.token
        auth_etcd.stop()
        auth_etcd.start()
        auth_etcd.etcdctl("put", "/corral/configs/w", json.dumps(
            {"binary": "/usr/bin/llama-server", "args": [["--parallel", "3"]]}))
        assert dict((await next_of(queue)).config.args)["--parallel"] == "3"
        assert store.client.transport.token not in (None, stale)


# -- TLS and auth together, and a real supervisor -------------------------------------------


async def test_client_certificate_with_a_common_name_is_explained(
        secure_etcd: EtcdServer, pki: TLSFiles, tmp_path: Path) -> None:
    """etcd 3.4's gateway refuses, with auth on, client certificates that have a CN: the
    error says what to do."""
    cert, key = _signed(tmp_path / "pki", "cn-client", "alice", pki.ca, pki.ca_key,
                        "extendedKeyUsage=clientAuth\n")
    tls = EtcdTLS(str(pki.ca), str(cert), str(key))
    async with opened(secure_etcd.addr, tls=tls, user=USER, password=PASSWORD) as store:
        with pytest.raises(StoreUnavailable, match="use one without CN"):
            await store.load("x")


def secure_driver(server: EtcdServer, pki: TLSFiles, ca: Path | None = None) -> str:
    return json.dumps({"type": "etcd", "addr": server.addr, "name": "fleet",
                       "cacert": str(ca or pki.ca), "cert": str(pki.client_cert),
                       "key": str(pki.client_key), "user": USER})


def stored_config(server: EtcdServer) -> dict[str, object] | None:
    out = server.etcdctl("get", "/corral/configs/fleet", "--print-value-only").strip()
    return json.loads(out) if out else None


@pytest.mark.slow
def test_supervise_with_tls_and_auth_runs_and_stores(tmp_path: Path, secure_etcd: EtcdServer,
                                                      pki: TLSFiles) -> None:
    """`corral supervise` with TLS + auth settings in --config-driver (the password from the
    environment) reaches RUNNING and stores its config in etcd."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model,
                    store_args=["--config-driver", secure_driver(secure_etcd, pki)],
                    env={"CORRAL_ETCD_PASSWORD": PASSWORD}) as sup:
        sup.wait_running()
        value = wait_for(lambda: stored_config(secure_etcd), 15, "the config stored in etcd")
        assert value["binary"] == str(FAKE)  # type: ignore[index]
        assert sup.status()["fleet"]["etcd_connected"] is True, sup.status()["fleet"]
        assert PASSWORD not in " ".join(sup.cmd)


@pytest.mark.slow
def test_supervise_with_a_wrong_ca_falls_back_and_writes_nothing(
        tmp_path: Path, secure_etcd: EtcdServer, pki: TLSFiles) -> None:
    """A wrong CA: the supervisor runs the command-line config, logs why clearly, and
    nothing at all is written to etcd."""
    wrong = make_certs(tmp_path / "other-pki")
    before = revision(secure_etcd)
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model,
                    store_args=["--config-driver", secure_driver(secure_etcd, pki, wrong.ca)],
                    env={"CORRAL_ETCD_PASSWORD": PASSWORD}) as sup:
        status = sup.wait_running()
        assert status["config"]["args"]["--model"] == str(model)
        wait_for(lambda: "certificate could not be verified" in sup.log(), 10,
                 "the TLS error in the log")
        assert f"https://{secure_etcd.addr}" in sup.log()
        assert sup.stop() == 0
    assert revision(secure_etcd) == before, "nothing may be written to etcd"
    assert stored_config(secure_etcd) is None
