"""Composition root: builds the parts, owns signals and lifetimes, stops in order.

SIGTERM/SIGINT set a shutdown event (the embedded HTTP server installs no handlers of its
own); the controller is then cancelled, which stops llama-server gracefully (SIGTERM to its
group, SIGKILL after the stop timeout). A second signal kills the group at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from corral.api.edge import uvicorn_limits
from corral.api.routes import create_app
from corral.api.security import Tokens
from corral.api.transport import (
    check_api_exposure,
    server_tls,
    tokens_from,
    warn_if_clear_text,
)
from corral.child.launcher import ProcessLauncher
from corral.child.locate import default_binary
from corral.child.pidfile import InstanceLock, PidFile
from corral.child.preflight import CatalogCache, Preflight, resolve_binary
from corral.child.privilege import RunAs, build_policy
from corral.core.args import LlamaConfig, parse_argv
from corral.defaults import instance_id
from corral.errors import PreflightFailed, UsageError
from corral.fleet.rollout import RolloutSettings
from corral.fleet.sync import PublishingStore
from corral.front import FrontDoor, FrontSettings
from corral.front.activation import inherited_listener
from corral.front.limits import raise_open_files_limit
from corral.front.steer import SteeredFront, place_on_loopback
from corral.observe.audit import AuditLog
from corral.observe.events import LineBus, LineHandler
from corral.observe.metrics import Metrics
from corral.observe.systemd import Notifier
from corral.store.base import ConfigStore
from corral.store.etcd import EtcdStore
from corral.store.factory import DriverSpec, open_store
from corral.store.local import LocalOverrides, LocalStore
from corral.supervisor.controller import Controller
from corral.supervisor.operate import Reloader
from corral.supervisor.settings import Security, Settings
from corral.supervisor.startup import choose_startup

if TYPE_CHECKING:
    from corral.fleet import FleetSync

log = logging.getLogger("corral")


@dataclass(frozen=True)
class Options:
    supervisor_addr: str
    binary: str | None  # None: the packaged llama-server, else the one on PATH (child/locate)
    model: str | None
    port: int | None
    extra_args: list[str]
    driver: DriverSpec
    settings: Settings
    state_dir: Path
    api_token: str | None = None
    cli_flags: list[str] = field(default_factory=list)
    listen: str | None = None  # the front door's address
    front: FrontSettings = field(default_factory=FrontSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    local_port: bool = False  # --port/--host are this instance's own, even in a fleet
    security: Security = field(default_factory=Security)


PRIVATE_WITH_LISTEN = ("--port", "--host")


def local_view(opened: ConfigStore, from_cli: LlamaConfig, listen: str | None,
               local_port: bool = False) -> tuple[ConfigStore, dict[str, str]]:
    """The store as this instance sees it, and the flags the API may not change.

    In a fleet the config is shared, port included (the stored config wins, as with the
    file driver), and the command line's port fills in for configs stored without one.
    With --local-port, --port/--host stay this instance's own; with --listen they are
    Corral's (a loopback port per start). Either way they are then never stored.
    """
    why = ""
    if listen:
        why = (f"with --listen Corral picks llama-server's port and host itself; clients "
               f"use {listen}")
        overrides = LocalOverrides((), frozenset(PRIVATE_WITH_LISTEN))
    elif isinstance(opened, PublishingStore | EtcdStore) and local_port:
        why = ("it is this instance's own (--local-port); restart this supervisor with "
               "another --port/--host to change it")
        overrides = LocalOverrides.from_config(from_cli)
    elif isinstance(opened, PublishingStore | EtcdStore):
        overrides = LocalOverrides.shared_port(from_cli)
    else:
        return opened, {}
    store = LocalStore(opened, overrides)
    return store, dict.fromkeys(store.pinned_keys, why)


def instance_key(opts: Options, from_cli: LlamaConfig) -> str | None:
    """What tells apart two instances of one shared config on one machine."""
    if opts.listen:
        return opts.listen
    return str(from_cli.get("--port")) if opts.driver.type == "etcd" else None


def bind_listen(addr: str, inherited: socket.socket | None = None) -> socket.socket:
    """The front door's socket: the one systemd passed (corral.socket), else bound here."""
    host, port = parse_addr(addr, "--listen")
    if inherited is not None:
        return inherited
    return bind_socket(host, port, "the front door")


