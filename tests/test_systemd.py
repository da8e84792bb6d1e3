"""corral.observe.systemd: sd_notify datagrams on a real socket, the watchdog's cadence,
socket activation with a really inherited socket, the state-to-message table, and the
contrib/ units checked by ``systemd-analyze verify``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.core.decide import State
from corral.front.activation import inherited_listener, listen_fds
from corral.observe.systemd import (
    EXIT_FATAL_AT_START,
    Notifier,
    NotifyMemory,
    monotonic_usec,
    transition_messages,
    watchdog_interval,
)
from tests.harness import ROOT
from tests.systemd_helpers import (
    NotifyReceiver,
    activation_env,
    activation_prefix,
    address,
    parse,
    tcp_listener,
)
from tests.waiting import until

S = State


@pytest.fixture
def receiver() -> NotifyReceiver:
    with NotifyReceiver() as r:
        yield r  # type: ignore[misc]


# ---- sending ------------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_noop() -> None:
    """Without NOTIFY_SOCKET every notify call returns False, sends nothing, has no watchdog."""
    n = Notifier.from_environment(env={})
    assert not n.enabled and n.watchdog_s is None
    assert not any([n.ready(), n.status("x"), n.reloading(), n.ready_again(), n.stopping(),
                    n.watchdog_ping(), n.on_state(S.STARTING, S.RUNNING)])
    assert n.sent == []


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_each_message_arrives_as_one_datagram(abstract: bool) -> None:
    """Each notify message arrives as one datagram, on path and abstract sockets alike."""
    with NotifyReceiver(abstract=abstract) as r:
        n = Notifier(r.address)
        assert n.ready("RUNNING")
        assert n.status("APPLYING: 2 changes")
        before = monotonic_usec()
        assert n.reloading()
        after = monotonic_usec()
        assert n.ready_again()
        assert n.watchdog_ping()
        assert n.stopping()
        texts = r.wait_for(lambda t: len(t) == 6, 5, "six datagrams")
    assert texts[0] == "READY=1\nSTATUS=RUNNING"
    assert texts[1] == "STATUS=APPLYING: 2 changes"
    reload = parse(texts[2])
    assert reload["RELOADING"] == "1" and before <= int(reload["MONOTONIC_USEC"]) <= after
    assert texts[3:] == ["READY=1", "WATCHDOG=1", "STOPPING=1"]
    assert n.sent == texts


def test_monotonic_usec_is_clock_monotonic() -> None:
    """systemd compares MONOTONIC_USEC with CLOCK_MONOTONIC; time.monotonic() is that clock."""
    a = time.monotonic()
    b = monotonic_usec() / 1e6
    c = time.monotonic()
    assert a <= b <= c + 1e-6


def test_from_environment_reads_and_unsets(receiver: NotifyReceiver) -> None:
    """from_environment reads NOTIFY_SOCKET and WATCHDOG_* and unsets them unless told not to."""
    env = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "3000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environment(env=env)
    assert n.enabled and n.watchdog_s == 1.5
    assert env == {"PATH": "/bin"}  # llama-server does not inherit them
    kept = {"NOTIFY_SOCKET": receiver.address}
    assert Notifier.from_environment(unset=False, env=kept).enabled and kept


def test_a_slow_reader_gets_every_message_in_order_and_a_wedged_one_costs_a_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """The queue holds ~10 datagrams: sends wait for the reader (up to send_timeout)."""
    with NotifyReceiver(reading=False) as r:
        n = Notifier(r.address, send_timeout=0.2)
        sent = 0
        with caplog.at_level(logging.WARNING, "corral.systemd"):
            while n.status(f"n{sent}"):  # nobody reads: the queue fills, then a send waits
                sent += 1
                assert sent < 10_000
        assert sent >= 1 and "cannot notify systemd" in caplog.text
        r.start_reading()
        n.send_timeout = 10
        for i in range(sent, sent + 50):  # the reader keeps up: nothing is lost
            assert n.status(f"n{i}")
        texts = r.wait_for(lambda t: len(t) == sent + 50, 10, "every datagram")
    assert texts == [f"STATUS=n{i}" for i in range(sent + 50)]


def test_a_notify_socket_that_is_gone_does_not_raise(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A missing notify socket logs a warning instead of raising; a vsock address is a no-op."""
    n = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, "corral.systemd"):
        assert not n.ready()
    assert "cannot notify systemd" in caplog.text
    assert not Notifier("vsock:2:1234").enabled  # an address kind not supported: no-op


