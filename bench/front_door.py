"""The front door's cost: direct to llama-server, through Corral's front door, through HAProxy.

One real llama-server (the real gemma-3 270M GGUF, ``-c 4096 -np 4``) on 127.0.0.1; the
contenders forward to it and are measured in turns, interleaved, for several rounds, and the
medians are reported (the machine is shared: single figures move by +-30 %):

- ``/health``: latency p50/p99 at concurrency 1 and 16, and requests/s, with ``wrk
  --latency`` (keep-alive, a few seconds each); "added" is the contender's p50 minus
  direct's p50 in the same round;
- streamed completions (``/completion``, ``n_predict`` 64, ``ignore_eos``, no prompt cache)
  at concurrency 1 and 4: time to first token and tokens/s per stream, measured by the client.

Contenders: ``direct``; ``corral`` (``corral.front.FrontDoor`` in a process of its own,
pointed at the server: the byte pump the controller drives); ``haproxy`` (Debian's, a plain
reverse-proxy config, its defaults otherwise). ``--alternatives`` adds what the choice was
made against: the same FrontDoor on uvloop, an aiohttp server + aiohttp client streaming pair,
and a bare TCP splice (the floor for any Python proxy). When ``corral supervise --listen``
exists, ``CorralFront.argv`` is the one line to change.

    .venv/bin/python -m bench.front_door [--rounds 3] [--seconds 3] [--alternatives]
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import cli, loadavg, log
from bench.supervisors import BareServer, temp_dir
from tests.harness import free_port

LLAMA_ARGS = ["-c", "4096", "-np", "4"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
N_PREDICT = 64


# ---- contenders ---------------------------------------------------------------------------

class Contender:
    """Something that answers HTTP on ``self.port`` and forwards to llama-server."""

    name = "?"

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = upstream

    def argv(self, tmp: Path) -> list[str] | None:
        """The command that serves ``self.port`` (None: nothing to start)."""
        return None

    @contextlib.contextmanager
    def running(self, tmp: Path) -> Iterator[Contender]:
        self.port = free_port()
        argv = self.argv(tmp)
        if argv is None:
            self.port = self.upstream
            yield self
            return
        with open(tmp / f"{self.name}.log", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_200(self.port, proc, 30)
            yield self
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class Direct(Contender):
    name = "direct"


class CorralFront(Contender):
    """Corral's front door. Today the bare FrontDoor; later ``corral supervise --listen``."""

    name = "corral"
    impl, loop = "front", "asyncio"

    def argv(self, tmp: Path) -> list[str]:
        return [sys.executable, "-m", "bench.front_proxies", "--impl", self.impl,
                "--loop", self.loop, "--listen", str(self.port),
                "--upstream", str(self.upstream)]


class CorralFrontUvloop(CorralFront):
    name, loop = "corral-uvloop", "uvloop"


class AiohttpPair(CorralFront):
    name, impl = "aiohttp", "aiohttp"


class Splice(CorralFront):
    name, impl = "tcp-splice", "splice"


HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend front
    bind 127.0.0.1:{port}
    default_backend llama
backend llama
    server s1 127.0.0.1:{upstream}
"""


class HAProxy(Contender):
    """Debian's haproxy with a plain reverse-proxy config (its defaults otherwise)."""

    name = "haproxy"

    def argv(self, tmp: Path) -> list[str]:
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.port, upstream=self.upstream))
        return ["haproxy", "-db", "-f", str(cfg)]


def _wait_200(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                c.close()
                return
            c.close()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"port {port} not answering /health 200 within {timeout} s")


# ---- measurements -------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_health(port: int, conc: int, seconds: float) -> dict[str, float]:
    threads = 1 if conc == 1 else 2
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds:g}s", "--latency",
                          f"http://127.0.0.1:{port}/health"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    return {"p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "bad": float(int(non2xx.group(1)) if non2xx else 0) + (1.0 if errors else 0.0)}


def stream_once(port: int) -> tuple[float, float]:
    """One streamed completion: (time to first token s, tokens/s after the first)."""
    body = json.dumps({"prompt": PROMPT, "n_predict": N_PREDICT, "stream": True,
                       "ignore_eos": True, "temperature": 0, "cache_prompt": False})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"/completion answered {resp.status}: {resp.read()[:200]!r}")
        first = last = 0.0
        tokens = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("content"):
                tokens += 1
                first = first or now
                last = now
            if event.get("stop"):
                break
        if tokens < 2:
            raise RuntimeError(f"only {tokens} tokens streamed")
        return first - t0, (tokens - 1) / (last - first)
    finally:
        conn.close()


