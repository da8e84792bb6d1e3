"""Issue 18 on a real etcd: a write that comes right after the previous one is never lost.

Three supervisors (``--local-port --swap stop-first --max-unavailable 1``) share a config.
The operator puts A; the moment every instance serves A (its llama-server runs A's command
line and answers /health, as ``/props`` showed the reporter), or as soon as one does
(mid-roll), the operator puts B, good or failing. The fleet must end on B, or if B fails on
its canary, on what every instance ran when B was written: A after "all applied", the
config before A in mid-roll. First with the fake llama-server, then with the real one,
probing that never fewer than two serve.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.fixtures_etcd import EtcdServer
from tests.fleet_helpers import etcd_args, probing
from tests.harness import (
    FAKE,
    SupervisorProcess,
    corrupt_gguf,
    make_fake_model,
    props,
    supervisor,
    wait_for,
)

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

NAME = "writes"


def record(etcd: EtcdServer) -> dict[str, Any] | None:
    out = etcd.etcdctl("get", f"/corral/rollouts/{NAME}", "--print-value-only").strip()
    return json.loads(out) if out else None


def key(etcd: EtcdServer) -> tuple[int, dict[str, Any]]:
    """The config key's mod_revision and value."""
    out = json.loads(etcd.etcdctl("get", f"/corral/configs/{NAME}", "-w", "json"))
    kv = out["kvs"][0]
    return int(kv["mod_revision"]), json.loads(base64.b64decode(kv["value"]))


def put(etcd: EtcdServer, binary: Path, args: list[list[str]]) -> int:
    etcd.etcdctl("put", f"/corral/configs/{NAME}",
                 json.dumps({"binary": str(binary), "args": args}))
    return key(etcd)[0]


Marker = str | Callable[[str], bool]


def serves(sup: SupervisorProcess, marker: Marker) -> bool:
    """Its llama-server runs a command line with ``marker`` in it (or that ``marker`` says
    yes to) and answers /health."""
    try:
        argv = " ".join(psutil.Process(sup.llama_pid()).cmdline())
        if not (marker(argv) if callable(marker) else marker in argv):
            return False
        return httpx.get(f"http://127.0.0.1:{sup.port}/health", timeout=1).status_code == 200
    except (psutil.Error, httpx.HTTPError, AssertionError, KeyError):
        return False


@contextmanager
def fleet(tmp_path: Path, etcd: EtcdServer, binary: Path, model: Path,
          ready_s: float = 30) -> Iterator[list[SupervisorProcess]]:
    with ExitStack() as stack:
        sups = []
        for i in range(3):
            d = tmp_path / f"w{i}"
            d.mkdir()
            sups.append(stack.enter_context(supervisor(
                d, binary, model, store_args=etcd_args(etcd, NAME, canary_s=1.0),
                extra_cli=["--swap", "stop-first", "--max-unavailable", "1"])))
        for s in sups:
            s.wait_running(ready_s)
        wait_for(lambda: (r := record(etcd)) and r["phase"] == "done"
                 and len(r["progress"]) == 3, 30, "the boot config stored, all in sync")
        yield sups


def settled(etcd: EtcdServer, sups: list[SupervisorProcess], marker: Marker,
            timeout: float) -> dict[str, Any]:
    """Until the record of the key's revision (or of the failed write the key went back
    from) ended and every instance serves ``marker``; returns the record."""
    def ended() -> dict[str, Any] | None:
        r = record(etcd)
        if r is None or r["phase"] not in ("done", "failed"):
            return None
        revision, _ = key(etcd)
        ok = (r["phase"] == "done" and r["revision"] == revision) or \
            (r["phase"] == "failed" and r["revision"] < revision)
        return r if ok and all(serves(s, marker) for s in sups) else None

    result: dict[str, Any] = wait_for(ended, timeout, f"the fleet at rest on {marker}")
    return result


def run_sequence(etcd: EtcdServer, sups: list[SupervisorProcess], binary: Path,
                 a: list[list[str]], a_marker: str, b: list[list[str]], moment: str,
                 timeout: float) -> int:
    """Put A; at ``moment`` ("all-applied" or "mid-roll") put B; returns B's revision."""
    put(etcd, binary, a)
    if moment == "all-applied":
        wait_for(lambda: all(serves(s, a_marker) for s in sups), timeout, "all serve A")
    else:
        wait_for(lambda: any(serves(s, a_marker) for s in sups), timeout, "one serves A")
    return put(etcd, binary, b)


