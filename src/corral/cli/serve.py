"""``corral serve``: its arguments and how they become a :class:`corral.serve.app.ServeCommand`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from corral.cli.flags import add_hold_flags, add_output_flags, add_start_flags, positive

EPILOG = """\
The catalog: every named config of --config-file is a model (its name is the model id),
with an optional [NAME.serve] table:

  [qwen]
  binary = "/usr/bin/llama-server"
  [qwen.args]
  "--model" = "/models/qwen.gguf"
  "-c" = 8192
  [qwen.serve]
  aliases = ["gpt-4o-mini"]   # more ids for the same model
  ttl = 600                   # unload after this many idle seconds (0: never)
  pin = true                  # never evicted

--models-dir DIR adds every DIR/*.gguf as a model named after its file stem (arguments after
'--' go to each of them), unless a config of that name is stored.

Clients name the model as the OpenAI API does (the body's "model"; ?model= on GET), or
reach one model's server directly at /upstream/ID/... GET /v1/models lists every model
with its state. A model is loaded on its first request (one load per model however many
arrive) and evicted, least recently used idle model first, when another needs its memory
(--max-memory) or its place (--max-models). A busy model is never stopped for another
until the other's oldest request has waited --max-wait; then it takes no new requests
(they wait for its next turn), drains and gives way.

Management API (--supervisor-addr): GET /v1/status, POST /v1/models/ID/load|unload, and each
loaded model's own supervisor API under /v1/models/ID/ (e.g. POST /v1/models/ID/v1/params).
SIGHUP re-reads the catalog; SIGTERM drains and stops every model.

Example:
  corral serve --listen 127.0.0.1:8080 --models-dir ~/models --max-models 1 -- -c 4096
"""


def add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve", help="many models behind one front door: loaded on demand, evicted by memory",
        usage="corral serve --listen HOST:PORT [options] [-- ARGS FOR --models-dir MODELS]",
        description="Serve every model of a catalog on one OpenAI-compatible port; each "
        "model is a full Corral supervisor (pre-flight, instant revival, backoff, last good "
        "config) started when a request names it.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="where clients connect (the OpenAI API of every model)")
    p.add_argument("--supervisor-addr", default="127.0.0.1:8085", metavar="HOST:PORT",
                   help="the management API (default: %(default)s; anything but loopback "
                   "needs --api-token)")
    p.add_argument("--binary", help="llama-server for models from --models-dir (default: the "
                   "packaged one, else llama-server on PATH)")
    p.add_argument("--config-file", metavar="PATH", help="the catalog and where each model's "
                   "last good config is kept (default: corral's config.toml)")
    p.add_argument("--config-driver", metavar="JSON",
                   help='the store as supervise takes it: {"type": "file", "path": ...} or '
                   '{"type": "etcd", "addr": ..., TLS and auth settings}')
    p.add_argument("--etcd", metavar="ADDR", help="keep the catalog in etcd: every config under "
                   "/corral/configs/ is a model, its serve table the JSON at /corral/serve/NAME; "
                   "a write to either takes effect at once")
    p.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="serve every DIR/*.gguf too, named after its file stem")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="pid and lock files")
    m = p.add_argument_group("placement")
    m.add_argument("--max-memory", metavar="SPEC", help="memory the models may take: 8GiB, "
                   "1500MiB, or per device host=12GiB,cuda0=20GiB (default: what the host "
                   "has available at start)")
    m.add_argument("--max-models", type=int, metavar="N",
                   help="at most N models loaded at once (default: no count limit)")
    m.add_argument("--fit-margin", type=positive(float), default=10.0, metavar="PCT",
                   help="headroom on top of each memory estimate (default: %(default)g %%)")
    m.add_argument("--max-wait", type=float, default=10.0, metavar="S",
                   help="a busy model gives way once another model's oldest request has "
                   "waited this long (default: %(default)g)")
    m.add_argument("--idle-grace", type=float, default=1.0, metavar="S",
                   help="a model whose last request ended less than this ago counts as busy "
                   "(an agent's next request usually follows within it) (default: %(default)g)")
    add_hold_flags(p.add_argument_group("held requests (per model)"))
    t = p.add_argument_group("each model's supervisor, and output")
    add_start_flags(t)
    t.add_argument("--api-token", help="require 'Authorization: Bearer TOKEN' on the API")
    add_output_flags(t)
    p.set_defaults(runner="serve")


def run_serve(ns: argparse.Namespace) -> int:
    import platformdirs

    from corral.cli.loop import run
    from corral.core.backoff import BackoffPolicy
    from corral.core.placement import Limits, parse_memory
    from corral.errors import CorralError
    from corral.front import FrontSettings
    from corral.serve.app import ServeCommand, serve
    from corral.store.factory import driver_spec
    from corral.supervisor.settings import Settings

    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logging.getLogger("corral")
    try:
        for flag, value in (("--max-wait", ns.max_wait), ("--hold-timeout", ns.hold_timeout),
                            ("--drain-timeout", ns.drain_timeout)):
            if value <= 0:
                raise CorralError(f"{flag} must be more than 0")
        if ns.max_models is not None and ns.max_models < 1:
            raise CorralError("--max-models must be at least 1")
        limits = Limits(parse_memory(ns.max_memory) if ns.max_memory else {}, ns.max_models,
                        ns.max_wait, max(0.0, ns.idle_grace))
        settings = Settings(ready_timeout_s=ns.ready_timeout, stop_timeout_s=ns.stop_timeout,
                            drain_timeout_s=ns.drain_timeout, echo_output=not ns.quiet_llama,
                            backoff=BackoffPolicy(max_failures=max(1, ns.max_start_failures)),
                            fit_margin=ns.fit_margin / 100)
        import os

        cmd = ServeCommand(
            listen=ns.listen, supervisor_addr=ns.supervisor_addr,
            driver=driver_spec(ns.config_driver, ns.config_file, ns.etcd, None),
            state_dir=ns.state_dir or Path(platformdirs.user_state_dir("corral")),
            binary=ns.binary, models_dir=ns.models_dir, dir_args=list(ns.extra),
            limits=limits, settings=settings,
            front=FrontSettings(max_held=max(0, ns.max_held), hold_timeout_s=ns.hold_timeout),
            api_token=ns.api_token or os.environ.get("CORRAL_API_TOKEN"))
        return run(serve(cmd), ns.loop)
    except CorralError as exc:
        log.error("%s", exc)
        return 2
