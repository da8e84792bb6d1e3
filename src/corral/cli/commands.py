"""Runs what the command line asked: ``supervise`` (through :mod:`corral.app`), ``fleet``,
and the commands that ask a running supervisor over HTTP (:mod:`.client`), printed by
:mod:`.render`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from corral.cli.parser import build_parser, split_extra
from corral.cli.serve import run_serve
from corral.defaults import token_from_env
from corral.supervisor.settings import Security

if TYPE_CHECKING:
    from corral.cli.client import SupervisorClient
    from corral.store.factory import DriverSpec


def _etcd_spec(ns: argparse.Namespace, spec: DriverSpec) -> DriverSpec:
    return spec.with_tls(cacert=ns.etcd_cacert, cert=ns.etcd_cert, key=ns.etcd_key,
                         user=ns.etcd_user)


def _run_fleet(ns: argparse.Namespace) -> int:
    from corral.cli import client
    from corral.errors import CorralError
    from corral.fleet.view import render_table
    from corral.store.factory import driver_spec

    try:
        spec = _etcd_spec(ns, driver_spec(None, None, ns.etcd, ns.name))
        report = client.fleet(spec, ns.name)
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if ns.json else render_table(report))
    return 0


def _run_balance(ns: argparse.Namespace) -> int:
    from corral.fleet.haproxy import sample_config

    if ns.print_config:
        print(sample_config(ns.backend, ns.haproxy_socket or "/run/haproxy/admin.sock"))
        return 0
    if not ns.etcd or not ns.haproxy_socket:
        print("corral balance: --etcd and --haproxy-socket are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from corral.fleet.balance import BalanceSettings
    from corral.fleet.balance_app import run_balance
    from corral.store.factory import driver_spec

    settings = BalanceSettings(ns.backend, ns.server_prefix, ns.server_options,
                               grace=ns.drain_grace)
    spec = _etcd_spec(ns, driver_spec(None, None, ns.etcd, ns.name))
    return run_balance(spec, ns.name, ns.haproxy_socket, settings)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, extra = split_extra(argv)
    args = build_parser().parse_args(head)
    args.extra = extra
    try:
        run = {"supervise": _run_supervise, "fleet": _run_fleet, "client": _run_client,
               "balance": _run_balance, "serve": run_serve}
        return int(run[args.runner](args))
    except KeyboardInterrupt:
        return 130


def _run_supervise(ns: argparse.Namespace) -> int:
    from corral.app import Options, supervise
    from corral.cli.loop import run as run_loop
    from corral.core.backoff import BackoffPolicy
    from corral.core.fit import SwapMode
    from corral.errors import CorralError
    from corral.front import FrontSettings
    from corral.store.factory import driver_spec
    from corral.supervisor.settings import Settings

    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logging.getLogger("corral")
    binary, extra = ns.binary, list(ns.extra)
    if ns.args:
        if binary:
            print("corral: use --binary or --args BINARY ..., not both", file=sys.stderr)
            return 2
        binary, extra = ns.args[0], [*ns.args[1:], *extra]
    import platformdirs

    from corral.core.rollout import MaxUnavailable
    from corral.fleet.rollout import RolloutSettings

    try:
        rollout = RolloutSettings(MaxUnavailable.parse(ns.max_unavailable),
                                  max(0.0, ns.canary_seconds), ns.balancer_drain_timeout)
    except ValueError as exc:
        log.error("--max-unavailable: %s", exc)
        return 2
    if ns.swap == "start-first" and not ns.listen:
        log.error("--swap start-first needs --listen: without the front door the new server "
                  "cannot take the old one's port while it still serves")
        return 2
    try:
        settings = Settings(
            ready_timeout_s=ns.ready_timeout, stop_timeout_s=ns.stop_timeout,
            min_healthy_s=ns.min_healthy, debounce_s=ns.debounce_ms / 1000,
            max_batch_age_s=ns.max_batch_ms / 1000, liveness_interval_s=ns.monitoring_interval,
            backoff=BackoffPolicy(max_failures=max(1, ns.max_start_failures)),
            echo_output=not ns.quiet_llama, drain_timeout_s=ns.drain_timeout,
            swap=SwapMode(ns.swap) if ns.listen else SwapMode.STOP_FIRST,
            fit_margin=ns.fit_margin / 100, allow_degraded=ns.allow_degraded)
        opts = Options(
            supervisor_addr=ns.supervisor_addr, binary=binary or None,
            model=ns.model, port=ns.port, extra_args=extra,
            driver=_etcd_spec(ns, driver_spec(ns.config_driver, ns.config_file, ns.etcd,
                                              ns.name)),
            settings=settings,
            state_dir=ns.state_dir or Path(platformdirs.user_state_dir("corral")),
            api_token=token_from_env(ns.api_token), listen=ns.listen,
            front=FrontSettings(max_held=max(0, ns.max_held), hold_timeout_s=ns.hold_timeout,
                                idle_timeout_s=ns.idle_timeout,
                                header_timeout_s=ns.header_timeout,
                                max_connections=(max(1, ns.max_connections)
                                                 if ns.max_connections is not None else None)),
            rollout=rollout, local_port=ns.local_port, security=_security(ns))
        return run_loop(supervise(opts), ns.loop)
    except CorralError as exc:
        log.error("%s", exc)
        return 2


def _security(ns: argparse.Namespace) -> Security:
    return Security(
        allow_binaries=tuple(ns.allow_binary or ()),
        allow_model_dirs=tuple(ns.allow_model_dir or ()), allow_flags=tuple(ns.allow_flag or ()),
        allow_env=tuple(e for e in ns.allow_env if e) if ns.allow_env is not None else None,
        user=ns.user, tls_cert=ns.tls_cert, tls_key=ns.tls_key,
        api_token_file=ns.api_token_file, read_token=ns.read_token,
        read_token_file=ns.read_token_file)


def _run_client(ns: argparse.Namespace) -> int:
    from corral.cli.client import SupervisorClient, change_body
    from corral.errors import CorralError, UsageError

    supervisor = SupervisorClient(ns.supervisor_addr, token_from_env(ns.api_token))
    try:
        if ns.command in ("logs", "events"):
            return _run_stream(ns, supervisor)
        if ns.command == "apply":
            reply = supervisor.apply(change_body(ns.body, ns.extra))
        elif ns.command == "restart":
            reply = supervisor.restart()
        elif ns.command == "revert":
            reply = supervisor.revert(ns.change_id)
        elif ns.command == "history":
            reply = supervisor.history(max(1, min(ns.n, 1000)))
        else:
            reply = supervisor.status() if ns.command == "status" else supervisor.params()
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print(_readable(ns, reply.body) if reply.ok else json.dumps(reply.body, indent=2))
    return 0 if reply.ok else 1


def _readable(ns: argparse.Namespace, body: object) -> str:
    """What a person reads; ``--json`` (and every command without a text form) keeps the
    API's JSON."""
    from corral.cli.render import render_history, render_status

    if ns.command == "status" and not ns.json and isinstance(body, dict):
        return render_status(body)
    if ns.command == "history" and not ns.json and isinstance(body, dict):
        return render_history(list(body.get("changes") or []))
    return json.dumps(body, indent=2)


