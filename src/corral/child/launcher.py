"""The real :class:`~corral.supervisor.seams.Launcher`: llama-server processes, probed over HTTP.

A start counts as ready once ``/health`` answers 200 and it stayed up; then ``/props`` is
compared with what was asked *explicitly*: llama.cpp's ``--fit`` (on by default) shrinks
arguments that were not given to fit free memory, so only a given ``-c`` is held against
the context it came up with (per-slot ``n_ctx``; llama.cpp rounds the share of each slot,
which is not held against it: :func:`corral.core.fit.smaller_than_asked`). Smaller is a
failed start (rolled back) unless ``--allow-degraded``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import httpx

from corral.child.exec_file import CheckedProgram, open_checked
from corral.child.privilege import realpath
from corral.child.process import Child, Identity, spawn
from corral.child.ready import probe_health, wait_ready
from corral.core.args import LlamaConfig, host_of, port_of
from corral.core.fit import fewer_layers_than_asked, memory_value, smaller_than_asked
from corral.errors import NotAllowed, StartFailed
from corral.observe.events import LineBus
from corral.supervisor.seams import Server

log = logging.getLogger("corral")


def health_url(config: LlamaConfig, path: str = "/health") -> str:
    host = host_of(config)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port_of(config)}{path}"


def asked_context(config: LlamaConfig) -> int | None:
    value = memory_value(config, "--ctx-size")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def props_context(props: dict[str, Any]) -> tuple[int | None, int | None]:
    """(per-slot n_ctx, slots) from llama-server's ``/props``."""
    settings = props.get("default_generation_settings")
    per_slot = settings.get("n_ctx") if isinstance(settings, dict) else None
    slots = props.get("total_slots")
    return (per_slot if isinstance(per_slot, int) else None,
            slots if isinstance(slots, int) else None)


class ProcessLauncher:
    def __init__(self, echo_output: bool = True, allow_degraded: bool = False,
                 user: Identity | None = None, lines: LineBus | None = None,
                 check_binary: Callable[[str], None] | None = None) -> None:
        """``check_binary``: the least-privilege rule for binaries (raises NotAllowed); the
        binary is opened, the open file's path is checked, and that open file is what is
        executed, so nothing renamed or re-pointed after the check can change what runs."""
        self._check_binary = check_binary
        self._echo = echo_output
        self._user = user
        self._lines = lines  # each output line also goes here, for GET /v1/logs
        self.allow_degraded = allow_degraded
        self._http = httpx.AsyncClient()

    async def spawn(self, config: LlamaConfig, generation: int) -> Child:
        program: CheckedProgram | None = None
        try:
            if self._check_binary is not None:
                program = open_checked(realpath(config.binary), self._check_binary)
            child = await spawn(config, generation, self._echo, self._user, program)
        except NotAllowed as exc:
            raise StartFailed(str(exc)) from None
        except OSError as exc:
            raise StartFailed(f"cannot execute {config.binary}: {exc.strerror or exc}") from None
        finally:
            if program is not None:
                program.close()
        if self._lines is not None:
            # No await since spawn created the drain task: it has not read a line yet.
            child.output.sink = functools.partial(self._lines.add, "llama-server")
        return child

    async def wait_ready(self, server: Server, timeout_s: float, min_healthy_s: float,
                         on_healthy: Callable[[], None] | None = None) -> float:
        took = await wait_ready(server, health_url(server.config), self._http, timeout_s,
                                min_healthy_s, on_healthy)
        await self.check_not_degraded(server)
        return took

    async def check_not_degraded(self, server: Server) -> None:
        """StartFailed if it came up with less context than ``-c`` asked, or fewer GPU
        layers than ``-ngl`` asked."""
        ngl = memory_value(server.config, "--gpu-layers")
        why = fewer_layers_than_asked(ngl, server.output.tail(400))
        why = why or await self._smaller_context(server)
        if why is None:
            return
        if self.allow_degraded:
            log.warning("llama-server (pid %d) %s; kept (--allow-degraded)", server.pid, why)
            return
        raise StartFailed(why, server.output.tail())

    async def _smaller_context(self, server: Server) -> str | None:
        asked = asked_context(server.config)
        if asked is None:
            return None
        try:
            reply = await self._http.get(health_url(server.config, "/props"), timeout=5.0)
            per_slot, slots = props_context(reply.json())
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("cannot read /props of pid %d (%s): context not compared",
                        server.pid, exc)
            return None
        return smaller_than_asked(asked, per_slot, slots)

    async def probe(self, server: Server) -> bool:
        return await probe_health(self._http, health_url(server.config))

    async def aclose(self) -> None:
        await self._http.aclose()
