"""Spawning and stopping one llama-server process group.

- The child gets its own session (so its whole group can be signalled, and a Ctrl-C in
  the supervisor's terminal reaches only the supervisor) and ``PR_SET_PDEATHSIG`` =
  SIGKILL, so it dies with the supervisor even when the supervisor is SIGKILLed. The death
  signal fires when the *thread* that forked exits, so spawn from the event-loop thread.
- The death signal is set by exec'ing through util-linux's ``setpriv --pdeathsig KILL``
  where it exists: a ``preexec_fn`` would force CPython to fork the whole supervisor
  (~10 ms) instead of using vfork (~2 ms), and respawn latency is what we sell. Without
  setpriv, a ``preexec_fn`` does the same job more slowly. The window between fork and the
  prctl is covered by the pid file (a restarted supervisor kills what it left behind).
- Exit is noticed by awaiting the child (asyncio's child watcher), never by polling.
- Stop is one routine: SIGTERM to the group, wait, SIGKILL to the group, always reap, and
  finally SIGKILL whatever is left of the group (grandchildren).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from asyncio.subprocess import (  # not in asyncio's __all__, but stable since 3.4
    SubprocessStreamProtocol,
)
from dataclasses import dataclass
from typing import Any

from corral.child.output import OutputRing, drain
from corral.core.args import LlamaConfig

log = logging.getLogger("corral.child")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class Child:
    config: LlamaConfig
    proc: asyncio.subprocess.Process
    started_at: float
    output: OutputRing
    generation: int
    _exit: asyncio.Future[int]
    _reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code the moment the process is reaped."""
        return self._exit

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

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
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
            except TimeoutError:
                self._reader.cancel()  # a grandchild still holds the pipe open
        return code


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _ExitProtocol(SubprocessStreamProtocol):
    """Reports the exit as soon as the process is reaped.

    ``Process.wait()`` also waits until every pipe is closed, so a grandchild holding
    llama-server's stdout would hide its crash; ``process_exited`` is called on reaping.
    """

    def __init__(self, exited: asyncio.Future[int], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=1 << 16, loop=loop)
        self._exited = exited

    def process_exited(self) -> None:
        # Read the code first: the base class may close and drop the transport.
        code = self._transport.get_returncode()  # type: ignore[attr-defined]
        super().process_exited()
        if not self._exited.done():
            self._exited.set_result(code)


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


def _launch(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen options that make the child die with us."""
    setpriv = _setpriv()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], {}
    parent = os.getpid()
    return argv, {"preexec_fn": lambda: _die_with_parent(parent)}


async def spawn(config: LlamaConfig, generation: int, echo_output: bool = True) -> Child:
    """Start ``config`` as a new session; its output goes to a ring buffer and the log."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    argv, options = _launch(config.argv())
    transport, protocol = await loop.subprocess_exec(
        lambda: _ExitProtocol(exited, loop),
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        **options,
    )
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    ring = OutputRing()
    child = Child(config, proc, time.monotonic(), ring, generation, exited)
    assert proc.stdout is not None
    child._reader = asyncio.create_task(
        drain(proc.stdout, ring, f"[llama-server {proc.pid}]", echo_output)
    )
    return child
