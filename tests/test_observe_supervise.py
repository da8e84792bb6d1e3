"""Streams, history and operations end to end: a real ``corral supervise`` with the fake
llama-server, and the client commands as a user runs them (``corral logs -f``, ``corral
events``, ``restart``, ``revert``, ``history``), plus SIGHUP re-reading the TOML file.

Every wait is bounded and polls a condition (tests/harness.py); followers are read by a
thread into a queue, so a missing line fails the test at its deadline instead of hanging.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FAKE, SupervisorProcess, make_fake_model, supervisor, wait_for

pytestmark = [pytest.mark.slow]


_EXEC_WITH_SIGINT_IGNORED = ("import os, signal, sys; signal.signal(signal.SIGINT, "
                             "signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])")


class Follower:
    """A client command that keeps printing (``corral logs -f``, ``corral events``)."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        """``sigint_ignored``: started as a shell without job control starts a background
        command (``corral events &`` in a script, a CI step run that way): SIGINT ignored,
        which exec keeps and Python then leaves alone (no KeyboardInterrupt)."""
        command = [sys.executable, "-m", "corral", *args]
        if sigint_ignored:
            command = [sys.executable, "-c", _EXEC_WITH_SIGINT_IGNORED, *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, condition: Callable[[str], bool], what: str,
                  timeout: float = 20) -> str:
        """The first line (seen so far or to come) for which ``condition`` holds."""
        for line in self.lines:
            if condition(line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the command ended before {what}; exit "
                                     f"{self.proc.wait(5)}; stderr: {self.stderr()}; "
                                     f"lines: {self.lines}")
            self.lines.append(line)
            if condition(line):
                return line
        raise AssertionError(f"timed out waiting for {what}; lines: {self.lines[-20:]}")

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None \
            else ""

    def interrupt(self, timeout: float = 10) -> int:
        """Ctrl-C, as a user would."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def corral(*args: str, timeout: float = 60) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                         text=True, timeout=timeout)
    return out.returncode, out.stdout


def addr(sup: SupervisorProcess) -> list[str]:
    return ["--supervisor-addr", f"127.0.0.1:{sup.api_port}"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "a.gguf")


@pytest.fixture
def sup(tmp_path: Path, model: Path) -> Iterator[SupervisorProcess]:
    with supervisor(tmp_path, FAKE, model) as s:
        s.wait_running()
        yield s


@pytest.fixture
def followers() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for f in started:
        f.close()


def test_logs_follow_shows_both_sources_and_ctrl_c_exits_0(
        sup: SupervisorProcess, followers: list[Follower]) -> None:
    """`corral logs -f`: the tail, then new lines of llama-server and of the supervisor as
    they come, each labelled; Ctrl-C ends it with 0."""
    logs = Follower("logs", "-f", "--tail", "50", *addr(sup))
    followers.append(logs)
    logs.wait_line(lambda ln: ln.startswith("[llama-server] server is listening"),
                   "llama-server's start-up line from the tail")
    assert sup.post({"-np": 2}).status_code == 200
    logs.wait_line(lambda ln: ln.startswith("[corral] ") and "applying a batch" in ln,
                   "the supervisor's own line about the apply")
    logs.wait_line(lambda ln: ln.startswith("[llama-server] fake llama-server starting")
                   and "--parallel 2" in ln, "the new llama-server's first line")
    assert logs.interrupt() == 0


def test_logs_tail_is_json_over_http(sup: SupervisorProcess) -> None:
    """GET /v1/logs?tail=N returns at most N JSON lines; corral logs --tail prints them."""
    lines = sup.http.get("/v1/logs", params={"tail": 5}).json()
    assert 0 < len(lines) <= 5
    assert {"id", "time", "source", "text"} == set(lines[-1])
    code, out = corral("logs", "--tail", "3", *addr(sup))
    assert code == 0 and len(out.splitlines()) == 3
    assert all(re.match(r"^\[(corral|llama-server)\] ", x) for x in out.splitlines())


def test_events_follow_a_crash_and_the_revival(sup: SupervisorProcess,
                                               followers: list[Follower]) -> None:
    """`corral events --since 0 --json`: the kept events (boot), then the crash of a
    SIGKILLed llama-server, the states and the new server's ready, as they happen."""
    events = Follower("events", "--since", "0", "--json", *addr(sup))
    followers.append(events)
    def seen(kind: str, **kv: Any) -> Callable[[str], bool]:
        def match(text: str) -> bool:
            event = json.loads(text)
            return bool(event["kind"] == kind and all(event.get(k) == v for k, v in kv.items()))
        return match

    events.wait_line(seen("ready"), "the first ready (replayed)")
    old = sup.llama_pid()
    os.kill(old, signal.SIGKILL)
    crash = json.loads(events.wait_line(seen("crash", pid=old), "the crash"))
    assert crash["reason"] == "crash" and crash["code"] == -9
    events.wait_line(seen("state", to="STARTING"), "STARTING")
    ready = json.loads(events.wait_line(lambda ln: seen("ready")(ln)
                                        and json.loads(ln)["pid"] != old, "the new ready"))
    ids = [json.loads(x)["id"] for x in events.lines]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ready["id"] > crash["id"]
    assert events.interrupt() == 0


