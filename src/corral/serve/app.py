"""``corral serve``: many models behind one front door (the composition root).

It builds the catalog (:mod:`.models`), the scheduler that places models in memory
(:mod:`.scheduler`, deciding with :mod:`corral.core.placement`), the public edge
(:mod:`.edge`) and the management API (:mod:`.api`), then runs them until SIGTERM/SIGINT,
which drains and stops every model. SIGHUP re-reads the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from corral.api.edge import uvicorn_limits
from corral.api.transport import check_api_exposure, tokens_from
from corral.child.locate import default_binary
from corral.child.pidfile import InstanceLock
from corral.child.preflight import CatalogCache, resolve_binary
from corral.core.placement import HOST, Limits
from corral.errors import PreflightFailed, UsageError
from corral.front import FrontSettings
from corral.front.limits import connection_cap, raise_open_files_limit
from corral.sense.estimate import Estimator
from corral.sense.memory import MemorySource
from corral.serve.api import ModelServer, create_serve_app
from corral.serve.catalog import toml_tables
from corral.serve.edge import Edge
from corral.serve.models import CatalogSource, Models, Tables
from corral.serve.scheduler import Scheduler
from corral.store.base import ConfigStore
from corral.store.etcd import EtcdStore
from corral.store.factory import DriverSpec
from corral.store.toml_file import TomlFileStore
from corral.supervisor.settings import Security, Settings

log = logging.getLogger("corral.serve")

# The edge's timeouts, as the front door's defaults (--idle-timeout, --header-timeout).
IDLE_TIMEOUT_S, HEADER_TIMEOUT_S = 60.0, 10.0


@dataclass(frozen=True)
class ServeCommand:
    listen: str
    supervisor_addr: str
    driver: DriverSpec  # the catalog: a TOML file, or etcd
    state_dir: Path
    binary: str | None = None
    models_dir: Path | None = None
    dir_args: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    settings: Settings = field(default_factory=Settings)
    front: FrontSettings = field(default_factory=FrontSettings)
    api_token: str | None = None
    security: Security = field(default_factory=Security)


def default_limits(limits: Limits, memory: MemorySource) -> Limits:
    """Without --max-memory: what the host has available now (no limit if unknown)."""
    if limits.memory_mib:
        return limits
    available = memory.available()
    if available is None:
        return limits
    return Limits({HOST: available / (1 << 20)}, limits.max_models, limits.max_wait_s,
                  limits.idle_grace_s)


class _Quiet(uvicorn.Server):
    """uvicorn without its own signal handlers: this root owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app: Any, max_connections: int | None = None) -> _Quiet:
    """uvicorn with the front door's edge rules (idle and head timeouts, 431, a cap)."""
    limits = uvicorn_limits(IDLE_TIMEOUT_S, HEADER_TIMEOUT_S)
    if max_connections is not None:
        limits["limit_concurrency"] = max_connections
    return _Quiet(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                 **limits))


