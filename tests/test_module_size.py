"""No module of the package grows past 400 lines (issue 19's shape: small modules, one
concern each). Twice a module grew back past it unnoticed; now a test says so."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "corral"
MAX_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines())
             for p in SRC.rglob("*.py")}
    assert sizes, "no module found"
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
