#!/usr/bin/env python3
"""A stand-in for llama-server, for fast and deterministic edge cases.

It speaks the part of llama-server's interface Corral uses: ``--help`` in llama-server's
format, ``--model/--port/--host/-np/-c/-cb``, ``GET /health`` (503 while "loading", then
200) and ``GET /props``, whose per-slot context is what the real one reports
(:func:`slot_context`). Its misbehaviours are flags of its own (so the API can switch them
on like any flag): slow load, never ready, exit at start, crash after ready, ignore
SIGTERM, a grandchild, an output flood, a freeze; it can also log the /health probes it
answers. Every run appends its command line to the file named by ``$FAKE_LLAMA_STARTS``
(when set), so a test can count starts without sampling /proc or reading the supervisor's log.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
-t,    --threads N                      number of threads to use during generation
-c,    --ctx-size N                     size of the prompt context (default: 4096)
-np,   --parallel N                     number of server slots (default: 1, -1 = auto)
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all sequences
-cb,   --cont-batching, -nocb, --no-cont-batching
                                        whether to use continuous batching (default: enabled)
-m,    --model FNAME                    model path
--host HOST                             ip address to listen (default: 127.0.0.1)
--port PORT                             port to listen (default: 8080)
-a,    --alias STRING                   set alias for model name
--fake-load-s S                         seconds /health answers 503 before 200
--fake-never-ready                      /health never answers 200
--fake-exit-at-start CODE               exit with CODE right away
--fake-oom-while PATH                   fail to allocate (exit 1) while a pid listed in PATH lives
--fake-crash-after S                    exit 1 this many seconds after becoming ready
--fake-ignore-sigterm                   ignore SIGTERM
--fake-grandchild                       start a grandchild process that sleeps
--fake-flood-mb N                       write N MiB of output at start
--fake-pidfile PATH                     append own pid (and grandchild pid) to PATH
--fake-hang-after S                     freeze (SIGSTOP itself) this many seconds after ready
--fake-log-health                       print a line for each GET /health it answers
-ngl,  --gpu-layers, --n-gpu-layers N   layers to offload to the GPU
--fake-props-n-ctx N                    report N as the per-slot n_ctx in /props (a degraded start)
--fake-offloaded K/M                    log "offloaded K/M layers to GPU" at load
--log-file FNAME                        log to file (the fake writes one line)
                                        (env: LLAMA_ARG_LOG_FILE)
--slot-save-path PATH                   path to save slot kv cache (default: disabled)
--metrics                               enable prometheus compatible metrics endpoint
"""
HEALTH_LOGGED = "fake: GET /health"
STARTS_ENV = "FAKE_LLAMA_STARTS"  # a file: one line (the arguments) per run
N_CTX_TRAIN = 4096  # the fake model's training context: what -c 0 means
CTX_PAD = 256  # llama.cpp pads the context, and each slot's share, up to a multiple of this


def slot_context(ctx: int, parallel: int, unified: bool) -> tuple[int, int]:
    """(slots, per-slot context) as llama-server reports them in ``/props`` for ``-c ctx
    -np parallel``: llama-context.cpp pads n_ctx up to 256, then, unless the KV cache is
    unified (then every slot may use all of it), divides by the slots and pads the share up
    to 256 again (``-c 1024 -np 3`` and ``-c 1000 -np 3``: 3 slots of 512); ``-np -1`` is
    4 slots with a unified cache."""
    if parallel < 0:
        parallel, unified = 4, True
    n_ctx = _pad(ctx if ctx > 0 else N_CTX_TRAIN)
    return parallel, n_ctx if unified else _pad(n_ctx // parallel)


def _pad(n: int) -> int:
    return (n + CTX_PAD - 1) // CTX_PAD * CTX_PAD


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-h", "--help", "--usage", action="store_true")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("-kvu", "--kv-unified", action="store_true")
    p.add_argument("-no-kvu", "--no-kv-unified", action="store_true")
    p.add_argument("-cb", "--cont-batching", action="store_true")
    p.add_argument("-nocb", "--no-cont-batching", action="store_true")
    p.add_argument("-m", "--model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-a", "--alias")
    p.add_argument("--fake-load-s", type=float, default=0.0)
    p.add_argument("--fake-never-ready", action="store_true")
    p.add_argument("--fake-exit-at-start", type=int)
    p.add_argument("--fake-oom-while")
    p.add_argument("--fake-crash-after", type=float)
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-grandchild", action="store_true")
    p.add_argument("--fake-flood-mb", type=float, default=0.0)
    p.add_argument("--fake-pidfile")
    p.add_argument("--fake-hang-after", type=float)
    p.add_argument("--fake-log-health", action="store_true")
    p.add_argument("--fake-props-n-ctx", type=int)
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers")
    p.add_argument("--fake-offloaded")
    p.add_argument("--log-file")
    p.add_argument("--slot-save-path")
    p.add_argument("--metrics", action="store_true")
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"error: invalid argument: {unknown[0]}", file=sys.stderr)
        sys.exit(1)
    if ns.parallel == 0:
        print("error: invalid value for n_parallel", file=sys.stderr)
        sys.exit(1)
    return ns


