"""What the least-privilege tests share: a program that leaves a trace, and "refused, and
nothing changed"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness import FAKE, SupervisorProcess


def marker_binary(tmp: Path, name: str = "not-llama") -> tuple[Path, Path]:
    """A program that leaves a marker file whenever it runs (even for --help)."""
    marker = tmp / f"{name}.ran"
    script = tmp / name
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexec {FAKE} \"$@\"\n")
    script.chmod(0o755)
    return script, marker


class Unchanged:
    """What must stay as it was when a change is refused."""

    def __init__(self, sup: SupervisorProcess) -> None:
        self.sup = sup
        self.status = sup.status()
        self.stored = sup.config_file.read_bytes()

    def check(self) -> None:
        now = self.sup.status()
        assert now["pid"] == self.status["pid"], "a new llama-server was started"
        assert now["generation"] == self.status["generation"]
        assert now["config"] == self.status["config"], "the config in effect changed"
        assert self.sup.config_file.read_bytes() == self.stored, "something was stored"


def refused(sup: SupervisorProcess, body: dict[str, Any], rule: str,
            dry_run: bool = False) -> dict[str, Any]:
    """Post ``body``: 422 naming ``rule``, and nothing changed (:class:`Unchanged`)."""
    before = Unchanged(sup)
    r = sup.http.post("/v1/params", params={"dry_run": "1"} if dry_run else {}, json=body)
    assert r.status_code == 422, r.text
    assert rule in r.json()["error"], r.json()
    before.check()
    return dict(r.json())
