"""Checks a config can work before anything running is touched.

Everything checked here is rejected with no downtime at all: a missing or non-executable
binary, a missing/unreadable/non-GGUF model file, a busy port, flags the binary does not
know. What cannot be checked (a bad value, a corrupt model body) is left to the start and
its rollback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field

from corral.core.args import FlagCatalog, LlamaConfig, host_of, parse_help, port_of
from corral.core.fit import FitVerdict, fits_beside
from corral.errors import PreflightFailed
from corral.sense.memory import file_size, mem_available

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
    """The real :class:`~corral.seams.Checks`.

    Stages, and why a check is repeated:
    1. the API checks ``last good ⊕ change`` when it arrives, so a change that cannot work
       is refused at once and never joins a batch;
    2. the controller checks the merged batch (merging can combine changes that were each
       fine; files may have changed since);
    3. right before a spawn, only the port: it is free only once the old server stopped.
    """

    def __init__(self, catalogs: CatalogCache | None = None, picks_ports: bool = False) -> None:
        self.catalogs = catalogs or CatalogCache()
        # With --listen, Corral gives every llama-server a free loopback port of its own.
        self.picks_ports = picks_ports

    async def catalog(self, binary: str) -> FlagCatalog:
        return await self.catalogs.get(binary)

    async def check(self, config: LlamaConfig, running: LlamaConfig | None) -> None:
        check_static(config, await self.catalog(config.binary))
        if not self.picks_ports and (running is None or not same_address(config, running)):
            check_config_port(config)

    async def check_port(self, config: LlamaConfig) -> None:
        check_config_port(config)

    def side_by_side(self, running: LlamaConfig, new: LlamaConfig) -> FitVerdict:
        return fits_beside(file_size(new.get("--model")), mem_available())


@dataclass
class CatalogCache:
    """Flag catalogs read from each binary's ``--help``, cached per (path, mtime)."""

    _cache: dict[tuple[str, float], FlagCatalog] = field(default_factory=dict)

    async def get(self, binary: str) -> FlagCatalog:
        try:
            path = resolve_binary(binary)
            key = (path, os.stat(path).st_mtime)
        except (PreflightFailed, OSError):
            return FlagCatalog()
        if key not in self._cache:
            self._cache[key] = await _read_catalog(path)
        return self._cache[key]


async def _read_catalog(path: str) -> FlagCatalog:
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--help", stdin=asyncio.subprocess.DEVNULL,
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
