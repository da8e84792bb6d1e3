"""The real :class:`~corral.seams.Launcher`: llama-server processes, probed over HTTP."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from corral.child.process import Child, spawn
from corral.child.ready import probe_health, wait_ready
from corral.core.args import LlamaConfig, host_of, port_of
from corral.errors import StartFailed
from corral.seams import Server


def health_url(config: LlamaConfig) -> str:
    host = host_of(config)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port_of(config)}/health"


class ProcessLauncher:
    def __init__(self, echo_output: bool = True) -> None:
        self._echo = echo_output
        self._http = httpx.AsyncClient()

    async def spawn(self, config: LlamaConfig, generation: int) -> Child:
        try:
            return await spawn(config, generation, self._echo)
        except OSError as exc:
            raise StartFailed(f"cannot execute {config.binary}: {exc.strerror or exc}") from None

    async def wait_ready(self, server: Server, timeout_s: float, min_healthy_s: float,
                         on_healthy: Callable[[], None] | None = None) -> float:
        return await wait_ready(server, health_url(server.config), self._http, timeout_s,
                                min_healthy_s, on_healthy)

    async def probe(self, server: Server) -> bool:
        return await probe_health(self._http, health_url(server.config))

    async def aclose(self) -> None:
        await self._http.aclose()