async def serve(cmd: ServeCommand) -> int:
    from corral.app import bind_socket, parse_addr  # the sockets as `supervise` binds them

    raise_open_files_limit()  # systemd's soft 1024 would cap the edge's connections
    api_host, api_port = parse_addr(cmd.supervisor_addr)
    listen_host, listen_port = parse_addr(cmd.listen, "--listen")
    tokens = tokens_from(cmd.api_token, cmd.security)
    check_api_exposure(api_host, cmd.api_token or cmd.security.api_token_file)
    try:
        binary = resolve_binary(cmd.binary or default_binary())
    except PreflightFailed as exc:
        raise UsageError(str(exc)) from None
    catalogs = CatalogCache()
    store, tables = open_catalog(cmd.driver)
    estimator = Estimator()
    models = Models(CatalogSource(tables, store.description, cmd.models_dir, binary,
                                  cmd.dir_args),
                    store, cmd.settings, cmd.front, cmd.state_dir, catalogs, estimator,
                    echo_output=cmd.settings.echo_output)
    cmd.state_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(store.description.encode()).hexdigest()[:12]
    lock = InstanceLock(cmd.state_dir / f"serve-{key}.lock")
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(store.close)
        lock.acquire()
        cleanup.callback(lock.release)
        api_sock = bind_socket(api_host, api_port, "the API")
        cleanup.callback(api_sock.close)
        edge_sock = bind_socket(listen_host, listen_port, "the front door")
        cleanup.callback(edge_sock.close)
        await models.read()
        cleanup.push_async_callback(models.close)
        limits = default_limits(cmd.limits, MemorySource())
        scheduler = Scheduler(models.by_id, limits, models.controller_for, models.estimate,
                              margin=cmd.settings.fit_margin,
                              drain_timeout_s=cmd.settings.drain_timeout_s)
        edge = Edge(models.by_id, models.aliases, scheduler.poke)
        cleanup.push_async_callback(edge.aclose)
        app = create_serve_app(ModelServer(models, scheduler), tokens if tokens.required
                               else None)
        log.info("corral serve: %d model(s) (%s); clients: http://%s; API http://%s:%d; "
                 "limits: %s", len(models.by_id), ", ".join(models.by_id), cmd.listen,
                 api_host, api_port, _describe(limits))
        edge_server = _uvicorn(edge, connection_cap(None))
        await _run(scheduler, models, edge_server, edge_sock, _uvicorn(app), api_sock,
                   store if isinstance(store, EtcdStore) else None)
    log.info("corral serve stopped")
    return 0


def open_catalog(driver: DriverSpec) -> tuple[ConfigStore, Tables]:
    """The store every model's config lives in, and how to read its named configs."""
    if driver.type == "etcd":
        assert driver.addr is not None
        etcd = EtcdStore.connect(driver.addr, **driver.etcd_options())

        async def etcd_tables() -> Mapping[str, Mapping[str, object]]:
            return (await etcd.catalog())[0]

        return etcd, etcd_tables
    if driver.type != "file" or driver.path is None:
        raise UsageError("corral serve keeps its catalog in a TOML file or in etcd")
    path = driver.path

    async def file_tables() -> Mapping[str, Mapping[str, object]]:
        return await asyncio.to_thread(toml_tables, path)

    return TomlFileStore(path), file_tables


def _describe(limits: Limits) -> str:
    memory = ", ".join(f"{d} {mib:.0f} MiB" for d, mib in limits.memory_mib.items())
    count = f"at most {limits.max_models} model(s)" if limits.max_models else "no count limit"
    return f"{memory or 'memory unknown'}; {count}; max wait {limits.max_wait_s:g} s"


async def _run(scheduler: Scheduler, models: Models, edge: uvicorn.Server, edge_sock: object,
               api: uvicorn.Server, api_sock: object, etcd: EtcdStore | None) -> None:
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()
    reload_lock = asyncio.Lock()  # one re-read at a time, in order

    async def reload() -> None:
        async with reload_lock:
            await models.reload(scheduler.unload)
        scheduler.poke()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    async def follow_etcd() -> None:  # every write of a config or serve table: re-read
        assert etcd is not None
        async for _ in etcd.catalog_changes():
            if not reload_lock.locked():  # one queued re-read covers every write so far
                on_hup()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        async with asyncio.TaskGroup() as tg:
            placing = tg.create_task(scheduler.run(), name="scheduler")
            public = tg.create_task(edge.serve(sockets=[edge_sock]), name="edge")  # type: ignore[list-item]
            manage = tg.create_task(api.serve(sockets=[api_sock]), name="api")  # type: ignore[list-item]
            waiter = tg.create_task(shutdown.wait())
            follower = tg.create_task(follow_etcd(), name="catalog") if etcd else None
            await asyncio.wait({placing, public, manage, waiter},
                               return_when=asyncio.FIRST_COMPLETED)
            log.info("stopping: draining and unloading every model")
            placing.cancel()  # its end unloads every model, each drained first
            with contextlib.suppress(asyncio.CancelledError):
                await placing
            edge.should_exit = True
            api.should_exit = True
            waiter.cancel()
            if follower is not None:
                follower.cancel()
            for task in reloads:
                task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
