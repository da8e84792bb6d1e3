"""Least privilege with the real llama-server: the proposal's examples still work with
--allow-model-dir, and what the rules refuse never reaches llama-server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import props, supervisor
from tests.privilege_helpers import Unchanged, marker_binary

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_proposal_examples_work_with_allow_model_dir(
        tmp_path: Path, real_binary: Path, real_model: Path,
        model_alias: Callable[[str], Path]) -> None:
    """-m (a name that resolves into the allowed dir) and -np are applied as before; a model
    outside, a flag that writes and a binary not allowed are 422s that change nothing."""
    alias = model_alias("other-name")  # a symlink in tmp_path to the real model: allowed
    script, marker = marker_binary(tmp_path)
    with supervisor(tmp_path, real_binary, real_model, ["-c", "2048"],
                    extra_cli=["--allow-model-dir", str(real_model.parent)]) as sup:
        sup.wait_running(120)
        r = sup.post({"-m": str(alias), "-np": 2})
        assert r.status_code == 200, r.text
        assert props(sup.port)["total_slots"] == 2
        before = Unchanged(sup)
        for body, rule in (({"-m": "/etc/hostname"}, "file not allowed"),
                           ({"--log-file": str(tmp_path / "x.log")}, "flag not allowed"),
                           ({"binary": str(script)}, "binary not allowed")):
            r = sup.post(body)
            assert r.status_code == 422 and rule in r.json()["error"], r.text
        before.check()
        assert not marker.exists() and not (tmp_path / "x.log").exists()
