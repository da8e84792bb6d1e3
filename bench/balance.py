"""One endpoint for a fleet: a stop-first rollout through HAProxy, with ``corral balance``
and with the static backend people write by hand (issue 20).

Each setup: a private etcd, HAProxy 2.6 on loopback ports, three ``corral supervise`` of the
fake llama-server (``--listen``, ``--swap stop-first``, a 2 s model load, ``--canary-seconds
0.5``), 4 client threads through HAProxy (in turn ``POST /completion`` (50 ms) and
``GET /v1/models``), then an ``etcdctl put`` of a new config; the rollout ends when its
record says done and all three run. Both backends have the same health checks
(``option httpchk GET /health``, ``inter 300 fastinter 100 downinter 200 rise 1 fall 2``),
``retries 2``, ``option redispatch`` and ``retry-on conn-failure empty-response
response-timeout``.

- ``static``: the three front doors listed in haproxy.cfg (no balancer);
- ``balance``: an empty backend filled by ``corral balance``, which drains each host
  before it applies.

Figures: requests and failures during the rollout, p99 before it (3 s of load), p99 and the
worst request during it, requests per second during / before, and after the rollout the
time from a host's SIGKILL to HAProxy marking it down (health checks) and, with the
balancer, to its server being deleted (the lease TTL, 5 s). Goals: 0 failed; worst <= 2 x
p99 before; rate during >= 2/3 of before.

    .venv/bin/python -m bench.balance
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.report import cli, log, merge_into_latest
from bench.supervisors import temp_dir
from tests.fixtures_etcd import EtcdServer, etcd_binary, reaped
from tests.fleet_helpers import etcd_args, phase, put_config
from tests.haproxy_helpers import CHECK, Clients, HAProxy, balancer, haproxy, p99
from tests.harness import FAKE, free_port, make_fake_model, supervisor
from tests.waiting import wait_for

LOAD_S = 2.0


def run(rounds: int = 1) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for setup in ("static", "balance"):
        runs = [_one(setup) for _ in range(rounds)]
        results[setup] = runs[-1] if rounds == 1 else {"runs": runs, **runs[-1]}
    merge_into_latest("balance", results)
    return results


def _one(setup: str) -> dict[str, Any]:
    log(f"balance: {setup} backend")
    with temp_dir("balance") as tmp, ExitStack() as stack:
        etcd = EtcdServer(etcd_binary(), Path(tmp) / "etcd-data")
        etcd.start()
        stack.enter_context(reaped(etcd))
        model = make_fake_model(Path(tmp) / "a.gguf")
        listens = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        static = ([f"server s{i} {addr} {CHECK}" for i, addr in enumerate(listens)]
                  if setup == "static" else [])
        h = stack.enter_context(haproxy(Path(tmp), static=static))
        if setup == "balance":
            stack.enter_context(balancer(Path(tmp), etcd, h))
        sups = []
        for i, listen in enumerate(listens):
            d = Path(tmp) / f"s{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, FAKE, model, store_args=etcd_args(etcd, canary_s=0.5),
                extra_cli=["--listen", listen, "--swap", "stop-first"])))
        for s in sups:
            s.wait_running()
        wait_for(lambda: _up(h) == 3, 30, "three servers up")
        with Clients(h.url) as clients:
            before = time.monotonic()
            wait_for(lambda: time.monotonic() - before >= 3, 10, "3 s of load", interval=0.1)
            begin = time.monotonic()
            put_config(etcd, [["--model", str(model)], ["--fake-load-s", str(LOAD_S)]])
            wait_for(lambda: phase(etcd, "done") and all(
                s.status()["state"] == "RUNNING" for s in sups), 120, "rollout done",
                interval=0.05)
            end = time.monotonic()
        wait_for(lambda: _up(h) == 3, 30, "three servers up again")
        death = _kill_one(sups[0], h, setup)
    warm = [s.end - s.start for s in clients.between(before, begin) if s.ok]
    during = clients.between(begin, end)
    lat = [s.end - s.start for s in during]
    return {"requests": len(during), "failed": sum(not s.ok for s in during),
            "rollout_s": round(end - begin, 2), "p99_before_ms": round(p99(warm) * 1000, 1),
            "p99_during_ms": round(p99(lat) * 1000, 1),
            "worst_during_ms": round(max(lat) * 1000, 1),
            "rate_before": round(len(warm) / (begin - before), 1),
            "rate_during": round(len(during) / (end - begin), 1), **death}


def _up(h: HAProxy) -> int:
    return sum(1 for s in h.servers().values() if s.op == 2 and s.admin == 0)


def _kill_one(sup: Any, h: HAProxy, setup: str) -> dict[str, float | None]:
    listen = sup.cmd[sup.cmd.index("--listen") + 1]
    port = int(listen.rsplit(":", 1)[1])

    def server() -> Any:
        return next((s for s in h.servers().values() if s.port == port), None)

    sup.kill()
    killed = time.monotonic()
    wait_for(lambda: (s := server()) is None or s.op != 2, 30, "the dead host marked down",
             interval=0.01)
    down = time.monotonic() - killed
    removed = None
    if setup == "balance":
        wait_for(lambda: server() is None, 30, "the dead host deleted", interval=0.05)
        removed = round(time.monotonic() - killed, 2)
    return {"death_to_down_s": round(down, 2), "death_to_removed_s": removed}


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for setup, words in (("static", "static backend (by hand)"),
                         ("balance", "corral balance (drain first)")):
        x = r[setup]
        removed = (f", removed {x['death_to_removed_s']:.1f} s"
                   if x.get("death_to_removed_s") is not None else "")
        out.append((words, f"{x['failed']}/{x['requests']} failed, p99 before "
                    f"{x['p99_before_ms']:.0f} ms, during {x['p99_during_ms']:.0f} ms, worst "
                    f"{x['worst_during_ms']:.0f} ms; {x['rate_during']:.0f}/"
                    f"{x['rate_before']:.0f} req/s during/before; death -> down "
                    f"{x['death_to_down_s']:.2f} s{removed}"))
    return out


def main() -> int:
    return cli(__doc__ or "", run, rows, "one endpoint: a rollout through HAProxy", rounds=1)


if __name__ == "__main__":
    raise SystemExit(main())
