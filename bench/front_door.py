"""The front door's cost: direct to llama-server, through Corral's front door, through HAProxy.

One real llama-server (the real gemma-3 270M GGUF, ``-c 4096 -np 4``) on 127.0.0.1; the
contenders forward to it and are measured in turns, interleaved, for several rounds, and the
medians are reported (the machine is shared: single figures move by +-30 %):

- ``/health``: latency p50/p99 at concurrency 1 and 16, and requests/s, with ``wrk
  --latency`` (keep-alive, a few seconds each); "added" is the contender's p50 minus
  direct's p50 in the same round;
- streamed completions (``/completion``, ``n_predict`` 64, ``ignore_eos``, no prompt cache)
  at concurrency 1 and 4: time to first token and tokens/s per stream, measured by the client.
  Streams differ by several per cent from one to the next whoever forwards them, so they are
  a phase of their own: ``--stream-cycles`` cycles, each one stream (at c=4: four at once)
  per contender, in an order that rotates every cycle; "vs direct" and "added" are medians
  of each cycle's pairs with direct.

Contenders: ``direct``; ``corral`` (``corral.front.FrontDoor`` in a process of its own,
pointed at the server: the byte pump the controller drives); ``haproxy`` (Debian's, a plain
reverse-proxy config, its defaults otherwise). ``--alternatives`` adds what the choice was
made against: the same FrontDoor as pure Python (not compiled by mypyc), on asyncio's own
loop, an aiohttp server + aiohttp client streaming pair, and a bare TCP splice (the floor
for any Python proxy). ``corral`` runs as installed (compiled where ``setup.py`` could) on
the loop ``corral supervise`` picks by default (uvloop when installed). "vs HAProxy" pairs
each round's req/s with HAProxy's in the same round.

    .venv/bin/python -m bench.front_door [--rounds 3] [--seconds 3] [--alternatives]
        [--no-streams] [--stream-cycles 8] [--budget-s 900]
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
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

from bench.report import RESULTS, cli, loadavg, log, write_json
from bench.supervisors import BareServer, temp_dir
from tests.harness import end_process, free_port

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
        self.pid: int | None = None

    def argv(self, tmp: Path) -> list[str] | None:
        """The command that serves ``self.port`` (None: nothing to start)."""
        return None

    def env(self, tmp: Path) -> dict[str, str] | None:
        """The command's environment (None: this one's)."""
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
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=self.env(tmp),
                                    stdout=subprocess.DEVNULL, stderr=err)
        self.pid = proc.pid
        try:
            _wait_200(self.port, proc, 30)
            yield self
        finally:
            end_process(proc, 10)


class Direct(Contender):
    name = "direct"


class CorralFront(Contender):
    """Corral's front door (the FrontDoor ``corral supervise --listen`` runs) on the loop
    ``supervise`` runs by default: uvloop when it is installed."""

    name = "corral"
    impl, loop = "front", "auto"

    def argv(self, tmp: Path) -> list[str]:
        return [sys.executable, "-m", "bench.front_proxies", "--impl", self.impl,
                "--loop", self.loop, "--listen", str(self.port),
                "--upstream", str(self.upstream)]


class CorralFrontAsyncio(CorralFront):
    name, loop = "corral-asyncio", "asyncio"


class CorralFrontPure(CorralFront):
    """The same front door as pure Python (as installed without a C compiler, or with
    ``CORRAL_PURE=1``): this checkout's source without its compiled modules."""

    name = "corral-pure"

    def env(self, tmp: Path) -> dict[str, str]:
        src = tmp / "pure-src"
        if not src.exists():
            shutil.copytree(Path(__file__).resolve().parent.parent / "src", src,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
        return {**os.environ, "PYTHONPATH": str(src)}


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


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of ``pid`` so far (0 for None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_health(port: int, conc: int, seconds: float, pid: int | None) -> dict[str, float]:
    """wrk on /health; with the proxy's ``pid``, also its CPU time per request."""
    threads = 1 if conc == 1 else 2
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds:g}s", "--latency",
                          f"http://127.0.0.1:{port}/health"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    cpu = cpu_seconds(pid) - cpu0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    result = {"p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
              "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
              "bad": float(int(non2xx.group(1)) if non2xx else 0) + (1.0 if errors else 0.0)}
    if pid is not None and requests:
        result["cpu_us_per_req"] = cpu / requests * 1e6
    return result


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
        for k, v in wrk_health(c.port, conc, seconds, c.pid).items():
            out[f"health_c{conc}_{k}"] = v
    return out


def rotating_streams(contenders: list[Contender], cycles: int, prefix: str = "stream"
                     ) -> dict[str, list[dict[str, float]]]:
    """Per contender, one entry per cycle: ``<prefix>_c1_*`` of one stream and
    ``<prefix>_c4_*`` (medians) of four at once. Each cycle runs every contender in turn,
    starting one further along than the cycle before, so slow drifts of the machine fall on
    all alike."""
    per: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    for i in range(cycles):
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]
        figures: dict[str, dict[str, float]] = {c.name: {} for c in contenders}
        for conc in (1, 4):
            for c in order:
                try:
                    for k, v in streams(c.port, conc, 1).items():
                        figures[c.name][f"{prefix}_c{conc}_{k}"] = v
                except RuntimeError as exc:
                    log(f"front_door: {c.name} streams failed in cycle {i + 1}: {exc!r}")
        for name, f in figures.items():
            per[name].append(f)
    return per