@pytest.mark.parametrize("command", [["logs", "-f"], ["events", "--since", "0"]])
def test_ctrl_c_ends_a_follow_started_with_sigint_ignored(
        sup: SupervisorProcess, followers: list[Follower], command: list[str]) -> None:
    """Started with SIGINT ignored (what a background job of a script inherits, and what
    made both follow tests above time out in a CI run started that way), Ctrl-C still
    ends `corral logs -f` and `corral events` with 0."""
    follower = Follower(*command, *addr(sup), sigint_ignored=True)
    followers.append(follower)
    follower.wait_line(bool, "a first line")
    assert follower.interrupt() == 0


def test_events_reconnect_with_last_event_id(sup: SupervisorProcess) -> None:
    """A reconnect with Last-Event-ID gets exactly what came after it."""
    assert sup.post({"-np": 2}).status_code == 200
    with sup.http.stream("GET", "/v1/events", params={"since": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        ids = []
        for line in r.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            if len(ids) >= 3:
                break
    with sup.http.stream("GET", "/v1/events", headers={"Last-Event-ID": str(ids[1])}) as r:
        for line in r.iter_lines():
            if line.startswith("id: "):
                assert int(line[4:]) == ids[2]
                break


def test_restart_revert_and_history(sup: SupervisorProcess, tmp_path: Path,
                                    model: Path) -> None:
    """restart runs the same config on a new pid; revert ID brings back the config before
    that change; history lists them newest first, and survives a supervisor restart."""
    before = sup.status()
    code, out = corral("restart", *addr(sup))
    restarted = json.loads(out)
    assert code == 0 and restarted["status"] == "applied", out
    assert restarted["pid"] != before["pid"] and restarted["pid"] == sup.llama_pid()
    assert restarted["config"]["args"] == before["config"]["args"]
    code, out = corral("apply", *addr(sup), "--", "-np", "3")
    change_id = json.loads(out)["change_id"]
    assert code == 0 and sup.status()["config"]["args"]["--parallel"] == "3"
    code, out = corral("revert", change_id, *addr(sup))
    assert code == 0 and json.loads(out)["status"] == "applied", out
    assert "--parallel" not in sup.status()["config"]["args"]
    assert "--parallel" not in sup.stored()["args"]  # the revert is stored like any change
    code, out = corral("history", "-n", "10", "--json", *addr(sup))
    entries = json.loads(out)["changes"]
    sources = [e["source"] for e in entries if e["kind"] == "change"]
    assert sources[:3] == ["revert", "api", "restart"]
    assert entries[0]["diff"] == {"--parallel": ["3", None]}
    assert entries[1]["client"] == "127.0.0.1"
    assert entries[-1]["kind"] == "start-up"
    code, text = corral("history", *addr(sup))
    assert code == 0 and "--parallel 3 -> -" in text
    sup.stop()
    with supervisor(tmp_path, FAKE, model, state_dir=tmp_path / "state") as again:
        again.wait_running()
        code, out = corral("history", "--json", *addr(again))
        ids = [e["id"] for e in json.loads(out)["changes"]]
        assert change_id in ids  # read back from the audit log


def test_a_revert_finds_the_change_of_an_earlier_run(tmp_path: Path, model: Path) -> None:
    """Change ids are unique across supervisor runs: the first change of the next run gets
    a new id, and reverting the earlier run's first change brings back the config before
    that one (from the audit log), not the config before the newer change."""
    state = tmp_path / "state"
    with supervisor(tmp_path, FAKE, model, state_dir=state) as first:
        first.wait_running()
        r = first.post({"-np": 2})
        assert r.status_code == 200, r.text
        old_id = r.json()["change_id"]
        assert first.stop() == 0
    with supervisor(tmp_path, FAKE, model, state_dir=state) as second:
        assert second.wait_running()["config"]["args"]["--parallel"] == "2"
        r = second.post({"--alias": "newer"})
        assert r.status_code == 200, r.text
        assert r.json()["change_id"] != old_id  # both are their run's first change
        code, out = corral("revert", old_id, *addr(second))
        assert code == 0 and json.loads(out)["status"] == "applied", out
        args = second.status()["config"]["args"]
        assert "--parallel" not in args and "--alias" not in args, args


def test_sighup_applies_a_hand_edit_of_the_toml_file(sup: SupervisorProcess) -> None:
    """Edit the stored config by hand, SIGHUP: applied through the normal transaction."""
    text = sup.config_file.read_text()
    assert "--parallel" not in text
    sup.config_file.write_text(text.replace('[default.args]', '[default.args]\n"--parallel" = "4"'))
    assert sup.proc is not None
    old = sup.llama_pid()
    sup.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: sup.status()["config"]["args"].get("--parallel") == "4"
             and sup.status()["state"] == "RUNNING", 20, "the edited config running")
    assert sup.llama_pid() != old
    history = sup.http.get("/v1/changes", params={"limit": 1}).json()["changes"]
    assert history[0]["source"] == "reload" and history[0]["outcome"] == "applied"


def test_streams_end_when_the_supervisor_stops(sup: SupervisorProcess,
                                               followers: list[Follower]) -> None:
    """SIGTERM with followers attached: the supervisor exits promptly and so do they."""
    events = Follower("events", *addr(sup))
    logs = Follower("logs", "-f", *addr(sup))
    followers.extend([events, logs])
    logs.wait_line(lambda _: True, "a first line")
    # Both connected (an events client prints nothing until something happens):
    assert sup.post({"-np": 2}).status_code == 200
    events.wait_line(lambda line: "change" in line, "the change's event")
    started = time.monotonic()
    assert sup.stop(timeout=20) == 0
    assert time.monotonic() - started < 15
    assert events.proc.wait(10) == 0 and logs.proc.wait(10) == 0
