"""Never two servers: an instance lock per config, and a pid file for the child.

The instance lock (``<key>.lock``, fcntl, close-on-exec so llama-server never inherits it)
is held for the supervisor's whole life: a second supervisor of the same config fails at
once with the holder's pid. The pid file records every child's pid, process group and start
time; a supervisor that was SIGKILLed leaves it behind, and its successor kills that group
before starting (PR_SET_PDEATHSIG normally got there first; this covers the rest, such as
grandchildren). The start time guards against a recycled pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from corral.errors import AlreadyRunning

log = logging.getLogger("corral.child")


class InstanceLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another corral supervisor (pid {holder}) already runs this config "
                f"(lock {self.path}); stop it first or use another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PidFile:
    """Every llama-server group this supervisor owns (two during a start-first swap)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._write([*self._read(), {"pid": pid, "pgid": pid, "create_time": created}])

    def remove(self, pid: int) -> None:
        groups = [g for g in self._read() if g["pid"] != pid]
        if groups:
            self._write(groups)
        else:
            self.clear()

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        groups = data.get("groups", [data]) if isinstance(data, dict) else []
        return [g for g in groups if isinstance(g, dict)]

    def _write(self, groups: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"groups": groups}))
        os.replace(tmp, self.path)

    def kill_stale(self) -> list[int]:
        """Kill the groups a dead predecessor left running; return their pgids."""
        killed = []
        for group in self._read():
            try:
                pgid, pid = int(group["pgid"]), int(group["pid"])
                created = float(group["create_time"])
            except (KeyError, TypeError, ValueError):
                continue
            members = _group_members(pgid, pid, created)
            if members:
                log.warning("killing llama-server group %d left running by a previous "
                            "supervisor (pids %s)", pgid, sorted(p.pid for p in members))
                for proc in members:
                    with contextlib.suppress(psutil.Error):
                        proc.send_signal(signal.SIGKILL)
                psutil.wait_procs(members, timeout=5)
                killed.append(pgid)
        self.clear()
        return killed


def _group_members(pgid: int, leader: int, leader_created: float) -> list[psutil.Process]:
    """Processes of that group started no earlier than the recorded leader (not recycled)."""
    members = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead already (PDEATHSIG did its job), just not reaped by init yet
        try:
            if os.getpgid(proc.pid) != pgid or proc.pid == os.getpid():
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if proc.info["create_time"] + 0.01 >= leader_created:
            members.append(proc)
    return members
