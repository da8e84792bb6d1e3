"""The front door as the controller steers it (:class:`corral.supervisor.seams.Front`): servers in,
upstreams out."""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any

from corral.core.args import LlamaConfig, host_of, port_of
from corral.front.model import Upstream
from corral.front.proxy import FrontDoor
from corral.supervisor.seams import Server

LOOPBACK = "127.0.0.1"
log = logging.getLogger("corral")


def upstream_of(server: Server) -> Upstream:
    return Upstream(host_of(server.config), port_of(server.config), server.generation)


class SteeredFront:
    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def route_to(self, server: Server) -> None:
        self.door.route_to(upstream_of(server))

    def hold(self) -> None:
        self.door.hold()

    def refuse(self, reason: str) -> None:
        self.door.refuse(reason)

    async def drain(self, server: Server, timeout_s: float) -> int:
        """Let in-flight requests finish; cut what is left at the timeout (llama-server would
        otherwise ignore the SIGTERM that follows, until the stop timeout's SIGKILL)."""
        upstream = upstream_of(server)
        if busy := self.door.in_flight(upstream):
            log.info("draining %d request(s) from llama-server (pid %d) before it stops "
                     "(up to %.0f s)", busy, server.pid, timeout_s)
        left = await self.door.drain(upstream, timeout_s)
        if left:
            self.door.cut(upstream)
        return left

    async def close(self, drain_timeout_s: float) -> None:
        await self.door.close(drain_timeout_s)

    def view(self) -> dict[str, Any]:
        stats = self.door.stats()
        return {**dataclasses.asdict(stats), "failed_total": stats.failed_total}


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def place_on_loopback(config: LlamaConfig) -> LlamaConfig:
    """``config`` listening on a free loopback port of its own (a new one every start)."""
    args = {k: v for k, v in config.args if k not in ("--port", "--host")}
    args.update({"--host": LOOPBACK, "--port": str(free_loopback_port())})
    return dataclasses.replace(config, args=tuple(args.items()))
