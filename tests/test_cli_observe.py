"""The observing and operating client commands in-process, against a mock transport:
``corral status`` (readable and --json), ``restart``, ``revert``, ``history``, ``logs [-f]``
and ``events``: what is sent, what is printed, exit codes, Ctrl-C."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from corral.cli import client
from corral.cli import commands as cli
from corral.defaults import TOKEN_ENV

REAL_CLIENT = client.SupervisorClient


class Mock:
    """A supervisor answering each path with what ``routes`` says; keeps the requests."""

    def __init__(self, routes: dict[str, Callable[[httpx.Request], httpx.Response]]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.routes[request.url.path](request)


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Mock:
    m = Mock({})

    def wired(addr: str, token: str | None = None) -> client.SupervisorClient:
        return REAL_CLIENT(addr, token, transport=httpx.MockTransport(m))

    monkeypatch.setattr(client, "SupervisorClient", wired)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    return m


def answer(body: Any, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: httpx.Response(status, json=body)


class Chunks(httpx.SyncByteStream):
    """A streamed body: each chunk as it comes; an exception instead of the next one."""

    def __init__(self, chunks: list[bytes | BaseException]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk


def sse(*chunks: bytes | BaseException) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                    stream=Chunks(list(chunks)))


STATUS = {
    "name": "default", "state": "RUNNING", "pid": 4242, "port": 8081, "restarts": 2,
    "generation": 3, "uptime_s": 3725.0, "last_error": "llama-server exited with code -9",
    "pending_changes": 0, "consecutive_failures": 0, "retry_in_s": None,
    "config": {"binary": "/usr/bin/llama-server",
               "args": {"--model": "/models/q.gguf", "--port": "8081"},
               "argv": ["/usr/bin/llama-server", "--model", "/models/q.gguf", "--port", "8081"],
               "env": {}},
    "store": "file /tmp/c.toml", "store_connected": True, "last_strategy": "stop-first",
    "candidate": None, "fleet": {"instances": 3, "rollout": {"phase": "canary", "revision": 7}},
    "front": {"mode": "route", "held": 0}, "memory": None,
}


def test_status_is_a_readable_summary(mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """State with pid, generation and uptime; model, port, restarts, last error, front door,
    fleet and rollout: one aligned line each."""
    mock.routes["/v1/status"] = answer(STATUS)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert lines["state"] == "RUNNING (pid 4242, generation 3, up 1h 02m)"
    assert lines["model"] == "/models/q.gguf"
    assert lines["port"] == "8081"
    assert lines["restarts"].startswith("2 ")
    assert lines["last error"] == "llama-server exited with code -9"
    assert lines["front door"] == "mode route, held 0"
    assert "instances 3" in lines["fleet"] and "phase canary" in lines["rollout"]
    assert "{" not in out  # not JSON


def test_status_json_is_the_raw_answer(mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """status --json prints the API's answer as indented JSON, unchanged."""
    mock.routes["/v1/status"] = answer(STATUS)
    assert cli.main(["status", "--json"]) == 0
    assert capsys.readouterr().out == json.dumps(STATUS, indent=2) + "\n"


