"""Playing systemd's part in tests: a NOTIFY_SOCKET that records datagrams, and socket
activation (an inherited listening socket at fd 3 with LISTEN_PID/LISTEN_FDS set)."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.waiting import wait_for

# Runs as ``python -c ACTIVATE PROGRAM ARGS...``: moves the fds listed in
# $CORRAL_TEST_PASS_FDS to 3, 4, ..., sets LISTEN_FDS and LISTEN_PID (this very process,
# which exec keeps) as systemd does, and execs PROGRAM.
ACTIVATE = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("CORRAL_TEST_PASS_FDS").split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = os.environ.pop("CORRAL_TEST_LISTEN_PID", str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def activation_prefix() -> list[str]:
    """The command prefix that hands the ``pass_fds`` sockets over as systemd would."""
    return [sys.executable, "-c", ACTIVATE]


def activation_env(*socks: socket.socket, names: list[str] | None = None,
                   listen_pid: str | None = None) -> dict[str, str]:
    env = {"CORRAL_TEST_PASS_FDS": ",".join(str(s.fileno()) for s in socks)}
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    if listen_pid is not None:
        env["CORRAL_TEST_LISTEN_PID"] = listen_pid
    return env


def tcp_listener(host: str = "127.0.0.1", backlog: int = 16) -> socket.socket:
    """What corral.socket's ListenStream= gives: a bound, listening TCP socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse(datagram: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.splitlines() if "=" in line)


class NotifyReceiver:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket.

    ``abstract`` binds an abstract name (``@...`` in $NOTIFY_SOCKET), otherwise a path in a
    short temporary directory (sun_path holds 108 bytes; pytest's tmp_path can be longer).
    Like PID 1 it reads all the time (a thread), unless ``reading=False``: a unix datagram
    queue holds only ``net.unix.max_dgram_qlen`` (10) messages.
    """

    def __init__(self, abstract: bool = False, reading: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"corral-test-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="cn-", dir="/tmp")
            self.address = str(Path(self._dir) / "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.datagrams: list[tuple[float, str]] = []  # (monotonic time received, text)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None
        if reading:
            self.start_reading()

    def start_reading(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True, name="notify")
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            select.select([self.sock], [], [], 0.05)
            with contextlib.suppress(OSError):
                self.drain()

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.join(5)
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def drain(self) -> list[str]:
        """Read every datagram already queued, without waiting; all received so far."""
        with self._lock:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                self.datagrams.append((time.monotonic(), data.decode()))
        return self.texts

    @property
    def texts(self) -> list[str]:
        return [text for _, text in list(self.datagrams)]

    def wait_for(self, condition: Callable[[list[str]], bool], timeout: float,
                 what: str) -> list[str]:
        """Wait until ``condition(all datagrams so far)`` holds; fail after ``timeout``."""
        wait_for(lambda: condition(self.drain()), timeout, what,
                 explain=lambda: f"received: {self.texts}")
        return self.texts

    def wait_message(self, key: str, value: str | None = None, timeout: float = 30,
                     after: int = 0) -> int:
        """Index of the first datagram from ``after`` on that assigns ``key`` (=``value``)."""
        def found(texts: list[str]) -> bool:
            return self._find(texts, key, value, after) is not None
        self.wait_for(found, timeout, f"{key}={value or '*'}")
        index = self._find(self.texts, key, value, after)
        assert index is not None
        return index

    @staticmethod
    def _find(texts: list[str], key: str, value: str | None, after: int) -> int | None:
        for i in range(after, len(texts)):
            fields = parse(texts[i])
            if key in fields and (value is None or fields[key] == value):
                return i
        return None


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def other_pid() -> str:
    """A pid that is certainly not the child's: ours."""
    return str(os.getpid())
