"""The pure-core rule (STYLE.md): corral.core imports no I/O, no clock, no shell module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import corral.core

CORE = Path(corral.core.__file__).parent
FORBIDDEN = {"asyncio", "subprocess", "socket", "os", "selectors", "signal", "threading",
             "time", "shutil"}
ALLOWED_CORRAL = ("corral.core", "corral.errors")


def imported_modules(source: str, package: str = "corral.core") -> set[str]:
    """Every module a source imports, relative imports resolved against ``package``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            if node.module is None:  # from . import x
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def is_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "corral":
        return any(module == ok or module.startswith(ok + ".") for ok in ALLOWED_CORRAL)
    return top not in FORBIDDEN


def violations(source: str) -> list[str]:
    return [m for m in sorted(imported_modules(source)) if not is_allowed(m)]


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import re\nfrom dataclasses import dataclass", []),
        ("import asyncio", ["asyncio"]),
        ("import os.path", ["os.path"]),
        ("from os import environ", ["os"]),
        ("from subprocess import Popen", ["subprocess"]),
        ("def f():\n    import socket\n", ["socket"]),  # hidden inside a function
        ("if False:\n    import time\n", ["time"]),
        ("from corral.core.args import Change\nfrom corral.errors import InvalidArgs", []),
        ("from corral.child import process", ["corral.child"]),
        ("from ..controller import Controller", ["corral.controller"]),
        ("from . import args", []),
        ("import osmosis", []),  # only whole module names count
    ],
)
def test_checker(source: str, bad: list[str]) -> None:
    """The checker flags forbidden and non-core corral imports, hidden or relative ones too."""
    assert violations(source) == bad


def test_core_has_modules() -> None:
    """corral.core holds the expected modules, so the purity check has something to check."""
    names = {p.stem for p in CORE.glob("*.py")}
    assert {"args", "debounce", "steps", "backoff", "decide"} <= names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    """Each corral.core module imports no I/O, clock or shell module, nor non-core corral."""
    assert violations(path.read_text()) == []
