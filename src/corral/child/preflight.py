"""Checks a config can work before anything running is touched.

Everything checked here is rejected with no downtime at all: a missing or non-executable
binary, a missing/unreadable/non-GGUF model file, a busy port, flags the binary does not
know, a config whose memory estimate does not fit in what would be available (see
:mod:`corral.core.fit`). What cannot be checked (a bad value, a corrupt model body) is left
to the start and its rollback; so is a config nothing can estimate.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.child.privilege import RunAs
from corral.core.args import FlagCatalog, LlamaConfig, host_of, parse_help, port_of
from corral.core.fit import (
    DEFAULT_MARGIN,
    MIB,
    FitVerdict,
    GpuRoom,
    Room,
    gpu_layers_wanted,
    memory_value,
    verdict,
)
from corral.core.privilege import Judge, files_of
from corral.errors import PreflightFailed
from corral.sense.estimate import Estimator, Wrap
from corral.sense.gpu import gpu_rooms
from corral.sense.memory import MemorySource

log = logging.getLogger("corral.preflight")

GGUF_MAGIC = b"GGUF"


def resolve_binary(binary: str) -> str:
    """A path, or a name on PATH, to an absolute executable path."""
    path = binary if os.sep in binary else shutil.which(binary)
    if path is None:
        raise PreflightFailed(f"binary {binary!r} not found on PATH")
    if not os.path.isfile(path):
        raise PreflightFailed(f"binary {path!r} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise PreflightFailed(f"binary {path!r} is not executable (chmod +x?)")
    return os.path.abspath(path)


def check_model(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise PreflightFailed(f"model file {path!r} does not exist") from None
    except IsADirectoryError:
        raise PreflightFailed(f"model path {path!r} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise PreflightFailed(f"model file {path!r} cannot be read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise PreflightFailed(f"model file {path!r} is not a GGUF file (bad magic {magic!r})")


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise PreflightFailed(f"port {port} is out of range")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise PreflightFailed(f"port {port} on {host} is not available: {reason}") from None


def check_static(config: LlamaConfig, catalog: FlagCatalog) -> None:
    """What does not depend on other processes: binary, flags, model file."""
    resolve_binary(config.binary)  # it may have gone since the change was parsed
    if len(catalog):
        unknown = [k for k, _ in config.args if catalog.lookup(k) is None]
        if unknown:
            raise PreflightFailed(f"unknown llama-server flag(s) for {config.binary}: "
                                  + ", ".join(unknown))
    model = config.get("--model")
    if isinstance(model, str):
        check_model(model)
    port = config.get("--port")
    if isinstance(port, str) and not port.isdigit():
        raise PreflightFailed(f"--port must be a number, got {port!r}")


def check_config_port(config: LlamaConfig) -> None:
    check_port_free(host_of(config), port_of(config))


def same_address(a: LlamaConfig, b: LlamaConfig) -> bool:
    return (port_of(a), host_of(a)) == (port_of(b), host_of(b))


class Preflight:
    """The real :class:`~corral.supervisor.seams.Checks`.

    Stages, and why a check is repeated:
    1. the API checks ``last good ⊕ change`` when it arrives, so a change that cannot work
       is refused at once and never joins a batch;
    2. the controller checks the merged batch (merging can combine changes that were each
       fine; files may have changed since);
    3. right before a spawn, only the port: it is free only once the old server stopped.

    Every stage starts with the least-privilege rules (:meth:`admit`), the binary's first:
    a binary that is not allowed is never run, not even for ``--help``.
    """

    def __init__(self, catalogs: CatalogCache | None = None, picks_ports: bool = False, *,
                 fit_margin: float = DEFAULT_MARGIN, estimator: Estimator | None = None,
                 memory: MemorySource | None = None,
                 gpus: Callable[[], tuple[GpuRoom, ...]] = gpu_rooms,
                 judge: Judge | None = None, run_as: RunAs | None = None) -> None:
        self.catalogs = catalogs or CatalogCache()
        self.judge = judge  # None: no least-privilege rules (tests of other things)
        self.run_as = run_as
        # With --listen, Corral gives every llama-server a free loopback port of its own.
        self.picks_ports = picks_ports
        self.fit_margin = fit_margin
        self.estimator = estimator or Estimator(wrap=run_as.command if run_as else None)
        self.memory = memory or MemorySource()
        self._gpus = gpus
        self._gpu_cache: tuple[float, tuple[GpuRoom, ...]] | None = None

    async def catalog(self, binary: str) -> FlagCatalog:
        return await self.catalogs.get(binary)

    def admit_binary(self, binary: str) -> None:
        """The binary rule alone: before anything runs ``binary`` (its ``--help`` included)."""
        if self.judge is not None:
            self.judge.check_binary(binary)

    async def admit(self, config: LlamaConfig) -> None:
        """Every least-privilege rule, and whether ``--user`` can run and read it all."""
        self.admit_binary(config.binary)
        catalog = await self.catalog(config.binary)
        if self.judge is not None:
            self.judge.check(config, catalog)
        if self.run_as is not None:
            self.run_as.check(config, [name for _, name in files_of(config, catalog)])

    async def check(self, config: LlamaConfig, running: LlamaConfig | None, *,
                    fit: bool = True) -> None:
        await self.admit(config)
        check_static(config, await self.catalog(config.binary))
        if not self.picks_ports and (running is None or not same_address(config, running)):
            check_config_port(config)
        if not fit:
            return
        fit_ok = await self.fit(config, running)
        if not fit_ok.known:
            log.warning("memory not checked (%s): the start decides", fit_ok.reason)
        elif not fit_ok.fits:
            raise PreflightFailed(f"does not fit in memory: {fit_ok.reason}")
        for warning in self.warnings(config):
            log.warning("%s", warning)

    async def fit(self, config: LlamaConfig, running: LlamaConfig | None) -> FitVerdict:
        """Would ``config`` fit once ``running`` (if any) has stopped and given back its own?

        The metadata estimate (milliseconds) is asked first: it never runs above
        llama-fit-params' (bench/fit.py), so a misfit by it is a misfit by both, answered at
        once instead of after seconds of llama-fit-params.
        """
        freed = await self.estimator.estimate(running) if running is not None else None
        where = "available after stopping the running server" if running else "available"
        room = self.room().plus(freed)
        if not self.estimator.is_cached(config):
            quick = await asyncio.to_thread(self.estimator.estimate_now, config)
            early = verdict(quick, room, margin=self.fit_margin, where=where)
            if early.known and not early.fits:
                log.info("memory: a misfit by the GGUF metadata estimate already; "
                         "llama-fit-params not asked")
                return early
        needs = await self.estimator.estimate(config)
        return verdict(needs, room, margin=self.fit_margin, where=where)

    def room(self) -> Room:
        return Room(self.memory.available(), self.gpu_rooms())

    def gpu_rooms(self, max_age_s: float = 2.0) -> tuple[GpuRoom, ...]:
        now = time.monotonic()
        if self._gpu_cache is None or now - self._gpu_cache[0] > max_age_s:
            self._gpu_cache = (now, self._gpus())
        return self._gpu_cache[1]

    def warnings(self, config: LlamaConfig) -> list[str]:
        """What is allowed but probably not meant: more context than trained, GPU layers
        without a GPU."""
        out = []
        meta = self.estimator.meta(config)
        ctx = memory_value(config, "--ctx-size")
        trained = meta.trained_context if meta else None
        if isinstance(ctx, str) and ctx.isdigit() and trained and int(ctx) > trained:
            out.append(f"-c {ctx} exceeds the model's trained context ({trained}): "
                       "quality may suffer past it")
        layers = memory_value(config, "--gpu-layers")
        if layers is not None and gpu_layers_wanted(layers) and not self.gpu_rooms():
            out.append(f"--gpu-layers {layers} asked, but no GPU was found (nvidia-smi): "
                       "everything runs on the CPU")
        return out

    def memory_view(self, config: LlamaConfig) -> dict[str, Any]:
        """For ``/v1/status``: the cached estimate of ``config`` and the memory available."""
        estimate = self.estimator.cached(config)
        room = self.room()
        return {
            "estimate": None if estimate is None else {
                "method": estimate.method, "total_mib": round(estimate.total_mib, 1),
                "devices": [{"device": d.device, "model_mib": d.model_mib,
                             "context_mib": d.context_mib, "compute_mib": d.compute_mib}
                            for d in estimate.devices]},
            "available_mib": None if room.host_bytes is None else round(room.host_bytes / MIB),
            "gpus": [{"free_mib": g.free_bytes // MIB, "total_mib": g.total_bytes // MIB}
                     for g in room.gpus],
            "fit_margin": self.fit_margin,
        }

    async def check_port(self, config: LlamaConfig) -> None:
        check_config_port(config)

    def side_by_side(self, running: LlamaConfig, new: LlamaConfig) -> FitVerdict:
        """Would ``new`` fit now, while ``running`` keeps its memory? Synchronous (the
        controller asks it before the batch's own check): the cached estimate, else the
        metadata one (milliseconds)."""
        needs = self.estimator.estimate_now(new)
        return verdict(needs, self.room(), margin=self.fit_margin,
                       where="available beside the running server")


@dataclass
class CatalogCache:
    """Flag catalogs read from each binary's ``--help``, cached per (path, mtime)."""

    _cache: dict[tuple[str, float], FlagCatalog] = field(default_factory=dict)
    wrap: Wrap | None = None  # --user: --help runs as that user (RunAs.command)

    async def get(self, binary: str) -> FlagCatalog:
        try:
            path = resolve_binary(binary)
            key = (path, os.stat(path).st_mtime)
        except (PreflightFailed, OSError):
            return FlagCatalog()
        if key not in self._cache:
            self._cache[key] = await _read_catalog(path, self.wrap)
        return self._cache[key]


async def _read_catalog(path: str, wrap: Wrap | None = None) -> FlagCatalog:
    argv = [path, "--help"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *(wrap(argv) if wrap else argv), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        log.warning("cannot run %s --help (%s); accepting flags as given", path, exc)
        return FlagCatalog()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("%s --help did not finish in 15 s; accepting flags as given", path)
        return FlagCatalog()
    catalog = parse_help(out.decode("utf-8", "replace"))
    if len(catalog) < 5:
        log.warning("%s --help lists no flags I can read; accepting flags as given", path)
        return FlagCatalog()
    return catalog
