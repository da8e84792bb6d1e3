"""``corral supervise`` under (simulated) systemd, with the fake llama-server: READY=1 only
once llama-server is ready, RELOADING=1 during an apply, STOPPING=1 at SIGTERM, watchdog
pings; and the front door on a socket handed over by socket activation, serving a client
that connected before the supervisor ran, across a supervisor restart."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from corral.observe.systemd import EXIT_FATAL_AT_START, monotonic_usec
from tests.harness import FAKE, SupervisorProcess, make_fake_model, props, supervisor
from tests.systemd_helpers import (
    NotifyReceiver,
    activation_env,
    activation_prefix,
    address,
    environ_of,
    parse,
    tcp_listener,
)

pytestmark = [pytest.mark.slow]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "a.gguf")


def test_ready_reloading_stopping_and_watchdog(tmp_path: Path, model: Path) -> None:
    """READY=1 once llama-server is ready, RELOADING=1 per apply, watchdog pings, STOPPING=1."""
    with NotifyReceiver() as systemd, \
            supervisor(tmp_path, FAKE, model, ["--fake-load-s", "0.5"],
                       env={**systemd.env, "WATCHDOG_USEC": "400000"}) as sup:
        sup.wait_running()
        ready = systemd.wait_message("READY", "1", timeout=5)
        # READY=1 came when llama-server answered: the supervisor said RUNNING already.
        status = sup.status()
        assert props(status["port"])["total_slots"] >= 1
        before = [parse(t) for t in systemd.texts[:ready]]
        assert {"STATUS": "STARTING"} in before, systemd.texts
        assert not any("READY" in f or "RELOADING" in f for f in before), systemd.texts
        assert parse(systemd.texts[ready]).get("STATUS", "RUNNING").startswith("RUNNING")
        # llama-server inherits none of systemd's variables.
        child_env = environ_of(status["pid"])
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"} & set(child_env)

        # An apply is a reload: RELOADING=1 stamped on CLOCK_MONOTONIC, then READY=1.
        started = monotonic_usec()
        r = sup.post({"np": 2})
        finished = monotonic_usec()
        assert r.status_code == 200 and r.json()["status"] == "applied", r.text
        reloading = systemd.wait_message("RELOADING", "1", timeout=10, after=ready + 1)
        stamp = int(parse(systemd.texts[reloading])["MONOTONIC_USEC"])
        assert started <= stamp <= finished
        again = systemd.wait_message("READY", "1", timeout=10, after=reloading + 1)
        assert parse(systemd.texts[again]).get("STATUS", "RUNNING").startswith("RUNNING")

        # Watchdog: a ping every 0.2 s (half of WATCHDOG_USEC) while the loop is alive.
        systemd.wait_for(lambda t: t.count("WATCHDOG=1") >= 3, 10, "three watchdog pings")

        assert sup.stop(signal.SIGTERM) == 0
        stopping = systemd.wait_message("STOPPING", "1", timeout=5, after=again + 1)
        assert "READY=1" not in systemd.texts[stopping:]


def test_a_rejected_change_is_no_reload(tmp_path: Path, model: Path) -> None:
    """A change refused by the pre-flight checks restarts nothing: no RELOADING=1."""
    with NotifyReceiver() as systemd, \
            supervisor(tmp_path, FAKE, model, env=systemd.env) as sup:
        sup.wait_running()
        systemd.wait_message("READY", "1", timeout=5)
        r = sup.post({"-m": "/nonexistent/model.gguf"})
        assert r.status_code == 422, r.text
        sup.wait_running()
        assert not any("RELOADING=1" in t for t in systemd.drain())


def test_a_start_up_that_ends_fatal_exits_3_and_says_why(tmp_path: Path, model: Path) -> None:
    """Under systemd, --max-start-failures failed starts before anything was ready: no
    READY=1, STATUS= says why (to the end), the supervisor exits 3 so that systemctl start
    fails at once and Restart= decides. (Without $NOTIFY_SOCKET it stays up in FATAL for a
    fix through the API: test_reliability.)"""
    with NotifyReceiver() as systemd, \
            supervisor(tmp_path, FAKE, model, ["--fake-exit-at-start", "1"],
                       extra_cli=["--max-start-failures", "2"], env=systemd.env) as sup:
        assert sup.proc is not None
        assert sup.proc.wait(60) == EXIT_FATAL_AT_START == 3
        texts = systemd.wait_for(lambda t: any("STOPPING=1" in x for x in t), 5, "STOPPING=1")
    assert not any("READY=1" in t for t in texts), texts
    statuses = [parse(t)["STATUS"] for t in texts if "STATUS" in parse(t)]
    fatal = statuses.index(next(s for s in statuses if s.startswith("FATAL")))
    assert statuses[fatal].startswith("FATAL at start-up: llama-server exited with code 1")
    assert set(statuses[fatal:]) == {statuses[fatal]}, statuses
    assert sup.log().count("started llama-server") == 2


def request(sock: socket.socket, path: str = "/props") -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n".encode())


def response(sock: socket.socket, sup: SupervisorProcess,
             timeout: float = 30) -> tuple[int, dict[str, object]]:
    """Read the whole answer; fail early if the supervisor exits (it could not listen)."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no answer in {timeout} s: {data!r}"
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            assert sup.proc is not None and sup.proc.poll() is None, sup.log()[-3000:]
            continue
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_front_door_on_an_inherited_socket_keeps_clients_across_a_restart(
        tmp_path: Path, model: Path) -> None:
    """systemd (here: the test) holds the listening socket. A client that connects before
    the supervisor runs waits in the backlog and is answered once llama-server is ready;
    one that connects while the supervisor is restarting is answered by the next one."""
    with tcp_listener(backlog=64) as listener:
        listen = address(listener)

        def run_supervisor() -> contextlib.AbstractContextManager[SupervisorProcess]:
            return supervisor(tmp_path, FAKE, model, ["--fake-load-s", "0.3"],
                              extra_cli=["--listen", listen, "--quiet-llama"],
                              exec_prefix=activation_prefix(),
                              env=activation_env(listener), pass_fds=[listener.fileno()])

        early = socket.create_connection(listener.getsockname(), timeout=5)
        request(early)  # nobody runs yet: the kernel has queued the connection
        with early, run_supervisor() as sup:
            status, body = response(early, sup)
            assert status == 200 and body["model_path"] == str(model)
            assert f"front door on the socket systemd passed ({listen})" in sup.log()
            first_pid = sup.llama_pid()
            assert sup.stop(signal.SIGTERM) == 0

        # Between two supervisors: the port still accepts (into the backlog).
        waiting = socket.create_connection(listener.getsockname(), timeout=5)
        request(waiting)
        with waiting, run_supervisor() as sup:
            status, body = response(waiting, sup)
            assert status == 200 and body["pid"] != first_pid
            assert sup.stop(signal.SIGTERM) == 0