# ---- the run ------------------------------------------------------------------------------

def run(rounds: int = 3, seconds: float = 3.0, alternatives: bool = False,
        streams: bool = True, stream_cycles: int = 8, paced_cycles: int = 30,
        budget_s: float = 900.0) -> dict[str, Any]:
    """``rounds`` interleaved rounds of /health, fewer if ``budget_s`` runs out (at least
    one), then the streams' cycles: from llama-server, then (direct, Corral, HAProxy) from
    the paced upstream. The figures so far are written to bench/results/front_door.json
    after every round."""
    kinds: list[Callable[[int], Contender]] = [Direct, CorralFront, HAProxy]
    if alternatives:
        kinds += [CorralFrontPure, CorralFrontAsyncio, AiohttpPair, Splice]
    if shutil.which("haproxy") is None:
        log("front_door: haproxy is not installed; measuring without it")
        kinds.remove(HAProxy)
    result: dict[str, Any] = {"rounds": 0, "seconds": seconds, "llama_server_args": LLAMA_ARGS,
                              "n_predict": N_PREDICT, "stream_cycles": 0,
                              "loadavg_before": loadavg()}
    per: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    with temp_dir("front") as tmp:
        port = free_port()
        server = BareServer([*_model_args(), *LLAMA_ARGS], port)
        try:
            _wait_200(port, server.proc, 180)
            stream_once(port)  # warm up
            with contextlib.ExitStack() as stack:
                contenders = [stack.enter_context(k(port).running(tmp)) for k in kinds]
                for r in range(rounds):
                    if r and time.monotonic() - started > budget_s:
                        log(f"front_door: {budget_s:g} s spent; stopping after {r} rounds")
                        break
                    for c in contenders:
                        log(f"front_door: round {r + 1}/{rounds}: {c.name}")
                        per.setdefault(c.name, []).append(_measure(c, seconds))
                    result.update(rounds=r + 1, summary=summarize(per), runs=per,
                                  loadavg_after=loadavg())
                    write_json(RESULTS / "front_door.json", result)
                cycles: dict[str, dict[str, list[dict[str, float]]]] = {}
                if streams and stream_cycles > 0:
                    log(f"front_door: streams, {stream_cycles} cycles")
                    cycles["stream"] = rotating_streams(contenders, stream_cycles)
                    result.update(stream_cycles=stream_cycles, streams=cycles["stream"],
                                  summary=summarize(per, cycles), loadavg_after=loadavg())
                    write_json(RESULTS / "front_door.json", result)
                if streams and paced_cycles > 0:
                    log(f"front_door: paced streams, {paced_cycles} cycles")
                    cycles["paced"] = _paced(tmp, [k for k in kinds if k in PACED_KINDS],
                                             paced_cycles)
                    result.update(paced_cycles=paced_cycles, paced=cycles["paced"],
                                  summary=summarize(per, cycles), loadavg_after=loadavg())
                    write_json(RESULTS / "front_door.json", result)
        finally:
            server.stop()
    return result


class PacedUpstream(CorralFront):
    name, impl = "paced-upstream", "paced"


PACED_KINDS: list[Callable[[int], Contender]] = [Direct, CorralFront, HAProxy]


def _paced(tmp: Path, kinds: list[Callable[[int], Contender]], cycles: int
           ) -> dict[str, list[dict[str, float]]]:
    """``rotating_streams`` (``paced_*``) through each contender from the paced upstream
    (``bench.front_proxies`` ``paced``: a token every 10 ms after 30 ms, on a clock)."""
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(PacedUpstream(0).running(tmp))
        paced_dir = tmp / "paced"
        paced_dir.mkdir(exist_ok=True)
        contenders = [stack.enter_context(k(upstream.port).running(paced_dir)) for k in kinds]
        return rotating_streams(contenders, cycles, prefix="paced")


def _measure(c: Contender, seconds: float) -> dict[str, Any]:
    try:
        return one_round(c, seconds)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        log(f"front_door: {c.name} failed this round: {exc!r}")
        return {"error": repr(exc)}