def parse_addr(addr: str, flag: str = "--supervisor-addr") -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"{flag} must be host:port, got {addr!r}")
    host = host.strip("[]") or "127.0.0.1"
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def bind_api(host: str, port: int) -> socket.socket:
    return bind_socket(host, port, "the API")


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every keep-alive answer waits ~40 ms (Nagle vs delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot serve {what} on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


async def cli_config(opts: Options, catalogs: CatalogCache) -> LlamaConfig:
    """The config the command line asks for (the fallback when a stored one fails)."""
    try:
        binary = resolve_binary(opts.binary or default_binary())
    except PreflightFailed as exc:
        raise UsageError(str(exc)) from None
    tokens = list(opts.extra_args)
    if opts.model:
        tokens = ["--model", opts.model, *tokens]
    if opts.port is not None:
        tokens = [*tokens, "--port", str(opts.port)]
    args = dict(parse_argv(tokens, await catalogs.get(binary)))
    if opts.listen:
        ignored = [k for k in PRIVATE_WITH_LISTEN if args.pop(k, None) is not None]
        if ignored:
            log.warning("%s ignored: with --listen, Corral gives llama-server a loopback port "
                        "of its own; clients use %s", "/".join(ignored), opts.listen)
    else:
        args.setdefault("--port", "8080")
    return LlamaConfig(binary, tuple(args.items()))


def instance_files(state_dir: Path, store: ConfigStore, name: str,
                   local_port: str | None) -> tuple[Path, Path]:
    """Lock and pid file of one config: never two servers for it.

    A config is (store, name); in a fleet, where each instance has its own port, it is
    (store, name, port), so several instances may share a machine.
    """
    key = f"{store.description}\0{name}\0{local_port or ''}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    stem = f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{digest}"
    return state_dir / f"{stem}.lock", state_dir / f"{stem}.pid"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the composition root owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_as_user(name: str | None) -> RunAs | None:
    if name is None:
        return None
    if os.geteuid() != 0:
        raise UsageError(f"--user {name} needs the supervisor to run as root")
    return RunAs.lookup(name)


async def supervise(opts: Options) -> int:
    # Before any child runs (llama-server --help below): take systemd's variables and
    # sockets, so that no child inherits them.
    notifier = Notifier.from_environment()
    inherited = inherited_listener(opts.listen) if opts.listen else None
    raise_open_files_limit()  # systemd's soft 1024 would cap the front door's connections
    host, api_port = parse_addr(opts.supervisor_addr)
    sec = opts.security
    tokens = tokens_from(opts.api_token, sec)
    check_api_exposure(host, opts.api_token or sec.api_token_file)
    api_tls, front_tls = server_tls(sec, "the API"), server_tls(sec, "the front door")
    warn_if_clear_text(host, tokens, api_tls is not None)
    run_as = run_as_user(sec.user)
    catalogs = CatalogCache(wrap=run_as.command if run_as else None)  # --help as --user
    from_cli = await cli_config(opts, catalogs)
    judge = build_policy(from_cli, await catalogs.get(from_cli.binary),
                         allow_binaries=sec.allow_binaries, model_dirs=sec.allow_model_dirs,
                         allow_flags=sec.allow_flags, allow_env=sec.allow_env)
    opened: ConfigStore = open_store(opts.driver)
    name = opts.driver.name
    me = instance_id()
    etcd = opened if isinstance(opened, EtcdStore) else None
    if etcd is not None:
        opened = PublishingStore(etcd, name, me, opts.rollout)
    log.info("config store: %s, name %r", opened.description, name)
    store, pinned = local_view(opened, from_cli, opts.listen, opts.local_port)
    lock_path, pid_path = instance_files(opts.state_dir, opened, name, instance_key(opts, from_cli))
    async with contextlib.AsyncExitStack() as cleanup:  # undone in reverse, whatever fails
        cleanup.push_async_callback(store.close)
        lock = InstanceLock(lock_path)
        lock.acquire()
        cleanup.callback(lock.release)
        sock = bind_api(host, api_port)
        cleanup.callback(sock.close)
        listen_sock = bind_listen(opts.listen, inherited) if opts.listen else None
        if listen_sock is not None:
            cleanup.callback(listen_sock.close)
        door = FrontDoor(listen_sock, opts.front, tls=front_tls) if listen_sock else None
        startup = await choose_startup(store, name, from_cli, fleet=etcd is not None)
        lines = LineBus()  # GET /v1/logs: llama-server's output and the supervisor's own log
        line_handler = LineHandler(lines)
        logging.getLogger("corral").addHandler(line_handler)
        cleanup.callback(logging.getLogger("corral").removeHandler, line_handler)
        controller = Controller(
            name, store, startup, opts.settings, pinned=pinned, pidfile=PidFile(pid_path),
            launcher=ProcessLauncher(opts.settings.echo_output,
                                     allow_degraded=opts.settings.allow_degraded,
                                     user=run_as.identity if run_as else None,
                                     lines=lines, check_binary=judge.check_binary),
            checks=Preflight(catalogs, picks_ports=door is not None,
                             fit_margin=opts.settings.fit_margin, judge=judge, run_as=run_as),
            front=SteeredFront(door) if door else None,
            place=place_on_loopback if door else None)
        controller.events.listen(notifier.on_event)  # READY=1, RELOADING=1, STATUS=, ...
        # Counts from the first event on; prometheus_client is imported at the first scrape.
        metrics = Metrics(controller, controller.events)
        cleanup.push_async_callback(metrics.aclose)
        fleet = None
        if isinstance(store, LocalStore) and etcd is not None:
            from corral.fleet import FleetSync

            fleet = FleetSync(controller, store, etcd, name, f"{host}:{api_port}",
                              opts.rollout, me, listen=opts.listen)
        audit = AuditLog(lock_path.with_suffix(".audit.jsonl"))  # the change history
        audit.listen_to(controller.events)
        cleanup.callback(audit.close)
        app = create_app(controller, tokens, fleet=fleet, lines=lines, audit=audit,
                         metrics=lambda: metrics)
        if door is not None:
            log.info("front door on http://%s: clients connect here; llama-server gets a "
                     "loopback port of its own", opts.listen)
        server = _EmbeddedServer(uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False,
            **uvicorn_limits(opts.front.idle_timeout_s, opts.front.header_timeout_s,
                             opts.front.max_head_bytes),
            ssl_certfile=sec.tls_cert if api_tls else None,
            ssl_keyfile=sec.tls_key if api_tls else None))
        log.info("management API on %s://%s:%d (token %s%s)", "https" if api_tls else "http",
                 host, api_port, "required" if tokens.required else "not required: loopback only",
                 ", read-only token too" if tokens.read else "")
        await _run_until_signal(controller, server, sock, fleet, door, tokens, notifier,
                                Reloader(controller, audit) if fleet is None else None)
    log.info("supervisor stopped")
    return notifier.exit_code  # 3 when the start-up ended FATAL under systemd


