"""Executing the very file that was checked, not whatever sits at its path a moment later.

Theory of operation
-------------------
- The binary rule (:mod:`corral.core.privilege`) judges a *path*. Between that judgement
  and the exec, a directory on the way could be swapped for a symlink, or another file
  renamed over the binary; exec'ing the path again would run that other file.
- So the binary is opened first (``O_PATH``: no read permission needed, nothing runs),
  the path the kernel says the *open file* has (``/proc/self/fd/N``) is what gets judged,
  and the child executes that open file: the descriptor is inherited (its close-on-exec
  flag cleared for the child alone) and exec'd through ``/proc/self/fd/N``, a magic link
  to the inode itself, so no later rename or re-pointed link can change what runs.
- Exec'ing ``/proc/self/fd/N`` directly would make ``ps`` and ``top`` show the program as
  ``N`` (the kernel names a process after the last component of the path it was exec'd
  by, and ``argv[0]`` is that path too). So the exec goes through a symlink named like the
  binary, ``<private dir>/N/llama-server -> /proc/self/fd/N``: the process is still called
  ``llama-server``, and the symlink resolves in the child, to the child's own descriptor.
  The directory is this user's (``<tmp>/corral-exec-<uid>``, mode 0711: a ``--user`` child
  may pass through, no one else may write; one owned by anyone else is refused), and its
  links depend only on N and the name, so they are made once and shared by every start of
  every supervisor that user runs.
- A script (the fake llama-server in the tests) works too: the descriptor stays open in
  the interpreter, which opens the script through the same link.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

# Descriptors below this are left alone: 0-2 are the child's stdio, set up by spawn.
_LOWEST_FD = 10


@dataclass(frozen=True)
class CheckedProgram:
    """An open descriptor (``O_PATH``) of the program that was judged, and its real path."""

    fd: int
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_checked(real_path: str, check: Callable[[str], None]) -> CheckedProgram:
    """Open ``real_path``, then pass the open file's own path to ``check`` (which raises to
    refuse). Raises OSError if it cannot be opened or is not a regular file."""
    fd = os.open(real_path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if fd < _LOWEST_FD:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _LOWEST_FD)
            os.close(fd)
            fd = moved
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{real_path} is not a regular file")
        opened = os.readlink(f"/proc/self/fd/{fd}")
        check(opened)
    except BaseException:
        os.close(fd)
        raise
    return CheckedProgram(fd, opened)


def exec_path(program: CheckedProgram) -> str:
    """The path a child execs to run ``program``'s open descriptor under its own name."""
    folder = os.path.join(_private_dir(), str(program.fd))
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o711)
        os.chmod(folder, 0o711)  # mkdir's mode is masked by the umask
    link = os.path.join(folder, program.name)
    target = f"/proc/self/fd/{program.fd}"
    try:
        os.symlink(target, link)
    except FileExistsError:
        if os.readlink(link) != target:  # only this user could have put it there
            raise OSError(f"{link} does not point to {target}; remove it") from None
    return link


def _private_dir() -> str:
    """``<tmp>/corral-exec-<uid>``: one per user, shared by every supervisor of that user
    (the links are the same for all), so nothing is left behind per run. Used only if this
    user owns it and no one else may write to it; else it is made anew."""
    path = os.path.join(tempfile.gettempdir(), f"corral-exec-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o711)
        os.chmod(path, 0o711)
    st = os.lstat(path)
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise OSError(f"{path} is not a directory of this user's alone: remove it")
    return path