def _run_stream(ns: argparse.Namespace, supervisor: SupervisorClient) -> int:
    """``logs`` and ``events``: print as things come; Ctrl-C or the supervisor ending the
    stream exit 0."""
    from corral.cli.render import render_line

    try:
        if ns.command == "logs" and not ns.follow:
            reply = supervisor.logs(ns.tail)
            if not reply.ok or not isinstance(reply.body, list):
                print(json.dumps(reply.body, indent=2))
                return 1
            for line in reply.body:
                print(render_line(line))
            return 0
        with _ctrl_c_interrupts():
            _follow(ns, supervisor)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # | head
        sys.stderr.close()
        return 0
    return 0


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt while a stream is followed, even when this process
    was started with SIGINT ignored: Python then installs no handler of its own, and a
    shell without job control ignores SIGINT in what it runs in the background
    (``cmd &`` in a script, a CI step), so Ctrl-C or ``kill -INT`` would be lost and the
    follow would never end. The supervisor's own handlers override an inherited SIG_IGN
    the same way. The handler before is put back (``main`` may be called in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _follow(ns: argparse.Namespace, supervisor: SupervisorClient) -> None:
    """Print the messages of ``logs -f`` or ``events`` until the stream ends."""
    from corral.cli.render import render_event, render_line

    stream = (supervisor.follow_logs(ns.tail) if ns.command == "logs"
              else supervisor.events(ns.since))
    for message in stream:
        if message.event == "gap":
            gap = message.json()
            missed = gap.get("missed")
            print(f"corral: {'some' if missed is None else missed} "
                  f"{'line' if ns.command == 'logs' else 'event'}(s) missed "
                  "(no longer kept)", file=sys.stderr, flush=True)
            continue
        data = message.json()
        if ns.command == "logs":
            print(render_line(data), flush=True)
        else:
            print(json.dumps(data) if ns.json else render_event(data), flush=True)
