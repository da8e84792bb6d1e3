"""Memory estimates against what llama-server really takes, and what an estimate costs.

For the test model at ``-c`` 2048, 8192, 32768 and ``-np`` 1 and 4: the estimate of each
method (``llama-fit-params``; the GGUF-metadata fallback), the buffers llama-server itself
logs at load (model, KV cache, compute + output; ``-lv 4``), its RSS split into anonymous and
file-backed (``/proc/<pid>/status``, after it is ready and has served one request), and how
long an estimate takes cold (a fresh cache) and cached. The goal is against the logged
buffers: never under them by more than 10 %, and a cached estimate in <= 5 ms.

    .venv/bin/python -m bench.fit
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from bench.report import cli, log
from bench.supervisors import temp_dir
from corral.child.process import death_signal_prefix
from corral.core.args import LlamaConfig
from corral.core.fit import Estimate
from corral.sense.estimate import Estimator
from tests.harness import end_process, free_port, wait_for

CONTEXTS = (2048, 8192, 32768)
SLOTS = (1, 4)
_BUFFER = re.compile(r"(\S+) +(model|KV|compute|output) buffer size = +([\d.]+) MiB")


def _paths() -> tuple[Path, Path]:
    from scripts.llama_paths import llama_server, model

    return llama_server(), model()


async def _timed(est: Estimator, config: LlamaConfig) -> tuple[Estimate | None, float, float]:
    t = time.perf_counter()
    e = await est.estimate(config)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    await est.estimate(config)
    return e, cold, time.perf_counter() - t


def _estimates(config: LlamaConfig) -> dict[str, Any]:
    out = {}
    for name, est in (("llama-fit-params", Estimator()), ("gguf", Estimator(fit_params=""))):
        e, cold, cached = asyncio.run(_timed(est, config))
        assert e is not None, name
        h = e.host()
        out[name] = {"model": h.model_mib, "context": h.context_mib, "compute": h.compute_mib,
                     "total": round(e.total_mib, 1), "cold_ms": round(cold * 1000, 1),
                     "cached_ms": round(cached * 1000, 3)}
    return out


def _logged_buffers(text: str) -> dict[str, float]:
    sums = {"model": 0.0, "context": 0.0, "compute": 0.0}
    for _, kind, mib in _BUFFER.findall(text):
        key = {"model": "model", "KV": "context"}.get(kind, "compute")
        sums[key] += float(mib)
    sums["total"] = round(sum(sums.values()), 1)
    return {k: round(v, 1) for k, v in sums.items()}


def _rss(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _measure(binary: Path, model: Path, ctx: int, np_: int, tmp: Path) -> dict[str, Any]:
    port = free_port()
    out = tmp / f"llama-{ctx}-{np_}.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen([*death_signal_prefix(), str(binary), "-m", str(model),
                                 "-c", str(ctx), "-np", str(np_), "--port", str(port),
                                 "-lv", "4"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120,
                 "llama-server ready")
        httpx.post(f"{url}/completion", json={"prompt": "Hi", "n_predict": 4}, timeout=60)
        rss = _rss(proc.pid)
    finally:
        end_process(proc, 30)
    return {"logged": _logged_buffers(out.read_text(errors="replace")), "rss": rss}


def run() -> dict[str, Any]:
    binary, model = _paths()
    rows = []
    with temp_dir("corral-bench-fit") as tmp:
        for ctx in CONTEXTS:
            for np_ in SLOTS:
                log(f"fit: -c {ctx} -np {np_}")
                config = LlamaConfig(str(binary), (("--model", str(model)),
                                                   ("--ctx-size", str(ctx)),
                                                   ("--parallel", str(np_))))
                rows.append({"ctx": ctx, "np": np_, "estimate": _estimates(config),
                             **_measure(binary, model, ctx, np_, tmp)})
    return {"configs": rows}


def _ratio(est: dict[str, Any], logged: dict[str, Any]) -> str:
    return f"{est['total'] / logged['total']:.2f}x" if logged["total"] else "?"


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("-c / -np", "fit-params | gguf | logged buffers (model+KV+compute) | RSS anon+file"
            " | fit-params cold/cached | gguf cold/cached")]
    for c in r["configs"]:
        f, g, lg, rss = c["estimate"]["llama-fit-params"], c["estimate"]["gguf"], \
            c["logged"], c["rss"]
        out.append((f"{c['ctx']} / {c['np']}",
                    f"{f['total']:.0f} ({_ratio(f, lg)}) | {g['total']:.0f} ({_ratio(g, lg)}) | "
                    f"{lg['total']:.0f} ({lg['model']:.0f}+{lg['context']:.0f}+"
                    f"{lg['compute']:.0f}) | {rss.get('RssAnon', 0):.0f}+"
                    f"{rss.get('RssFile', 0):.0f} | {f['cold_ms']:.0f}/{f['cached_ms']:.2f} ms"
                    f" | {g['cold_ms']:.0f}/{g['cached_ms']:.2f} ms"))
    return out


def main() -> int:
    return cli(__doc__, run, rows, "memory estimates vs llama-server (MiB)")


if __name__ == "__main__":
    raise SystemExit(main())