def _reload_tokens(tokens: Tokens) -> None:
    """SIGHUP: read the token files again; a file that cannot be read keeps the old tokens."""
    if not tokens.from_files:
        log.info("SIGHUP: no token file to re-read")
        return
    try:
        tokens.reload()
    except UsageError as exc:
        log.error("SIGHUP: %s; the tokens in force stay", exc)
        return
    log.info("SIGHUP: tokens re-read from their files")


async def _run_until_signal(controller: Controller, server: uvicorn.Server,
                            sock: socket.socket, fleet: FleetSync | None,
                            door: FrontDoor | None, tokens: Tokens | None = None,
                            notifier: Notifier | None = None,
                            reloader: Reloader | None = None) -> None:
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    if notifier is not None:  # under systemd a start-up that ends FATAL exits (non-zero)
        notifier.on_failed_start_up = shutdown.set
    kill_now = asyncio.Event()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: stopping llama-server and exiting", sig.name)
            shutdown.set()
        else:
            log.warning("%s again: killing llama-server now", sig.name)
            kill_now.set()

    async def kill_on_second_signal() -> None:
        await kill_now.wait()
        await controller.kill_now()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    def on_hup() -> None:  # SIGHUP / ExecReload: token files, then the stored config
        if tokens is not None:
            _reload_tokens(tokens)
        if reloader is not None:
            reloader.request()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        async with asyncio.TaskGroup() as tg:
            killer = tg.create_task(kill_on_second_signal(), name="second signal")
            control = tg.create_task(controller.run(), name="controller")
            api = tg.create_task(server.serve(sockets=[sock]), name="api")
            waiter = tg.create_task(shutdown.wait())
            follower = tg.create_task(fleet.run(), name="fleet") if fleet else None
            front = tg.create_task(door.serve(), name="front door") if door else None
            reload = tg.create_task(reloader.run(), name="reload") if reloader else None
            # WATCHDOG=1 while this loop turns (the task runs) and the controller lives.
            dog = (tg.create_task(notifier.watchdog(lambda: not control.done()),
                                  name="watchdog") if notifier else None)
            await asyncio.wait({control, api, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if follower is not None:
                follower.cancel()  # leave the fleet first: no new applies while stopping
            if reload is not None:
                reload.cancel()  # no re-read of the store while stopping
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            server.should_exit = True
            waiter.cancel()
            killer.cancel()
            if dog is not None:
                dog.cancel()
            if front is not None:
                front.cancel()  # closed and drained by the controller's shutdown already
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
