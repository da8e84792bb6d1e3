"""``corral fleet``: the fleet config of a name and who runs it, read from etcd."""

from __future__ import annotations

from typing import Any

from corral.changes import config_json
from corral.store.etcd import EtcdStore


async def fleet_report(addr: str, name: str) -> dict[str, Any]:
    store = EtcdStore(addr)
    try:
        stored = await store.load(name)
        instances = await store.list_instances(name)
    finally:
        await store.close()
    fleet = config_json(stored.config) if stored else None
    rows = []
    for instance_id, info in sorted(instances.items()):
        runs = info.get("config")
        rows.append({"instance": instance_id, **{k: info.get(k) for k in (
            "host", "supervisor", "port", "state", "pid", "divergence")},
            "runs_fleet_config": fleet is not None and isinstance(runs, dict)
            and runs.get("binary") == fleet["binary"] and runs.get("args") == fleet["args"]})
    return {"name": name, "fleet_config": fleet,
            "applied_at": stored.applied_at if stored else None,
            "applied_by": stored.applied_by if stored else None, "instances": rows}


def render_table(report: dict[str, Any]) -> str:
    fleet = report["fleet_config"]
    lines = [f"fleet {report['name']!r}: "
             + (" ".join(fleet["argv"]) if fleet else "(no config stored)"),
             f"  applied {report['applied_at'] or '-'} by {report['applied_by'] or '-'}", ""]
    header = ("INSTANCE", "SUPERVISOR", "PORT", "STATE", "PID", "FLEET CONFIG")
    rows = [header] + [(r["instance"], str(r["supervisor"]), str(r["port"]), str(r["state"]),
                        str(r["pid"]), "yes" if r["runs_fleet_config"] else
                        f"NO {r['divergence'] or ''}".strip()) for r in report["instances"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines.append(f"\n{len(report['instances'])} instance(s)")
    return "\n".join(lines)