# ---- the watchdog -------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "PID"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str],
                                                    expected: float | None) -> None:
    """The watchdog interval is half WATCHDOG_USEC; None if unset, bad, 0 or for another pid."""
    env = {k: (str(os.getpid()) if v == "PID" else v) for k, v in env.items()}
    assert watchdog_interval(env) == expected


async def test_watchdog_pings_at_half_the_period_while_alive(receiver: NotifyReceiver) -> None:
    """The watchdog pings every half period while alive, stops while stuck, then resumes."""
    n = Notifier.from_environment(env={"NOTIFY_SOCKET": receiver.address,
                                       "WATCHDOG_USEC": "100000"})
    assert n.watchdog_s == 0.05
    state = {"alive": True, "checks": 0}

    def alive() -> bool:
        state["checks"] += 1
        return bool(state["alive"])

    def pings() -> list[float]:
        receiver.drain()
        return [t for t, text in receiver.datagrams if text == "WATCHDOG=1"]

    task = asyncio.create_task(n.watchdog(alive))
    try:
        await until(lambda: len(pings()) >= 6, 5, "six pings")
        times = pings()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert 0.04 <= sum(gaps) / len(gaps) <= 0.2, gaps  # ~0.05 s, loaded CI allowed
        # A stuck supervisor loop: no more pings, however often the watchdog looks.
        state["alive"] = False
        stuck_at = state["checks"]
        sent_before = len(pings())
        await until(lambda: state["checks"] >= stuck_at + 3, 5, "three more checks")
        assert len(pings()) <= sent_before + 1  # at most one that was on its way
        silent = len(pings())
        await until(lambda: state["checks"] >= stuck_at + 5, 5, "five more checks")
        assert len(pings()) == silent
        state["alive"] = True
        await until(lambda: len(pings()) > silent, 5, "pings again")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_returns_at_once_without_watchdog_usec(receiver: NotifyReceiver) -> None:
    """Without WATCHDOG_USEC or a socket the watchdog returns at once, sending nothing."""
    n = Notifier(receiver.address)
    await asyncio.wait_for(n.watchdog(lambda: True), 1)
    await asyncio.wait_for(Notifier(None, watchdog_s=0.01).watchdog(lambda: True), 1)
    assert receiver.drain() == []


# ---- state changes ------------------------------------------------------------------------


def run(*steps: tuple[State, State, str | None],
        memory: NotifyMemory | None = None) -> tuple[list[list[str]], NotifyMemory]:
    memory = memory or NotifyMemory()
    out = []
    for old, new, detail in steps:
        messages, memory = transition_messages(old, new, detail, memory, now_usec=42)
        out.append(messages)
    return out, memory


def test_ready_once_when_first_running_and_not_after_a_crash() -> None:
    """READY=1 goes out on the first RUNNING only; a crash and revival change just STATUS."""
    out, _ = run((S.STOPPED, S.STARTING, None), (S.STARTING, S.RUNNING, None),
                 (S.RUNNING, S.STARTING, "crashed"), (S.STARTING, S.RUNNING, None))
    assert out == [["STATUS=STARTING"], ["READY=1", "STATUS=RUNNING"],
                   ["STATUS=STARTING: crashed"], ["STATUS=RUNNING"]]


def test_an_apply_is_a_reload_that_ends_whatever_its_outcome() -> None:
    """An apply sends RELOADING=1, and READY=1 ends it whether applied, rolled back or FATAL."""
    running = NotifyMemory(ready_sent=True)
    out, mem = run((S.RUNNING, S.APPLYING, None), (S.APPLYING, S.RUNNING, None), memory=running)
    assert out == [["RELOADING=1", "MONOTONIC_USEC=42", "STATUS=APPLYING"],
                   ["READY=1", "STATUS=RUNNING"]]
    assert mem == running
    # Rolled back: still reloading until the rollback is over.
    out, mem = run((S.RUNNING, S.APPLYING, None), (S.APPLYING, S.ROLLING_BACK, "bad model"),
                   (S.ROLLING_BACK, S.RUNNING, None), memory=running)
    assert out[1] == ["STATUS=ROLLING_BACK: bad model"] and out[2][0] == "READY=1"
    # The rollback failed too: the reload still ends, STATUS says FATAL and why.
    out, mem = run((S.RUNNING, S.APPLYING, None), (S.APPLYING, S.ROLLING_BACK, None),
                   (S.ROLLING_BACK, S.FATAL, "exit 1\nat load"), memory=running)
    assert out[2] == ["READY=1", "STATUS=FATAL: exit 1 at load"]
    assert not mem.reloading and mem.ready_sent