@pytest.mark.parametrize("moment", ["all-applied", "mid-roll"])
@pytest.mark.parametrize("second", ["good", "failing"])
def test_a_second_write_is_never_lost_fake(tmp_path: Path, etcd_server: EtcdServer,
                                           moment: str, second: str) -> None:
    """Put A, then B at once (all applied, or mid-roll): B rolls out, or fails on its canary
    alone and the key goes back to what everyone ran when B was written."""
    model = make_fake_model(tmp_path / "a.gguf")
    a = [["--model", str(model)], ["--parallel", "2"], ["--fake-load-s", "0.3"]]
    b = [["--model", str(model)], ["--parallel", "3"]]
    if second == "failing":
        b.append(["--fake-exit-at-start", "3"])
    with fleet(tmp_path, etcd_server, FAKE, model) as sups:
        before = key(etcd_server)[1]
        b_revision = run_sequence(etcd_server, sups, FAKE, a, "--parallel 2", b, moment, 60)
        if second == "good":
            done = settled(etcd_server, sups, "--parallel 3", 60)
            assert done["phase"] == "done" and done["revision"] == b_revision
            assert key(etcd_server)[1]["args"] == b
            return
        back_to = a if moment == "all-applied" else before["args"]
        # Mid-roll, the key goes back to the boot config, which every config here contains
        # the model of: the fleet is at rest once nobody runs A (or B) any more.
        marker: Marker = ("--parallel 2" if moment == "all-applied"
                          else lambda argv: "--parallel" not in argv)
        final = settled(etcd_server, sups, marker, 60)
        assert final["revision"] >= b_revision
        failed = wait_for(lambda: _failed_record_of(etcd_server, b_revision), 5,
                          "B's failure on record")
        assert key(etcd_server)[1]["args"] == back_to, (key(etcd_server), failed)
        assert sum(s.started_with("--fake-exit-at-start") for s in sups) == 1
        running = [" ".join(psutil.Process(s.llama_pid()).cmdline()) for s in sups]
        assert all(("--parallel 2" in argv) == (moment == "all-applied") for argv in running)


def _failed_record_of(etcd: EtcdServer, revision: int) -> dict[str, Any] | None:
    """The record as it is, if it is B's and failed, or a later one whose revert says so."""
    r = record(etcd)
    return r if r is not None and r["revision"] >= revision else None


@pytest.mark.real
@pytest.mark.timing  # probes every 50 ms: run alone
@pytest.mark.parametrize(("moment", "second"), [("all-applied", "failing"),
                                                ("all-applied", "good"),
                                                ("mid-roll", "failing")])
def test_a_second_write_is_never_lost_real(
        tmp_path: Path, etcd_server: EtcdServer, real_binary: Path, real_model: Path,
        model_alias, moment: str, second: str) -> None:  # type: ignore[no-untyped-def]
    """The same with the real llama-server: the fleet ends on the right config with the
    right record, and at no probe do fewer than two llama-servers serve."""
    foo = model_alias("writes-foo")
    other = model_alias("writes-bar")
    bad = corrupt_gguf(tmp_path, real_model)
    a = [["--model", str(foo)]]
    b = [["--model", str(other if second == "good" else bad)]]
    with fleet(tmp_path, etcd_server, real_binary, real_model, ready_s=120) as sups:
        before = key(etcd_server)[1]
        with probing([s.port for s in sups]) as probes:
            b_revision = run_sequence(etcd_server, sups, real_binary, a, str(foo), b, moment,
                                      120)
            if second == "good":
                done = settled(etcd_server, sups, str(other), 180)
                assert done["phase"] == "done" and done["revision"] == b_revision
            else:
                expected = foo if moment == "all-applied" else real_model
                settled(etcd_server, sups, str(expected), 180)
                assert key(etcd_server)[1]["args"] == (a if moment == "all-applied"
                                                       else before["args"])
        assert probes.min_serving() >= 2, "never more than --max-unavailable 1 down"
        final = key(etcd_server)[1]["args"][0][1]
        assert all(props(s.port)["model_path"] == final for s in sups)