def _pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(word) for word in f.read().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    if starts := os.environ.get(STARTS_ENV):  # every run on record, before anything can fail
        try:
            with open(starts, "a") as f:
                f.write(" ".join(sys.argv[1:]) + "\n")
        except OSError:  # run as another user (--user): that user cannot write the record
            pass
    ns = parse(sys.argv[1:])
    if ns.help:
        print(HELP)
        return
    print(f"fake llama-server starting: {' '.join(sys.argv[1:])}", flush=True)
    if ns.fake_oom_while and any(_alive(pid) for pid in _pids(ns.fake_oom_while)):
        print("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate CPU buffer of "
              "size 123456789 (out of memory)", flush=True)
        sys.exit(1)
    if ns.fake_exit_at_start is not None:
        print(f"exiting with {ns.fake_exit_at_start} as asked", flush=True)
        sys.exit(ns.fake_exit_at_start)
    if ns.log_file:
        with open(ns.log_file, "a") as f:
            f.write("fake llama-server log\n")
    if ns.fake_offloaded:
        print(f"load_tensors: offloaded {ns.fake_offloaded} layers to GPU", flush=True)
    if ns.model and not os.path.isfile(ns.model):
        print(f"error: failed to load model '{ns.model}'", file=sys.stderr, flush=True)
        sys.exit(1)
    if ns.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    pids = [os.getpid()]
    if ns.fake_grandchild:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pids.append(grandchild.pid)
    if ns.fake_pidfile:
        with open(ns.fake_pidfile, "a") as f:
            f.write(" ".join(map(str, pids)) + "\n")
    if ns.fake_flood_mb:
        line = ("x" * 1023 + "\n").encode()
        for _ in range(int(ns.fake_flood_mb * 1024)):
            sys.stdout.buffer.write(line)
        sys.stdout.flush()
    serve(ns, time.monotonic() + ns.fake_load_s)


METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed (fake: GET /props served)
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {props}
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


GENERATION_S = 0.05  # how long a POST /completion takes


def serve(ns: argparse.Namespace, ready_at: float) -> None:
    props_served = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            ready = not ns.fake_never_ready and time.monotonic() >= ready_at
            if self.path == "/metrics" and ns.metrics:
                data = METRICS.format(props=props_served[0]).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if self.path == "/health":
                if ns.fake_log_health:
                    print(HEALTH_LOGGED, flush=True)
                self._json(200 if ready else 503,
                           {"status": "ok"} if ready else {"error": "Loading model"})
            elif self.path == "/props":
                props_served[0] += 1
                slots, per_slot = slot_context(ns.ctx_size, ns.parallel,
                                               ns.kv_unified and not ns.no_kv_unified)
                self._json(200, {"model_path": ns.model, "total_slots": slots,
                                 "pid": os.getpid(), "default_generation_settings": {
                                     "n_ctx": ns.fake_props_n_ctx or per_slot}})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": ns.model or "fake"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            """/completion: a short generation (GENERATION_S), so that load tests have
            requests in flight to lose or keep; with "stream": true, "n_predict" events."""
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            if self.path != "/completion":
                self._json(404, {"error": "not found"})
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            if isinstance(body, dict) and body.get("stream"):
                self._stream(int(body.get("n_predict") or 10))
                return
            time.sleep(GENERATION_S)
            self._json(200, {"content": " hi", "stop": True, "pid": os.getpid()})

        def _stream(self, tokens: int) -> None:
            """SSE like llama-server's: one event per token, GENERATION_S apart."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for i in range(tokens):
                time.sleep(GENERATION_S)
                event = json.dumps({"content": f" t{i}", "stop": i == tokens - 1,
                                    "pid": os.getpid()})
                self.wfile.write(f"data: {event}\n\n".encode())
                self.wfile.flush()

        def _json(self, code: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    try:
        server = ThreadingHTTPServer((ns.host, ns.port), Handler)
    except OSError as exc:
        print(f"error: couldn't bind HTTP server socket, port: {ns.port}: {exc}", flush=True)
        sys.exit(1)
    print(f"server is listening on http://{ns.host}:{ns.port}", flush=True)
    if ns.fake_hang_after is not None:
        after_ready(ready_at, ns.fake_hang_after, "fake hang",
                    lambda: os.kill(os.getpid(), signal.SIGSTOP))
    if ns.fake_crash_after is not None:
        after_ready(ready_at, ns.fake_crash_after, "fake crash", lambda: os._exit(1))
    server.serve_forever()


def after_ready(ready_at: float, seconds: float, say: str, act: Callable[[], object]) -> None:
    """In a thread: ``seconds`` after the server became ready, print ``say`` and ``act()``."""
    def run() -> None:
        while time.monotonic() < ready_at:
            time.sleep(0.01)
        time.sleep(seconds)
        print(say, flush=True)
        act()

    threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    main()
