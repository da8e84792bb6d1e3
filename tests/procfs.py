"""Reading /proc directly: a process's state letter, parent and executable.

The one parser of ``/proc/<pid>/stat`` for the tests, their fixtures and the benchmarks
(which import it as ``tests.procfs``). It is plain file reading, cheap enough for the
benchmarks' tight scan loops, and every function answers "gone" rather than raising when
the process disappears under it. The second field of ``stat`` (the command name, in
parentheses) may itself contain spaces and parentheses: the fields after it start behind
the *last* ``)``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["exe", "is_alive", "parent_pid", "stat_fields", "state", "threads"]


def stat_fields(pid: int | str, tid: int | str | None = None) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` (or of thread ``tid``) after the command name:
    ``[state, ppid, pgrp, ...]``; None if the process (or thread) is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def state(pid: int | str, tid: int | str | None = None) -> str:
    """The state letter (R, S, D, T, Z, X, ...), or "" if the process is gone."""
    fields = stat_fields(pid, tid)
    return fields[0].decode() if fields else ""


def is_alive(pid: int | str) -> bool:
    """True while ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    return state(pid) not in ("", "Z", "X")


def parent_pid(pid: int | str) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def exe(pid: int | str) -> str | None:
    """The path of the program ``pid`` runs, or None (gone, or not ours to read)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def threads(pid: int | str) -> list[str]:
    """The thread ids of ``pid`` ([] if it is gone)."""
    try:
        return os.listdir(Path("/proc") / str(pid) / "task")
    except OSError:
        return []