def test_a_start_up_that_ends_fatal_sends_no_ready_and_its_reason_stays_the_status() -> None:
    """FATAL before anything was ready: no READY=1, no reload; 'FATAL at start-up: why' is
    the status from then on, through the shutdown (systemctl status shows why it failed)."""
    out, mem = run((S.STOPPED, S.STARTING, None), (S.STARTING, S.BACKOFF, "exit 1"),
                   (S.BACKOFF, S.STARTING, None), (S.STARTING, S.FATAL, "exit 1\nat load"),
                   (S.FATAL, S.STOPPING, None), (S.STOPPING, S.STOPPED, None))
    assert out[3:] == [["STATUS=FATAL at start-up: exit 1 at load"],
                       ["STOPPING=1", "STATUS=FATAL at start-up: exit 1 at load"],
                       ["STATUS=FATAL at start-up: exit 1 at load"]]
    assert not any("READY=1" in m for m in sum(out, []))
    assert mem.failed_start_up == "FATAL at start-up: exit 1 at load" and not mem.ready_sent


def test_fatal_after_having_been_ready_is_no_failed_start_up() -> None:
    """A rollback that fails too, once the service was ready: FATAL, but the start-up had
    succeeded (the supervisor stays up for a fix through the API)."""
    out, mem = run((S.RUNNING, S.STARTING, "crashed"), (S.STARTING, S.FATAL, "exit 1"),
                   memory=NotifyMemory(ready_sent=True))
    assert out[-1] == ["STATUS=FATAL: exit 1"] and mem.failed_start_up is None


def test_the_notifier_asks_to_exit_once_after_a_failed_start_up(
        receiver: NotifyReceiver) -> None:
    """on_failed_start_up runs once, and exit_code turns 3, only for FATAL before ready and
    only under systemd."""
    calls: list[str] = []
    n = Notifier(receiver.address)
    n.on_failed_start_up = lambda: calls.append("exit")
    assert n.exit_code == 0
    n.on_state(S.STARTING, S.FATAL, "exit 1")
    n.on_state(S.FATAL, S.STOPPING)
    assert calls == ["exit"] and n.exit_code == EXIT_FATAL_AT_START == 3
    ready_first = Notifier(receiver.address)
    ready_first.on_failed_start_up = lambda: calls.append("wrong")
    ready_first.on_state(S.STARTING, S.RUNNING)
    ready_first.on_state(S.RUNNING, S.FATAL, "exit 1")
    no_systemd = Notifier(None)
    no_systemd.on_failed_start_up = lambda: calls.append("wrong")
    no_systemd.on_state(S.STARTING, S.FATAL, "exit 1")
    assert calls == ["exit"] and ready_first.exit_code == no_systemd.exit_code == 0
    receiver.wait_for(lambda t: len(t) == 4, 5, "four datagrams")


def test_stopping_is_said_once() -> None:
    """STOPPING=1 is sent once, on entering STOPPING, even in the middle of an apply."""
    out, _ = run((S.RUNNING, S.STOPPING, None), (S.STOPPING, S.STOPPED, None),
                 memory=NotifyMemory(ready_sent=True))
    assert out == [["STOPPING=1", "STATUS=STOPPING"], ["STATUS=STOPPED"]]
    # Shut down in the middle of an apply: STOPPING=1, no READY=1 to end the reload.
    out, _ = run((S.RUNNING, S.APPLYING, None), (S.APPLYING, S.STOPPING, None),
                 memory=NotifyMemory(ready_sent=True))
    assert out[1] == ["STOPPING=1", "STATUS=STOPPING"]


