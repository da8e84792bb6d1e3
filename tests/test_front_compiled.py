"""The front door as it ships: compiled by mypyc where it can be, pure Python where not.

``setup.py`` compiles the per-request modules (``COMPILED``); the same source runs as pure
Python when there is no compiler or ``CORRAL_PURE=1``. What ``bench/front_door`` measures
is the compiled one, so this checkout must run it; the pure one must forward the same.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import corral.front

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from compiled_front import compiled_sources  # noqa: E402


def _module(source: Path) -> str:
    return ".".join(source.relative_to(ROOT / "src").with_suffix("").parts)


def test_every_listed_module_runs_compiled_here() -> None:
    assert corral.front.COMPILED
    for source in compiled_sources():
        module = importlib.import_module(_module(source))
        assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__


def _project_copy(tmp_path: Path) -> Path:
    """This checkout's build files and source, with no compiled module."""
    project = tmp_path / "p"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    return project


def test_the_pure_python_front_door_passes_the_same_tests(tmp_path: Path) -> None:
    src = _project_copy(tmp_path) / "src"   # what installs without a compiler
    env = {**os.environ, "PYTHONPATH": str(src)}
    pure = subprocess.run([sys.executable, "-c", "import corral.front as f; "
                           "print(f.COMPILED, f.proxy.__file__)"],
                          capture_output=True, text=True, env=env, check=True)
    assert pure.stdout.split() == ["False", str(src / "corral" / "front" / "proxy.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_front_forward.py", "tests/test_front_routing.py",
         "tests/test_front_edge.py", "tests/test_core_edge.py"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_a_failed_compile_installs_pure_python(tmp_path: Path) -> None:
    """No working C compiler: the build warns and leaves no half-built module behind."""
    project = _project_copy(tmp_path)
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=project, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "CC": "false", "LDSHARED": "false"})
    assert built.returncode == 0, built.stderr[-3000:]
    assert "the front door was not compiled" in built.stderr
    assert not list((project / "src").rglob("*.so"))


def test_corral_pure_skips_the_compile(tmp_path: Path) -> None:
    project = _project_copy(tmp_path)
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=project, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "CORRAL_PURE": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    assert "CORRAL_PURE is set" in built.stdout + built.stderr
    assert not list((project / "src").rglob("*.so"))
