"""Tokens (full, read-only, from a file re-read on SIGHUP), the failed-check limit, TLS."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.harness import FAKE, free_port, make_fake_model, supervisor, wait_for

TOKEN, READ = "full-token-for-tests", "read-token-for-tests"


def client(port: int, token: str | None = None, source: str | None = None,
           scheme: str = "http", verify: str | bool = True) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=source, verify=verify) if source else None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{scheme}://127.0.0.1:{port}", headers=headers, timeout=10,
                        transport=transport, verify=verify)


def test_read_token_opens_get_routes_only(tmp_path: Path) -> None:
    """The read-only token reads status and params; a POST with it is a 403, nothing applied."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, token=TOKEN,
                    extra_cli=["--api-token", TOKEN, "--read-token", READ]) as s:
        s.wait_running()
        with client(s.api_port, READ) as reader:
            assert reader.get("/v1/status").status_code == 200
            assert reader.get("/v1/params").status_code == 200
            r = reader.post("/v1/params", json={"args": {"-np": 3}})
            assert r.status_code == 403 and "GET routes only" in r.json()["error"]
        assert s.status()["generation"] == 1
        assert s.post({"-np": 3}).status_code == 200
        s.stop()
        assert TOKEN not in s.log() and READ not in s.log()


def test_token_file_rotates_on_sighup(tmp_path: Path) -> None:
    """--api-token-file: after the file changes and SIGHUP, the new token works, the old not."""
    model = make_fake_model(tmp_path / "a.gguf")
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    with supervisor(tmp_path, FAKE, model, token="old-token",
                    extra_cli=["--api-token-file", str(token_file)]) as s:
        s.wait_running()
        token_file.write_text("new-token\n")
        assert s.proc is not None
        s.proc.send_signal(signal.SIGHUP)
        with client(s.api_port, "new-token") as new, client(s.api_port, "old-token") as old:
            wait_for(lambda: new.get("/v1/status").status_code == 200, 10, "the new token")
            assert old.get("/v1/status").status_code == 403
        assert "SIGHUP: tokens re-read" in s.log()
        assert "new-token" not in s.log()


def test_failed_token_checks_block_one_address_for_a_second(tmp_path: Path) -> None:
    """10 wrong tokens from 127.0.0.2 within a second: 429 for it, even with the right token
    and on /health; 127.0.0.3 is still served; 127.0.0.2 is served again after the block."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, token=TOKEN, extra_cli=["--api-token", TOKEN]) as s:
        s.wait_running()
        with client(s.api_port, "wrong", "127.0.0.2") as bad, \
                client(s.api_port, TOKEN, "127.0.0.2") as same_host, \
                client(s.api_port, TOKEN, "127.0.0.3") as neighbour:
            codes = [bad.get("/v1/status").status_code for _ in range(10)]
            assert codes == [403] * 10
            assert same_host.get("/v1/status").status_code == 429
            assert same_host.get("/health").status_code == 429
            assert neighbour.get("/v1/status").status_code == 200
            wait_for(lambda: same_host.get("/v1/status").status_code == 200, 5,
                     "127.0.0.2 served again after its second of 429")
        log = s.log()
        assert "from 127.0.0.2: wrong token" in log and "answering 429" in log
        assert "Bearer" not in log and TOKEN not in log, "a token was logged"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made here with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def test_tls_on_the_api_and_the_front_door(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    """With --tls-cert/--tls-key both the API and the front door speak HTTPS (verified
    against the test's own certificate); plain HTTP gets no answer."""
    crt, key = cert
    model = make_fake_model(tmp_path / "a.gguf")
    listen = free_port()
    with supervisor(tmp_path, FAKE, model, token=TOKEN,
                    extra_cli=["--api-token", TOKEN, "--tls-cert", str(crt), "--tls-key",
                               str(key), "--listen", f"127.0.0.1:{listen}"]) as s:
        s.http = client(s.api_port, TOKEN, scheme="https", verify=str(crt))
        s.wait_running()
        assert s.post({"-np": 2}).status_code == 200
        with client(listen, scheme="https", verify=str(crt)) as front:
            assert front.get("/health").status_code == 200
            assert front.get("/props").json()["total_slots"] == 2
        with client(s.api_port, TOKEN) as plain, pytest.raises(httpx.HTTPError):
            plain.get("/v1/status")
        assert "WITHOUT TLS" not in s.log()


def test_non_loopback_token_without_tls_warns_loudly(tmp_path: Path) -> None:
    """Binding the API beyond loopback with a token but no TLS starts, with a warning."""
    model = make_fake_model(tmp_path / "a.gguf")
    port = free_port()
    with supervisor(tmp_path, FAKE, model, token=TOKEN, api_port=port,
                    extra_cli=["--api-token", TOKEN, "--supervisor-addr",
                               f"0.0.0.0:{port}"]) as s:
        s.wait_running()
        assert "WITHOUT TLS" in s.log()