def test_on_state_sends_the_table_s_messages(receiver: NotifyReceiver) -> None:
    """on_state sends the transition table's fields for each state change, one datagram each."""
    n = Notifier(receiver.address)
    for old, new in [(S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.APPLYING),
                     (S.APPLYING, S.RUNNING), (S.RUNNING, S.STOPPING)]:
        assert n.on_state(old, new)
    texts = receiver.wait_for(lambda t: len(t) == 5, 5, "five datagrams")
    assert [sorted(parse(t)) for t in texts] == [
        ["STATUS"], ["READY", "STATUS"], ["MONOTONIC_USEC", "RELOADING", "STATUS"],
        ["READY", "STATUS"], ["STATUS", "STOPPING"]]


# ---- socket activation --------------------------------------------------------------------


def test_listen_fds_is_for_this_process_only() -> None:
    """LISTEN_FDS meant for another or a bad LISTEN_PID gives no sockets and is unset."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "front"}
    assert listen_fds(env=env) == [] and env == {}  # another process's: unset, untouched
    assert listen_fds(env={}) == []
    assert listen_fds(env={"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == []


CHILD = """
import json, os, socket, sys
from corral.front.activation import inherited_listener, listen_fds_with_names
want = sys.argv[1]
if want == "names":
    found = listen_fds_with_names()
    print(json.dumps([[s.fileno(), n, s.type == socket.SOCK_STREAM] for s, n in found]),
          flush=True)
    sys.exit(0)
sock = inherited_listener(want or None)
env = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
if sock is None:
    print(json.dumps({"sock": None, "env": env}), flush=True)
    sys.exit(0)
def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
open_fds = [fd for fd in range(3, 8) if is_open(fd)]
print(json.dumps({"sock": list(sock.getsockname()[:2]), "fd": sock.fileno(), "env": env,
                  "inheritable": sock.get_inheritable(), "proto": sock.proto,
                  "open": open_fds}), flush=True)