def summarize(per: dict[str, list[dict[str, Any]]],
              cycles: dict[str, dict[str, list[dict[str, float]]]] | None = None
              ) -> dict[str, dict[str, float | None]]:
    """Medians over rounds (and stream cycles); "added" and "vs direct" pair each round or
    cycle with direct's same one (those where either lacks the figure are left out)."""
    def median(values: list[float], digits: int) -> float | None:
        return round(statistics.median(values), digits) if values else None

    def paired(runs: list[dict[str, Any]], direct: list[dict[str, Any]], key: str,
               op: Callable[[float, float], float], digits: int) -> float | None:
        return median([op(r[key], d[key]) for r, d in zip(runs, direct, strict=True)
                       if key in r and key in d], digits)

    out: dict[str, dict[str, float | None]] = {}
    phases = cycles or {}   # "stream" (llama-server), "paced": per contender, per cycle
    for name, runs in per.items():
        every = runs + [c for phase in phases.values() for c in phase.get(name, [])]
        keys = sorted({k for r in every for k in r if k != "error"})
        s = out[name] = {k: median([r[k] for r in every if k in r], 3) for k in keys}
        for conc in (1, 16):
            s[f"health_c{conc}_added_p50_ms"] = paired(
                runs, per["direct"], f"health_c{conc}_p50_ms", lambda a, b: a - b, 3)
        if "haproxy" in per:  # the goal: req/s against HAProxy's in the same round
            s["health_c16_rps_vs_haproxy"] = paired(
                runs, per["haproxy"], "health_c16_rps", lambda a, b: a / b, 4)
        for prefix, phase in phases.items():
            if name not in phase:
                continue
            for conc in (1, 4):
                s[f"{prefix}_c{conc}_tok_s_vs_direct"] = paired(
                    phase[name], phase["direct"], f"{prefix}_c{conc}_tok_s",
                    lambda a, b: a / b, 4)
                s[f"{prefix}_c{conc}_ttft_added_ms"] = paired(
                    phase[name], phase["direct"], f"{prefix}_c{conc}_ttft_ms",
                    lambda a, b: a - b, 2)
        s["failed_rounds"] = sum(1 for r in runs if "error" in r)
    return out


def _model_args() -> list[str]:
    from scripts.llama_paths import model

    return ["--model", str(model())]


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    s = r["summary"]
    out = [("", "  ".join(f"{n:>14}" for n in s))]

    def line(label: str, key: str, fmt: str) -> None:
        cells = (s[n].get(key) for n in s)
        out.append((label, "  ".join(f"{'-' if v is None else format(v, fmt):>14}"
                                     for v in cells)))

    line("/health c=1 p50 ms", "health_c1_p50_ms", ".3f")
    line("/health c=1 added p50 ms", "health_c1_added_p50_ms", "+.3f")
    line("/health c=1 p99 ms", "health_c1_p99_ms", ".3f")
    line("/health c=1 req/s", "health_c1_rps", ".0f")
    line("/health c=16 p50 ms", "health_c16_p50_ms", ".3f")
    line("/health c=16 added p50 ms", "health_c16_added_p50_ms", "+.3f")
    line("/health c=16 p99 ms", "health_c16_p99_ms", ".3f")
    line("/health c=16 req/s", "health_c16_rps", ".0f")
    line("/health c=16 req/s vs HAProxy", "health_c16_rps_vs_haproxy", ".1%")
    line("/health c=16 proxy CPU us/request", "health_c16_cpu_us_per_req", ".1f")
    for prefix, what in (("stream", "stream"), ("paced", "paced stream")):
        for conc in (1, 4):
            if all(v.get(f"{prefix}_c{conc}_tok_s") is None for v in s.values()):
                continue
            key = f"{prefix}_c{conc}"
            line(f"{what} c={conc} first token ms", f"{key}_ttft_ms", ".2f")
            line(f"{what} c={conc} first token added ms", f"{key}_ttft_added_ms", "+.2f")
            line(f"{what} c={conc} tokens/s", f"{key}_tok_s", ".1f")
            line(f"{what} c={conc} tokens/s vs direct", f"{key}_tok_s_vs_direct", ".1%")
    line("failed rounds", "failed_rounds", "d")
    return out


def main() -> int:
    return cli(__doc__, run, rows, lambda r: f"Front door cost (medians of {r['rounds']} "
               f"interleaved rounds, {r['seconds']:g} s of wrk each; streams: "
               f"{r['stream_cycles']} rotating cycles)",
               rounds=3, seconds=3.0, alternatives=False, streams=True, stream_cycles=8,
               paced_cycles=30, budget_s=900.0)


if __name__ == "__main__":
    raise SystemExit(main())
