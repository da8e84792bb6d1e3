"""Text for people: ``corral status``, ``history``, ``events`` and ``logs`` as a terminal
shows them (the JSON the API answers stays available with ``--json``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["duration", "render_event", "render_history", "render_line", "render_models",
           "render_status"]


def duration(seconds: float | None) -> str:
    """``3d 4h``, ``1h 02m``, ``5m 07s``, ``12.3s``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{seconds:.1f}s"


def clock(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "--:--:--"
    return dt.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


def stamp(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _scalars(view: dict[str, Any]) -> str:
    """``key value, key value`` for the plain values of a dict (nested ones summarised)."""
    parts = []
    for key, value in view.items():
        if value is None or value == {} or value == []:
            continue
        if isinstance(value, dict):
            inner = _scalars(value)
            parts.append(f"{key} ({inner})" if inner else key)
        elif isinstance(value, list):
            parts.append(f"{key} {len(value)}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def render_models(s: dict[str, Any]) -> str:
    """``corral serve``'s ``/v1/status`` like ``ollama ps``: one line per model."""
    head = ("MODEL", "STATE", "PID", "MEMORY", "IDLE", "IN FLIGHT", "HELD", "LOADS")
    rows = [head]
    for m in s.get("models") or []:
        memory = m.get("memory_mib")
        rows.append((
            str(m.get("id")), str(m.get("state")), str(m.get("pid") or "-"),
            f"{memory / 1024:.1f} GiB" if isinstance(memory, int | float) else "-",
            duration(m.get("idle_s")) if m.get("idle_s") is not None else "-",
            str(m.get("in_flight", 0)), str(m.get("held", 0)), str(m.get("loads", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    for m in s.get("models") or []:
        if m.get("reason"):
            lines.append(f"{m.get('id')}: {m['reason']}")
    return "\n".join(lines)


def render_status(s: dict[str, Any]) -> str:
    """``/v1/status`` as a few aligned lines (a table of models for ``corral serve``)."""
    if "models" in s and "state" not in s:
        return render_models(s)
    config = s.get("config") or {}
    args = config.get("args") or {}
    model = args.get("--model") or args.get("-m") or args.get("--hf-repo") or "-"
    state = str(s.get("state", "?"))
    running = []
    if s.get("pid"):
        running.append(f"pid {s['pid']}")
    if s.get("generation"):
        running.append(f"generation {s['generation']}")
    if s.get("uptime_s") is not None:
        running.append(f"up {duration(s['uptime_s'])}")
    if s.get("retry_in_s") is not None:
        running.append(f"retry in {duration(s['retry_in_s'])}")
    rows: list[tuple[str, str]] = [
        ("state", state + (f" ({', '.join(running)})" if running else "")),
        ("name", str(s.get("name", "-"))),
        ("model", str(model)),
        ("port", str(s.get("port", "-"))),
        ("restarts", f"{s.get('restarts', 0)} (failed starts in a row: "
                     f"{s.get('consecutive_failures', 0)})"),
        ("last error", str(s.get("last_error") or "-")),
    ]
    if s.get("pending_changes"):
        rows.append(("pending", f"{s['pending_changes']} change(s)"))
    if s.get("last_strategy"):
        rows.append(("last apply", str(s["last_strategy"])))
    candidate = s.get("candidate")
    if isinstance(candidate, dict):
        rows.append(("candidate", f"pid {candidate.get('pid')} on port "
                                  f"{candidate.get('port')}, loading"))
    store = str(s.get("store", "-"))
    if s.get("store_connected") is False:
        store += " (UNREACHABLE)"
    rows.append(("store", store))
    front = s.get("front")
    rows.append(("front door", _scalars(front) if isinstance(front, dict) else "off"))
    fleet = s.get("fleet")
    if isinstance(fleet, dict):
        rollout = fleet.get("rollout")
        rest = {k: v for k, v in fleet.items() if k != "rollout"}
        rows.append(("fleet", _scalars(rest) or "yes"))
        if isinstance(rollout, dict):
            rows.append(("rollout", _scalars(rollout) or "-"))
    memory = s.get("memory")
    if isinstance(memory, dict):
        rows.append(("memory", _scalars(memory)))
    rows.append(("command", " ".join(str(a) for a in config.get("argv") or []) or "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _diff_text(diff: Any) -> str:
    if not isinstance(diff, dict) or not diff:
        return "no change"
    parts = []
    for key, pair in diff.items():
        if isinstance(pair, list) and len(pair) == 2:
            before, after = ("-" if v is None else v for v in pair)
            parts.append(f"{key} {before} -> {after}")
    return ", ".join(parts)


def render_history(entries: list[dict[str, Any]]) -> str:
    """The change history, newest first, one entry per line (an error on its own line)."""
    if not entries:
        return "no changes recorded"
    out = []
    for e in entries:
        who = " ".join(str(x) for x in (e.get("source"), e.get("client")) if x)
        took = e.get("duration_s")
        line = (f"{stamp(e.get('time'))}  {e.get('id') or '-':<5} {e.get('outcome') or '?':<11} "
                f"{who:<20} {_diff_text(e.get('diff'))}")
        extra = [str(e["strategy"])] if e.get("strategy") else []
        if isinstance(took, int | float) and took:
            extra.append(f"{took:.1f}s")
        if extra:
            line += f"  [{', '.join(extra)}]"
        out.append(line)
        if e.get("error"):
            out.append(f"{'':21}{e['error']}")
    return "\n".join(out)


def render_event(e: dict[str, Any]) -> str:
    """One event as a line: time, id, kind and what it says."""
    kind = str(e.get("kind", "?"))
    if kind == "state":
        what = f"{e.get('from')} -> {e.get('to')}" + (f": {e['error']}" if e.get("error")
                                                      else "")
    elif kind == "change":
        what = f"{e.get('change')} {e.get('outcome')} ({e.get('source')})"
        if e.get("error"):
            what += f": {e['error']}"
    elif kind == "crash":
        what = f"llama-server {e.get('pid')} {e.get('reason')}, code {e.get('code')}"
    elif kind == "ready":
        what = f"llama-server {e.get('pid')} ready in {e.get('load_s')}s ({e.get('slot')})"
    else:
        skip = {"id", "time", "kind", "before", "after"}
        what = _scalars({k: v for k, v in e.items() if k not in skip})
    return f"{clock(e.get('time'))} #{e.get('id')} {kind} {what}"


def render_line(line: dict[str, Any]) -> str:
    return f"[{line.get('source', '?')}] {line.get('text', '')}"
