"""The client commands in-process: ``corral status|params|apply`` against a mock transport.

The real round trip (a supervisor and a fake llama-server) is ``test_client_commands`` in
``test_supervise_fake.py``; these tests pin what is sent, what is printed and the exit codes.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import httpx
import pytest

from corral.cli import client
from corral.cli import commands as cli
from corral.defaults import SUPERVISOR_ADDR, TOKEN_ENV, instance_id, token_from_env
from corral.errors import CorralError, UsageError


class Recorder:
    """A mock supervisor: answers with ``response`` and keeps every request it saw."""

    def __init__(self, status: int = 200, body: Any = None, *, text: str | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status, self.body, self.text = status, body, text

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.text is not None:
            return httpx.Response(self.status, text=self.text)
        return httpx.Response(self.status, json=self.body if self.body is not None else {})

    def client(self, addr: str = "h:1", token: str | None = None) -> client.SupervisorClient:
        return REAL_CLIENT(addr, token, transport=httpx.MockTransport(self))


REAL_CLIENT = client.SupervisorClient  # the fixture below patches the module attribute


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The command line's SupervisorClient, wired to a Recorder instead of the network."""
    recorder = Recorder(body={"state": "RUNNING"})

    def wired(addr: str, token: str | None = None) -> client.SupervisorClient:
        return recorder.client(addr, token)

    monkeypatch.setattr(client, "SupervisorClient", wired)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return recorder


def test_status_gets_v1_status_with_the_token() -> None:
    """The token travels as a bearer header; the answer comes back decoded."""
    recorder = Recorder(body={"state": "RUNNING"})
    reply = recorder.client("10.0.0.1:9000", "s3cret").status()
    assert reply == client.Reply(True, {"state": "RUNNING"})
    (request,) = recorder.requests
    assert (request.method, str(request.url)) == ("GET", "http://10.0.0.1:9000/v1/status")
    assert request.headers["authorization"] == "Bearer s3cret"


def test_no_token_sends_no_authorization_header() -> None:
    """Without a token nothing pretends to authenticate."""
    recorder = Recorder()
    recorder.client().params()
    assert "authorization" not in recorder.requests[0].headers
    assert recorder.requests[0].url.path == "/v1/params"


def test_apply_posts_the_body() -> None:
    """apply is a POST of the given body to /v1/params."""
    recorder = Recorder(body={"status": "applied"})
    assert recorder.client().apply({"args": {"-np": 4}}).ok
    (request,) = recorder.requests
    assert request.method == "POST" and request.url.path == "/v1/params"
    assert json.loads(request.content) == {"args": {"-np": 4}}


def test_a_refusal_is_an_answer_not_an_error() -> None:
    """A 422 comes back as a Reply that is not ok, with the server's explanation."""
    reply = Recorder(422, {"status": "rejected"}).client().apply({"args": {}})
    assert reply == client.Reply(False, {"status": "rejected"})


def test_a_body_that_is_not_json_comes_back_as_text() -> None:
    """A proxy's HTML error page is shown, not turned into a traceback."""
    reply = Recorder(502, text="<h1>Bad Gateway</h1>").client().status()
    assert reply == client.Reply(False, "<h1>Bad Gateway</h1>")


def test_unreachable_supervisor_is_a_corral_error_naming_the_url() -> None:
    """Connection failures are translated at the client boundary."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    unreachable = client.SupervisorClient("h:1", transport=httpx.MockTransport(refuse))
    with pytest.raises(CorralError, match=r"http://h:1/v1/status: connection refused"):
        unreachable.status()


def test_change_body_from_flags_or_json() -> None:
    """Flags after '--' become {"args": ...}; --json is sent as given."""
    assert client.change_body(None, ["-np", "4", "-cb"]) == {"args": {"-np": "4", "-cb": True}}
    assert client.change_body('{"args": {"-np": 4}}', ["ignored"]) == {"args": {"-np": 4}}


@pytest.mark.parametrize(("raw", "flags", "says"), [
    ("{not json", [], "--json"),
    (None, ["model.gguf"], "expected a flag"),
])
def test_change_body_rejects_bad_input_as_usage(raw: str | None, flags: list[str],
                                                says: str) -> None:
    """A body that cannot be built is the user's mistake, reported without a traceback."""
    with pytest.raises(UsageError, match=says):
        client.change_body(raw, flags)


def test_cli_status_json_prints_the_json_and_exits_0(
    server: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """`corral status --json` prints the answer as indented JSON and succeeds."""
    assert cli.main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"state": "RUNNING"}
    assert out == json.dumps({"state": "RUNNING"}, indent=2) + "\n"
    assert str(server.requests[0].url) == f"http://{SUPERVISOR_ADDR}/v1/status"


def test_cli_token_comes_from_the_environment(
    server: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--api-token defaults to $CORRAL_API_TOKEN; the flag wins over it."""
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    cli.main(["params"])
    cli.main(["params", "--api-token", "from-flag"])
    assert [r.headers["authorization"] for r in server.requests] == [
        "Bearer from-env", "Bearer from-flag"]


def test_cli_apply_sends_the_flags_and_fails_on_refusal(
    server: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """`corral apply -- FLAGS` posts them; a refusal prints the reason and exits 1."""
    server.status, server.body = 422, {"status": "rejected", "error": "unknown flag"}
    assert cli.main(["apply", "--supervisor-addr", "h:2", "--", "-np", "3"]) == 1
    assert json.loads(server.requests[0].content) == {"args": {"-np": "3"}}
    assert json.loads(capsys.readouterr().out)["status"] == "rejected"


def test_cli_bad_json_is_a_usage_error(
    server: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed --json body exits 2, sends nothing, and says what was wrong."""
    assert cli.main(["apply", "--json", "{oops"]) == 2
    assert server.requests == []
    assert capsys.readouterr().err.startswith("corral: --json: ")


def test_cli_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody at the address: one line on stderr, exit 1, no traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert cli.main(["status", "--supervisor-addr", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"corral: http://127.0.0.1:{port}/v1/status: ")


def test_client_commands_default_to_the_supervisors_address() -> None:
    """Supervisor and client meet at the same address without flags."""
    parser = cli.build_parser()
    for command in ("supervise", "status", "params", "apply"):
        assert parser.parse_args([command]).supervisor_addr == SUPERVISOR_ADDR


def test_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag wins; else the variable; an empty value means no token."""
    monkeypatch.setenv(TOKEN_ENV, "env")
    assert (token_from_env("flag"), token_from_env(None)) == ("flag", "env")
    monkeypatch.setenv(TOKEN_ENV, "")
    assert token_from_env(None) is None


def test_instance_id_is_host_dash_pid() -> None:
    """One format for the etcd key, the fleet table and applied_by."""
    host, _, pid = instance_id().rpartition("-")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