def streams(port: int, conc: int, per_client: int) -> dict[str, float]:
    results: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def client() -> None:
        for _ in range(per_client):
            try:
                results.append(stream_once(port))
            except (OSError, RuntimeError, ValueError) as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[0]!r}")
    return {"ttft_ms": statistics.median(r[0] for r in results) * 1000,
            "tok_s": statistics.median(r[1] for r in results)}


def one_round(c: Contender, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for conc in (1, 16):
        for k, v in wrk_health(c.port, conc, seconds).items():
            out[f"health_c{conc}_{k}"] = v
    for conc, per_client in ((1, 3), (4, 2)):
        for k, v in streams(c.port, conc, per_client).items():
            out[f"stream_c{conc}_{k}"] = v
    return out


# ---- the run ------------------------------------------------------------------------------

def run(rounds: int = 3, seconds: float = 3.0, alternatives: bool = False) -> dict[str, Any]:
    kinds: list[Callable[[int], Contender]] = [Direct, CorralFront, HAProxy]
    if alternatives:
        kinds += [CorralFrontUvloop, AiohttpPair, Splice]
    if shutil.which("haproxy") is None:
        log("front_door: haproxy is not installed; measuring without it")
        kinds.remove(HAProxy)
    la = loadavg()
    per: dict[str, list[dict[str, float]]] = {}
    with temp_dir("front") as tmp:
        port = free_port()
        server = BareServer([*_model_args(), *LLAMA_ARGS], port)
        try:
            _wait_200(port, server.proc, 180)
            stream_once(port)  # warm up
            with contextlib.ExitStack() as stack:
                contenders = [stack.enter_context(k(port).running(tmp)) for k in kinds]
                for r in range(rounds):
                    for c in contenders:
                        log(f"front_door: round {r + 1}/{rounds}: {c.name}")
                        per.setdefault(c.name, []).append(one_round(c, seconds))
        finally:
            server.stop()
    summary = {name: {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]}
               for name, runs in per.items()}
    direct = per["direct"]
    for name, runs in per.items():
        for conc in (1, 16):
            key = f"health_c{conc}_p50_ms"
            added = [x[key] - d[key] for x, d in zip(runs, direct, strict=True)]
            summary[name][f"health_c{conc}_added_p50_ms"] = round(statistics.median(added), 3)
        for conc in (1, 4):
            key = f"stream_c{conc}_tok_s"
            ratio = [x[key] / d[key] for x, d in zip(runs, direct, strict=True)]
            summary[name][f"stream_c{conc}_tok_s_vs_direct"] = round(statistics.median(ratio), 4)
            key = f"stream_c{conc}_ttft_ms"
            added = [x[key] - d[key] for x, d in zip(runs, direct, strict=True)]
            summary[name][f"stream_c{conc}_ttft_added_ms"] = round(statistics.median(added), 2)
    return {"rounds": rounds, "seconds": seconds, "llama_server_args": LLAMA_ARGS,
            "n_predict": N_PREDICT, "summary": summary, "runs": per,
            "loadavg_before": la, "loadavg_after": loadavg()}


def _model_args() -> list[str]:
    from scripts.llama_paths import model

    return ["--model", str(model())]


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    s = r["summary"]
    out = [("", "  ".join(f"{n:>14}" for n in s))]

    def line(label: str, key: str, fmt: str) -> None:
        out.append((label, "  ".join(f"{format(s[n][key], fmt):>14}" for n in s)))

    line("/health c=1 p50 ms", "health_c1_p50_ms", ".3f")
    line("/health c=1 added p50 ms", "health_c1_added_p50_ms", "+.3f")
    line("/health c=1 p99 ms", "health_c1_p99_ms", ".3f")
    line("/health c=1 req/s", "health_c1_rps", ".0f")
    line("/health c=16 p50 ms", "health_c16_p50_ms", ".3f")
    line("/health c=16 added p50 ms", "health_c16_added_p50_ms", "+.3f")
    line("/health c=16 p99 ms", "health_c16_p99_ms", ".3f")
    line("/health c=16 req/s", "health_c16_rps", ".0f")
    for conc in (1, 4):
        line(f"stream c={conc} first token ms", f"stream_c{conc}_ttft_ms", ".1f")
        line(f"stream c={conc} first token added ms", f"stream_c{conc}_ttft_added_ms", "+.2f")
        line(f"stream c={conc} tokens/s", f"stream_c{conc}_tok_s", ".1f")
        line(f"stream c={conc} tokens/s vs direct", f"stream_c{conc}_tok_s_vs_direct", ".1%")
    return out


def main() -> int:
    return cli(__doc__, run, rows, lambda r: f"Front door cost (medians of {r['rounds']} "
               f"interleaved rounds, {r['seconds']:g} s of wrk each)",
               rounds=3, seconds=3.0, alternatives=False)


if __name__ == "__main__":
    raise SystemExit(main())
