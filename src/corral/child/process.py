"""Spawning and stopping one llama-server process group.

Theory of operation
-------------------
- Respawn latency is what we sell, so the child is started with ``os.posix_spawn`` (glibc
  uses vfork: no copy of the supervisor's memory, ~0.3 ms) in a session of its own
  (``setsid``), so its whole group can be signalled and a Ctrl-C in the supervisor's
  terminal reaches only the supervisor.
- It must die with the supervisor, even when the supervisor is SIGKILLed:
  ``PR_SET_PDEATHSIG`` = SIGKILL, set by exec'ing through util-linux's
  ``setpriv --pdeathsig KILL`` (or, where setpriv is missing, a tiny Python shim doing
  the prctl). The death signal fires when the *thread* that spawned exits, so spawn from
  the event-loop thread. The moment between spawn and the prctl is covered by the pid file
  (a restarted supervisor kills what its predecessor left behind).
- Its exit is noticed through a pidfd registered with the event loop: readable the moment
  the process ends, then reaped with ``waitpid``. No polling, no watcher thread, and a
  grandchild holding the output pipe open cannot hide the exit.
- With ``--user`` (the supervisor running as root) the same ``setpriv`` also switches to
  that user's uid, gid and groups before exec; the death signal is set after the switch
  (the kernel clears it when credentials change).
- The environment is the supervisor's plus the config's own ``env`` (already judged by
  :mod:`corral.core.privilege`).
- Output (stdout and stderr on one pipe) is drained by :func:`corral.child.output.drain`.
- Stop is one routine: SIGTERM to the group, wait, SIGKILL to the group, always reap, and
  finally SIGKILL whatever is left of the group (grandchildren).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from corral.child.exec_file import CheckedProgram, exec_path
from corral.child.output import OutputRing, drain
from corral.core.args import LlamaConfig

log = logging.getLogger("corral.child")

# Where setpriv is missing: set the death signal, then exec the real program.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass
class Child:
    config: LlamaConfig
    pid: int
    started_at: float
    output: OutputRing
    generation: int
    _exit: asyncio.Future[int]
    _reader: asyncio.Task[None]

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code (negative: killed by that signal) once reaped."""
        return self._exit

    async def stop(self, timeout: float) -> int:
        """SIGTERM the group, SIGKILL it after ``timeout``; reap. Safe to call twice."""
        if not self._exit.done():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), timeout)
            except TimeoutError:
                log.warning("llama-server (pid %d) ignored SIGTERM for %.1f s: SIGKILL",
                            self.pid, timeout)
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL the group at once and reap."""
        _signal_group(self.pid, signal.SIGKILL)
        code = await asyncio.shield(self._exit)
        _signal_group(self.pid, signal.SIGKILL)  # grandchildren that outlived the leader
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        except TimeoutError:
            self._reader.cancel()  # something outside the group still holds the pipe
        return code


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@functools.cache
def _setpriv() -> str | None:
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out.stdout else None


@dataclass(frozen=True)
class Identity:
    """Whom llama-server runs as (``--user``)."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def _with_death_signal(argv: list[str], user: Identity | None = None) -> list[str]:
    """``argv`` behind an exec wrapper that makes it die with this process (and, with
    ``user``, run as that user)."""
    setpriv = _setpriv()
    if user is not None:
        if setpriv is None:
            raise OSError("--user needs util-linux's setpriv (with --pdeathsig)")
        groups = ",".join(map(str, user.groups)) or str(user.gid)
        return [setpriv, f"--reuid={user.uid}", f"--regid={user.gid}", f"--groups={groups}",
                "--pdeathsig", "KILL", "--", *argv]
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]


def as_user(argv: list[str], user: Identity) -> list[str]:
    """``argv`` run as ``user`` (and dying with this process): for the binary's ``--help``
    and ``llama-fit-params`` under ``--user``, as llama-server itself runs."""
    return _with_death_signal(argv, user)


def death_signal_prefix() -> list[str]:
    """The exec wrapper that makes a program die (SIGKILL) with the thread that starts it,
    as llama-server dies with the supervisor: run ``[*death_signal_prefix(), *argv]``. For
    the tests' and benchmarks' own children (a killed bench leaves no orphans)."""
    return _with_death_signal([])


def _posix_spawn(argv: list[str], output_fd: int, env: dict[str, str],
                 inherit: int | None = None) -> int:
    """``inherit``: a close-on-exec descriptor the child keeps (a dup2 onto itself clears
    the flag in the child alone, glibc >= 2.29)."""
    executable = argv[0]
    actions: list[tuple[int | str, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, output_fd, 1),
        (os.POSIX_SPAWN_DUP2, output_fd, 2),
    ]
    if inherit is not None:
        actions.append((os.POSIX_SPAWN_DUP2, inherit, inherit))
    return os.posix_spawn(executable, argv, env, setsid=True, file_actions=actions)


def _watch_exit(pid: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
    """A future resolved with the exit code the moment ``pid`` ends (pidfd + waitpid)."""
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def on_readable() -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the code is lost
            reaped, status = pid, 255 << 8
        if reaped == 0:
            return  # not yet (spurious wake-up)
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(os.waitstatus_to_exitcode(status))

    loop.add_reader(pidfd, on_readable)
    return exited


async def _read_pipe(fd: int, loop: asyncio.AbstractEventLoop) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


async def spawn(config: LlamaConfig, generation: int, echo_output: bool = True,
                user: Identity | None = None, program: CheckedProgram | None = None) -> Child:
    """Start ``config`` as a new session; its output goes to a ring buffer and the log.
    ``program``: the open file to execute instead of the config's binary (the one that was
    checked: :mod:`corral.child.exec_file`); the caller closes it after the spawn.

    Raises OSError if the program cannot be executed.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        env = {**os.environ, **dict(config.env)}
        argv = config.argv()
        if program is not None:
            argv[0] = exec_path(program)
        pid = _posix_spawn(_with_death_signal(argv, user), write_fd, env,
                           program.fd if program is not None else None)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    started = time.monotonic()
    exited = _watch_exit(pid, loop)
    ring = OutputRing()
    stream = await _read_pipe(read_fd, loop)
    reader = asyncio.create_task(drain(stream, ring, f"[llama-server {pid}]", echo_output))
    return Child(config, pid, started, ring, generation, exited, reader)
