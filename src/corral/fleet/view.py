"""``corral fleet``: the fleet config of a name, its rollout, and who runs what, from etcd."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from corral.core.rollout import MaxUnavailable, Rollout
from corral.fleet.drain import DrainKeys
from corral.fleet.keys import FleetKeys, digest_of
from corral.fleet.records import split_slots
from corral.store.etcd import EtcdStore, KeyValue
from corral.store.etcd.codec import decode_config
from corral.store.etcd.wire import Op
from corral.store.factory import DriverSpec
from corral.supervisor.changes import config_json

__all__ = ["fleet_report", "render_table"]


async def fleet_report(spec: DriverSpec, name: str) -> dict[str, Any]:
    assert spec.addr, "an etcd spec names an address"
    store = EtcdStore.connect(spec.addr, **spec.etcd_options())
    keys = FleetKeys.of(store, name)
    try:
        drains = DrainKeys(keys)
        found = await store.client.txn([], [Op.get(keys.config), Op.get(keys.rollout),
                                            Op.get(keys.slots, prefix=True),
                                            Op.get(drains.balancers, prefix=True),
                                            Op.get(drains.drains, prefix=True)])
        instances = await store.list_instances(name)
    finally:
        await store.close()
    config_kv = found.ranges[0].kvs[0] if found.ranges[0].kvs else None
    stored = decode_config(config_kv.value, config_kv.key) if config_kv else None
    fleet = config_json(stored.config) if stored else None
    digest = digest_of(stored.config) if stored else None
    rollout = None
    if found.ranges[1].kvs:
        record = Rollout.from_json(json.loads(found.ranges[1].kvs[0].value))
        rollout = {k: v for k, v in record.to_json().items() if k not in ("config", "good")}
        rollout["current"] = record.digest == digest
        holders = [kv.value.decode() for kv in sorted(found.ranges[2].kvs,
                                                      key=lambda kv: kv.create_revision)]
        limits = {str(i.get("max_unavailable")) for i in instances.values()} - {"None"}
        limit = MaxUnavailable.parse(sorted(limits)[0]) if limits else MaxUnavailable()
        rollout.update(split_slots(holders, limit, len(instances)))
        if len(limits) > 1:
            rollout["warning"] = (f"instances disagree on --max-unavailable "
                                  f"({', '.join(sorted(limits))}): a fleet runs with one value")
    balancing = balancer_states(drains, [kv for r in found.ranges[3:] for kv in r.kvs])
    rows = []
    for instance_id, info in sorted(instances.items()):
        runs = info.get("config")
        rows.append({"instance": instance_id, **{k: info.get(k) for k in (
            "host", "supervisor", "port", "state", "pid", "divergence")},
            "balancer": balancing(instance_id),
            "runs_fleet_config": fleet is not None and isinstance(runs, dict)
            and runs.get("binary") == fleet["binary"] and runs.get("args") == fleet["args"]})
    return {"name": name, "fleet_config": fleet,
            "revision": config_kv.mod_revision if config_kv else None,
            "applied_at": stored.applied_at if stored else None,
            "applied_by": stored.applied_by if stored else None,
            "rollout": rollout, "instances": rows}


def balancer_states(drains: DrainKeys, kvs: list[KeyValue]) -> Callable[[str], str | None]:
    """Instance -> what the balancers say of it (None: no balancer runs): its HAProxy
    server's state per balancer, and whether it asked to be drained."""
    by_key = {kv.key: kv for kv in kvs}
    reports = []
    for key, kv in by_key.items():
        if drains.fleet.member(key, drains.balancers) is not None:
            with contextlib.suppress(ValueError, AttributeError):
                reports.append(dict(json.loads(kv.value).get("servers") or {}))
    asked = set(drains.requests(by_key))

    def words(instance: str) -> str | None:
        if not reports:
            return None
        seen = sorted({str(r.get(instance, "absent")) for r in reports})
        return ("drain asked; " if instance in asked else "") + "/".join(seen)

    return words


def _rollout_line(report: dict[str, Any]) -> str:
    r = report.get("rollout")
    if not r:
        return "  rollout: none recorded"
    live = len(report["instances"])
    done = sum(1 for p in r["progress"].values() if p == "done")
    line = (f"  rollout of revision {r['revision']}: {r['phase'].upper()}, {done} done "
            f"({live} live), canary {r['canary'] or '-'}")
    if r["phase"] == "failed":
        line += f"\n  failed: {r['reason']}; the config went back to revision " \
                f"{r['good_revision'] or '(the one before)'}"
    failures = {i: why for i, why in r["reasons"].items() if r["phase"] != "failed"}
    for instance, why in failures.items():
        line += f"\n  {instance} failed: {why}"
    if r.get("applying"):
        line += f"\n  applying now (holding a slot): {', '.join(r['applying'])}"
    if r.get("queued"):
        line += f"\n  waiting for a slot: {', '.join(r['queued'])}"
    if r.get("warning"):
        line += f"\n  WARNING: {r['warning']}"
    return line


def render_table(report: dict[str, Any]) -> str:
    fleet = report["fleet_config"]
    lines = [f"fleet {report['name']!r}: "
             + (" ".join(fleet["argv"]) if fleet else "(no config stored)"),
             f"  revision {report['revision'] or '-'}, " + (
                 f"applied {report['applied_at'] or '-'} by {report['applied_by']}"
                 if report["applied_by"] else "written directly (etcdctl)"),
             _rollout_line(report), ""]
    header = ("INSTANCE", "SUPERVISOR", "PORT", "STATE", "PID", "FLEET CONFIG", "HAPROXY")
    rows = [header] + [(r["instance"], str(r["supervisor"]), str(r["port"]), str(r["state"]),
                        str(r["pid"]), "yes" if r["runs_fleet_config"] else
                        f"NO {r['divergence'] or ''}".strip(), r.get("balancer") or "-")
                       for r in report["instances"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines.append(f"\n{len(report['instances'])} instance(s)")
    return "\n".join(lines)