def test_status_refused_prints_the_reason(mock: Mock,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A refused status exits 1 and prints the error the API gave."""
    mock.routes["/v1/status"] = answer({"status": "error", "error": "wrong API token"}, 403)
    assert cli.main(["status"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "wrong API token"


def test_restart_and_revert_post_and_print_the_outcome(
        mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """restart and revert POST with the token and print the outcome; a rejection exits 1."""
    mock.routes["/v1/restart"] = answer({"status": "applied", "pid": 7, "generation": 2})
    mock.routes["/v1/changes/c3/revert"] = answer(
        {"status": "rejected", "error": "model file gone"}, 422)
    assert cli.main(["restart", "--api-token", "t"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == 7
    assert cli.main(["revert", "c3"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "model file gone"
    restart, revert = mock.requests
    assert (restart.method, revert.method) == ("POST", "POST")
    assert restart.headers["authorization"] == "Bearer t"


HISTORY = {"changes": [
    {"time": 1.7e9, "kind": "change", "id": "c2", "source": "api", "client": "10.0.0.1",
     "outcome": "rejected", "error": "model file 'x.gguf' does not exist", "duration_s": 0.0,
     "strategy": None, "restarted": False, "diff": {"--model": ["a.gguf", "x.gguf"]}},
    {"time": 1.7e9 - 60, "kind": "change", "id": "c1", "source": "api", "client": "10.0.0.1",
     "outcome": "applied", "error": None, "duration_s": 2.5, "strategy": "stop-first",
     "restarted": True, "diff": {"--parallel": [None, "4"]}},
]}


def test_history_lists_newest_first(mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """history lists changes newest first with diff, error and strategy; --json is raw."""
    mock.routes["/v1/changes"] = answer(HISTORY)
    assert cli.main(["history", "-n", "5"]) == 0
    assert mock.requests[0].url.params["limit"] == "5"
    out = capsys.readouterr().out.splitlines()
    assert "c2" in out[0] and "rejected" in out[0] and "--model a.gguf -> x.gguf" in out[0]
    assert out[1].strip() == "model file 'x.gguf' does not exist"
    assert "c1" in out[2] and "--parallel - -> 4" in out[2] and "[stop-first, 2.5s]" in out[2]
    assert cli.main(["history", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == HISTORY


def test_logs_tail_prints_lines_prefixed_by_source(
        mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """logs --tail asks for that many lines and prints each prefixed by its source."""
    mock.routes["/v1/logs"] = answer([
        {"id": 1, "time": 1.0, "source": "corral", "text": "INFO corral: started"},
        {"id": 2, "time": 2.0, "source": "llama-server", "text": "main: server is listening"}])
    assert cli.main(["logs", "--tail", "2"]) == 0
    assert mock.requests[0].url.params["tail"] == "2"
    assert capsys.readouterr().out.splitlines() == [
        "[corral] INFO corral: started", "[llama-server] main: server is listening"]


def line(n: int, text: str, source: str = "llama-server") -> bytes:
    data = json.dumps({"id": n, "time": 1.0, "source": source, "text": text})
    return f"id: {n}\nevent: line\ndata: {data}\n\n".encode()


def test_logs_follow_prints_as_lines_come_and_ctrl_c_exits_0(
        mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """-f streams /v1/logs?follow=1: lines as they come (split across chunks), keep-alives
    and gaps not printed as lines; Ctrl-C ends it with exit code 0."""
    gap = b'event: gap\ndata: {"asked": 3, "oldest": 9, "missed": 5, "reset": false}\n\n'
    whole = line(9, "first")
    mock.routes["/v1/logs"] = sse(gap, whole[:10], whole[10:], b": keep-alive\n\n",
                                  line(10, "second", "corral"), KeyboardInterrupt())
    assert cli.main(["logs", "-f", "--tail", "5"]) == 0
    params = mock.requests[0].url.params
    assert (params["follow"], params["tail"]) == ("1", "5")
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["[llama-server] first", "[corral] second"]
    assert "5 line(s) missed" in captured.err


def test_logs_follow_ends_with_the_stream(mock: Mock,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The supervisor stopping ends the stream: exit 0."""
    mock.routes["/v1/logs"] = sse(line(1, "bye"))
    assert cli.main(["logs", "-f"]) == 0
    assert capsys.readouterr().out == "[llama-server] bye\n"


def test_events_prints_each_event(mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """events prints one line per event, passes --since, and --json prints them raw."""
    state = {"id": 5, "time": 1.7e9, "kind": "state", "from": "RUNNING", "to": "APPLYING",
             "error": None}
    change = {"id": 6, "time": 1.7e9, "kind": "change", "change": "c1", "outcome": "applied",
              "source": "api"}
    body = b"".join(f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n".encode()
                    for e in (state, change))
    mock.routes["/v1/events"] = sse(body)
    assert cli.main(["events", "--since", "4"]) == 0
    assert mock.requests[0].url.params["since"] == "4"
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("#5 state RUNNING -> APPLYING")
    assert out[1].endswith("#6 change c1 applied (api)")
    mock.routes["/v1/events"] = sse(body)
    assert cli.main(["events", "--json"]) == 0
    assert "since" not in mock.requests[1].url.params
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == [state, change]


def test_a_refused_stream_exits_1_with_the_reason(
        mock: Mock, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused event stream exits 1 with the HTTP status and reason on stderr."""
    mock.routes["/v1/events"] = answer({"status": "error", "error": "wrong API token"}, 403)
    assert cli.main(["events"]) == 1
    assert "HTTP 403: wrong API token" in capsys.readouterr().err


def test_parse_sse_follows_the_spec() -> None:
    """Multi-line data joins with newlines; comments are skipped; the id carries over;
    an unnamed event is 'message'; a message without data is not dispatched."""
    text = ": hi\nid: 3\ndata: a\ndata: b\n\nevent: x\ndata:c\n\nid: 4\n\n"
    assert list(client.parse_sse(text.split("\n"))) == [
        client.SseMessage("message", "a\nb", "3"), client.SseMessage("x", "c", "3")]


def test_the_new_commands_share_the_target_options() -> None:
    """Every command takes --supervisor-addr and --api-token."""
    parser = cli.build_parser()
    for argv in (["restart"], ["revert", "c1"], ["history"], ["logs"], ["events"],
                 ["status", "--json"]):
        ns = parser.parse_args([*argv, "--supervisor-addr", "h:9", "--api-token", "x"])
        assert (ns.supervisor_addr, ns.api_token) == ("h:9", "x")
