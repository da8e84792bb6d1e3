"""The management API: validation, errors, auth, async changes, and fuzzing from OpenAPI."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.harness import FAKE, SupervisorProcess, free_port, make_fake_model, supervisor, wait_for

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorProcess]:
    tmp = tmp_path_factory.mktemp("api")
    model = make_fake_model(tmp / "a.gguf")
    with supervisor(tmp, FAKE, model) as s:
        s.wait_running()
        yield s


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "JSON"),
    (b"[]", "body"),
    (b"{}", "args"),
    (b'{"args": []}', "args"),
    (b'{"args": {"-np": [1]}}', "args"),
    (b'{"args": {"-np": 2}, "extra": 1}', "extra"),
    (b'{"args": {"-np": {"a": 1}}}', "args"),
])
def test_malformed_bodies_are_400(sup: SupervisorProcess, body: bytes, fragment: str) -> None:
    """A body that is not a valid change is a 400 naming the problem; nothing is applied."""
    before = sup.status()
    r = sup.http.post("/v1/params", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["status"] == "error"
    assert fragment.lower() in r.json()["error"].lower()
    assert sup.status()["generation"] == before["generation"]


def test_oversized_body_is_413(sup: SupervisorProcess) -> None:
    """A body over the size limit is a 413."""
    r = sup.http.post("/v1/params", content=b'{"args": {"-a": "' + b"x" * 100_000 + b'"}}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "bytes" in r.json()["error"]


def test_too_many_args_is_400(sup: SupervisorProcess) -> None:
    """A change with hundreds of flags is a 400."""
    r = sup.post({f"--f{i}": 1 for i in range(300)})
    assert r.status_code == 400


def test_wait_false_gives_a_change_id_to_poll(sup: SupervisorProcess) -> None:
    """?wait=false answers 202 with a change id whose outcome can be polled."""
    r = sup.post({"--alias": "async-change"}, wait=False)
    assert r.status_code == 202, r.text
    change_id = r.json()["change_id"]
    assert r.headers["location"] == f"/v1/changes/{change_id}"
    outcome = wait_for(lambda: (c := sup.http.get(f"/v1/changes/{change_id}").json())
                       ["status"] != "pending" and c, 30, "outcome")
    assert outcome["status"] == "applied"
    assert outcome["config"]["args"]["--alias"] == "async-change"
    assert sup.http.get("/v1/params").json()["config"]["args"]["--alias"] == "async-change"


def test_unknown_change_is_404(sup: SupervisorProcess) -> None:
    """An unknown change id is a 404 that names it."""
    r = sup.http.get("/v1/changes/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_health_and_openapi(sup: SupervisorProcess) -> None:
    """/health reports the state, and the OpenAPI spec lists every route."""
    assert sup.http.get("/health").json() == {"status": "ok", "state": "RUNNING"}
    spec = sup.http.get("/openapi.json").json()
    assert {"/v1/params", "/v1/status", "/v1/changes/{change_id}", "/health"} <= set(
        spec["paths"])


def test_token_is_required_and_never_shown(tmp_path: Path) -> None:
    """With --api-token, only /health is open; a wrong token is a 403; no token is ever shown."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, token=TOKEN,
                    extra_cli=["--api-token", TOKEN]) as s:
        s.wait_running()
        bare = httpx.Client(base_url=f"http://127.0.0.1:{s.api_port}", timeout=10)
        assert bare.get("/health").status_code == 200
        r = bare.get("/v1/status")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert bare.get("/v1/status", headers={"authorization": "Bearer wrong"}).status_code == 403
        assert bare.post("/v1/params", json={"args": {"-np": 2}}).status_code == 401
        assert bare.get("/openapi.json").status_code == 401
        bare.close()
        status = s.http.get("/v1/status")
        assert status.status_code == 200
        assert TOKEN not in status.text
        assert s.post({"-np": 2}).status_code == 200
        s.stop()
        assert TOKEN not in s.log()


def test_token_from_environment(tmp_path: Path) -> None:
    """CORRAL_API_TOKEN turns on the token check like --api-token."""
    model = make_fake_model(tmp_path / "a.gguf")
    with supervisor(tmp_path, FAKE, model, token=TOKEN, env={"CORRAL_API_TOKEN": TOKEN}) as s:
        s.wait_running()
        assert httpx.get(f"http://127.0.0.1:{s.api_port}/v1/status").status_code == 401


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    """Serving the API beyond loopback without a token refuses to start."""
    model = make_fake_model(tmp_path / "a.gguf")
    out = subprocess.run(
        [sys.executable, "-m", "corral", "supervise", "--supervisor-addr", f"0.0.0.0:{free_port()}",
         "--binary", str(FAKE), "--model", str(model), "--port", str(free_port()),
         "--config-file", str(tmp_path / "c.toml"), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "without a token" in out.stderr and "CORRAL_API_TOKEN" in out.stderr
    assert not (tmp_path / "c.toml").exists()


def test_api_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """An API port in use stops the start with a message naming it."""
    import socket

    model = make_fake_model(tmp_path / "a.gguf")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "corral", "supervise", "--supervisor-addr", f"127.0.0.1:{port}",
             "--binary", str(FAKE), "--model", str(model), "--port", str(free_port()),
             "--config-file", str(tmp_path / "c.toml"), "--state-dir", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"cannot serve the API on 127.0.0.1:{port}" in out.stderr


def test_fuzzing_from_openapi_finds_no_server_errors(sup: SupervisorProcess) -> None:
    """Every operation, up to 40 valid and 40 invalid generated requests each: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{sup.api_port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    calls = 0
    for operation, mode in itertools.product(operations, list(GenerationMode)):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            case.call_and_validate(checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:
            # No invalid request exists for an operation without inputs (GET /health).
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert calls >= 80  # POST /v1/params alone gets 40 of each kind
    assert sup.status()["state"] == "RUNNING"


def test_unknown_routes_and_methods_answer_json(sup: SupervisorProcess) -> None:
    """Unknown routes and methods answer 404/405 in the JSON error format."""
    r = sup.http.get("/v2/nothing")
    assert r.status_code == 404 and r.json() == {"status": "error", "error": "Not Found"}
    r = sup.http.delete("/v1/params")
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed"
