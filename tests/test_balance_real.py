"""``corral balance`` in front of the real llama-server (issue 20): a stop-first rollout of
three supervisors behind a real HAProxy under 4 clients loses nothing."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import etcd_args, phase
from tests.haproxy_helpers import Clients, balancer, haproxy, p99
from tests.harness import free_port, supervisor
from tests.waiting import wait_for

pytestmark = [pytest.mark.etcd, pytest.mark.real, pytest.mark.slow]

BY_HAND_WORST_S = 11.95  # issue 20: the same rollout behind a static HAProxy backend


@pytest.mark.timing  # measures request latencies during a rollout: run alone
def test_real_rollout_through_haproxy_loses_nothing(
        tmp_path: Path, etcd_server: EtcdServer, real_binary: Path, real_model: Path,
        model_alias) -> None:  # type: ignore[no-untyped-def]
    """Three supervisors of the real llama-server (--listen, stop-first) behind HAProxy and
    corral balance, 4 clients (completions, streams, /v1/models): an etcdctl put rolls out
    with 0 failed requests, and the worst request within 2x the p99 before it."""
    other = model_alias("balance-b")
    with ExitStack() as stack:
        h = stack.enter_context(haproxy(tmp_path))
        stack.enter_context(balancer(tmp_path, etcd_server, h, name="real"))
        sups = []
        for i in range(3):
            d = tmp_path / f"r{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, real_binary, real_model, store_args=etcd_args(etcd_server, "real",
                                                                 canary_s=1.0),
                extra_cli=["--listen", f"127.0.0.1:{free_port()}", "--swap", "stop-first"])))
        for s in sups:
            s.wait_running(120)
        wait_for(lambda: len([s for s in h.ours().values() if s.op == 2 and s.admin == 0])
                 == 3, 30, "three servers up", explain=lambda: h.ask("show servers state"))
        with Clients(h.url) as clients:
            wait_for(lambda: len(clients.sent) >= 30, 60, "traffic before the rollout")
            before = time.monotonic()
            wait_for(lambda: time.monotonic() - before >= 5, 10, "5 s of load", interval=0.1)
            begin = time.monotonic()
            etcd_server.etcdctl("put", "/corral/configs/real", json.dumps(
                {"binary": str(real_binary), "args": [["--model", str(other)]]}))
            wait_for(lambda: phase(etcd_server, "done", "real") and all(
                s.status()["state"] == "RUNNING" for s in sups), 240, "rollout done")
            end = time.monotonic()
        for s in sups:
            assert s.status()["config"]["args"]["--model"] == str(other)
    warm = [s.end - s.start for s in clients.between(before, begin) if s.ok]
    during = clients.between(begin, end)
    worst = max(s.end - s.start for s in during)
    failed = [s for s in during if not s.ok]
    print(f"\nreal llama-server, rollout through HAProxy + corral balance: {len(during)} "
          f"requests in {end - begin:.1f} s, {len(failed)} failed; p99 before "
          f"{p99(warm):.2f} s, worst during {worst:.2f} s (by hand: {BY_HAND_WORST_S} s)")
    print(f"p99 during {p99([s.end - s.start for s in during]):.2f} s; load average "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    assert not failed
    # The goal: no request waits for a model load, so the worst stays within 2x
    # the p99 before (on a busy machine both are large: CPU, not holding, makes them).
    assert worst <= 2 * p99(warm) + 0.5
