"""Least privilege in the pre-flight every change passes: API batches, fleet configs, start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.child.preflight import Preflight
from corral.child.privilege import build_policy
from corral.core.args import Change, FlagCatalog, LlamaConfig
from corral.core.privilege import Judge
from corral.errors import NotAllowed
from corral.supervisor.changes import Outcome
from tests.fakes import FakeChecks, Rig, config
from tests.harness import make_fake_model
from tests.privilege_helpers import marker_binary


@pytest.mark.parametrize("fit", [True, False])
async def test_preflight_refuses_a_binary_before_running_it(tmp_path: Path, fit: bool) -> None:
    """The real Preflight checks the binary rule before reading its catalog (--help)."""
    allowed, _ = marker_binary(tmp_path, "allowed")
    script, marker = marker_binary(tmp_path, "intruder")
    model = make_fake_model(tmp_path / "a.gguf")
    trusted = LlamaConfig(str(allowed), (("--model", str(model)),))
    checks = Preflight(judge=build_policy(trusted, FlagCatalog()))
    with pytest.raises(NotAllowed, match="binary not allowed") as caught:
        await checks.check(LlamaConfig(str(script), trusted.args), None, fit=fit)
    assert caught.value.rule == "binary"
    assert not marker.exists()


class PolicyChecks(FakeChecks):
    """FakeChecks with the real rules in front, in Preflight's order (admit first)."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge

    def admit_binary(self, binary: str) -> None:
        self.judge.check_binary(binary)

    async def admit(self, config: LlamaConfig) -> None:
        self.judge.check(config, FlagCatalog())

    async def check(self, config: LlamaConfig, running: LlamaConfig | None, *,
                    fit: bool = True) -> None:
        await self.admit(config)
        await super().check(config, running, fit=fit)


@pytest.mark.parametrize("bad, rule", [
    ({"binary": "/usr/bin/env"}, "binary not allowed"),
    ({"--log-file": "/etc/cron.d/x"}, "flag not allowed"),
    ({"env": "LD_PRELOAD"}, "environment variable not allowed"),
])
async def test_a_fleet_config_that_breaks_a_rule_is_a_failed_apply(bad: dict[str, str],
                                                                   rule: str) -> None:
    """A fleet config (source="fleet") goes through the same rules: rejected, nothing started,
    nothing stored, the last good config kept."""
    async with Rig() as rig:
        trusted = rig.controller.last_good
        rig.controller.checks = rig.checks = PolicyChecks(
            Judge(build_policy(trusted, FlagCatalog()).policy, lambda p: p))
        await rig.until_state("RUNNING")
        pid, stored = rig.active.pid, dict(rig.store._configs)
        wanted = LlamaConfig(bad.get("binary", trusted.binary),
                             (*trusted.args, *((k, v) for k, v in bad.items()
                                               if k.startswith("-"))),
                             (("LD_PRELOAD", "/tmp/x.so"),) if "env" in bad else ())
        record = rig.controller.submit(Change.whole(wanted), source="fleet")
        await rig.clock.run_until(record.done.done, "the outcome")
        assert record.outcome is Outcome.REJECTED and rule in (record.error or "")
        assert rig.active.pid == pid and len(rig.launcher.servers) == 1
        assert dict(rig.store._configs) == stored
        assert rig.controller.last_good == trusted == config()