conn, _ = sock.accept()
conn.sendall(b"pong:" + conn.recv(100))
conn.close()
"""


def activated(pass_socks: list[socket.socket], arg: str, *, names: list[str] | None = None,
              listen_pid: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, **activation_env(*pass_socks, names=names, listen_pid=listen_pid),
           "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    return subprocess.Popen([*activation_prefix(), sys.executable, "-c", CHILD, arg],
                            env=env, stdout=subprocess.PIPE, text=True,
                            pass_fds=[s.fileno() for s in pass_socks])


def test_an_inherited_socket_serves_the_client_that_connected_before_the_process() -> None:
    """The client connects while nothing runs (it waits in the backlog); the activated
    process finds the socket at fd 3, makes it non-inheritable, unsets LISTEN_*, and
    answers the client."""
    with tcp_listener() as listener, socket.create_connection(listener.getsockname()) as client:
        bound = list(listener.getsockname())
        client.sendall(b"ping")
        child = activated([listener], address(listener))
        try:
            info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
            client.settimeout(10)
            assert client.recv(100) == b"pong:ping"
        finally:
            child.communicate(timeout=10)
    assert info["sock"] == bound and info["fd"] == 3
    assert info["env"] == [] and info["inheritable"] is False and info["open"] == [3]
    assert info["proto"] == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then


def test_the_socket_matching_listen_is_picked_and_the_others_closed() -> None:
    """The inherited socket matching --listen is used; the other inherited fds are closed."""
    with tcp_listener() as a, tcp_listener() as b, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        bound = list(b.getsockname())
        child = activated([udp, a, b], address(b), names=["dns", "api", "front"])
        try:
            info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
            with socket.create_connection(b.getsockname(), timeout=10) as client:
                client.sendall(b"b")
                assert client.recv(100) == b"pong:b"
        finally:
            child.communicate(timeout=10)
    assert info["sock"] == bound and info["fd"] == 5
    assert info["open"] == [5]  # the other two: closed


def test_names_and_the_first_listener_when_none_matches() -> None:
    """Inherited fds carry their LISTEN_FDNAMES; with no match the one TCP listener is used."""
    with tcp_listener() as a, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
        child = activated([u, a], "names", names=["ctl", "front"])
        out, _ = child.communicate(timeout=10)
        assert json.loads(out) == [[3, "ctl", True], [4, "front", True]]
        # --listen on another port: the one TCP listener is used, with a warning.
        child = activated([u, a], "127.0.0.1:1")
        try:
            info = json.loads(child.stdout.readline())  # type: ignore[union-attr]
            with socket.create_connection(a.getsockname(), timeout=10) as client:
                client.sendall(b"a")
                assert client.recv(100) == b"pong:a"
        finally:
            child.communicate(timeout=10)
        assert info["fd"] == 4


def test_sockets_meant_for_another_pid_are_not_taken() -> None:
    """Sockets whose LISTEN_PID names another process are not taken, and LISTEN_* is unset."""
    with tcp_listener() as a:
        child = activated([a], address(a), listen_pid="1")
        out, _ = child.communicate(timeout=10)
    assert json.loads(out) == {"sock": None, "env": []}


def test_inherited_listener_matching_rules(caplog: pytest.LogCaptureFixture) -> None:
    """A listener matches by port and address, wildcards and localhost included; else None."""
    with tcp_listener() as a, tcp_listener() as b, tcp_listener("0.0.0.0") as any4:
        port_b = b.getsockname()[1]
        assert inherited_listener(f"127.0.0.1:{port_b}", [a, b]) is b
        assert a.fileno() == -1  # closed: not the front door's
        assert not b.get_inheritable()
        port_any = any4.getsockname()[1]
        assert inherited_listener(f"localhost:{port_any}", [any4]) is any4
        assert inherited_listener(f"[::]:{port_any}", [any4]) is any4
    assert inherited_listener("127.0.0.1:8080", []) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unbound, \
            caplog.at_level(logging.WARNING, "corral.systemd"):
        assert inherited_listener("127.0.0.1:8080", [unbound]) is None
    assert "none of the 1 socket(s)" in caplog.text


# ---- the units ----------------------------------------------------------------------------

CONTRIB = ROOT / "contrib"


def unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = (CONTRIB / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_service_unit_says_what_the_supervisor_does() -> None:
    """corral.service and .socket match the supervisor: notify, reload, timeouts, hardening."""
    svc, sock = unit("corral.service"), unit("corral.socket")
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["KillMode"] == ["mixed"] and svc["Restart"] == ["on-failure"]
    assert svc["StartLimitBurst"] == ["5"]  # a start-up ending FATAL (exit 3) is retried 5x
    assert svc["WatchdogSec"] == ["30"]
    assert int(svc["LimitNOFILE"][0]) >= 65536  # not systemd's soft 1024: see --max-connections
    exec_start = svc["ExecStart"][0]
    drain = float(re.search(r"--drain-timeout (\S+)", exec_start).group(1))  # type: ignore[union-attr]
    stop = float(re.search(r"--stop-timeout (\S+)", exec_start).group(1))  # type: ignore[union-attr]
    assert float(svc["TimeoutStopSec"][0]) > drain + stop
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "LockPersonality", "MemoryDenyWriteExecute"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"] and svc["ProtectHome"] == ["read-only"]
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert svc["SystemCallArchitectures"] == ["native"]
    assert svc["StateDirectory"] == ["corral"] and svc["ConfigurationDirectory"] == ["corral"]
    state_dir = re.search(r"--state-dir (\S+)", exec_start).group(1)  # type: ignore[union-attr]
    assert state_dir in svc["ReadWritePaths"][0].split()
    port = sock["ListenStream"][0]
    assert f"--listen 0.0.0.0:{port}" in exec_start
    assert sock["Service"] == ["corral.service"] and "Backlog" in sock


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here: the units are not verified")
def test_systemd_analyze_verify_accepts_the_units_without_a_warning(tmp_path: Path) -> None:
    """verify checks the executables exist: the copy points at this checkout's corral."""
    corral = Path(sys.executable).parent / "corral"
    assert corral.exists(), corral
    service = (CONTRIB / "corral.service").read_text()
    (tmp_path / "corral.service").write_text(
        service.replace("/usr/local/bin/corral", str(corral))
        .replace("/usr/local/bin/llama-server", "/bin/true"))
    shutil.copy(CONTRIB / "corral.socket", tmp_path / "corral.socket")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(tmp_path / "corral.socket"), str(tmp_path / "corral.service")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Unknown keys and unparsable values are only warnings to verify (exit 0): none allowed.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                               str(tmp_path / "corral.service")],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    score = re.search(r"Overall exposure level for corral.service: ([\d.]+)", security.stdout)
    if security.returncode == 0 and score:  # --offline appeared in systemd 250
        assert float(score.group(1)) <= 2.5, security.stdout[-2000:]
