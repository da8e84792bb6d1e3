"""Corral's build: the front door's per-request modules are compiled with mypyc when possible.

Why: the front door forwards every request through Python code. Compiled by mypyc (the
same source, its type annotations made C), it spends about a fifth less CPU per request
(44 vs 56 µs at 16 clients): 83-87 % of HAProxy's requests/s instead of 74-78 %
(``bench/front_door``, README "Benchmarks").

Nothing else changes: the package is the same with or without the compiled modules. The
build falls back to pure Python, with a warning, when mypyc or a C compiler is missing or a
compile fails; ``CORRAL_PURE=1`` asks for pure Python. ``corral version`` and the log's
start line say which one runs (``corral.front.compiled``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules every request runs through, compiled together (one mypyc group: their calls
# to each other are C calls). scripts/compiled_front.py and the tests read this list.
COMPILED = [
    "src/corral/core/edge.py",
    "src/corral/front/client.py",
    "src/corral/front/edge.py",
    "src/corral/front/idle.py",
    "src/corral/front/proxy.py",
    "src/corral/front/router.py",
    "src/corral/front/timings.py",
    "src/corral/front/upstream.py",
]


class OptionalBuildExt(build_ext):
    """A compile that fails leaves no half-built module behind: pure Python, and a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  # any failure: the pure modules still work
            for path in self.get_outputs():
                Path(path).unlink(missing_ok=True)
            print(f"corral: the front door was not compiled ({exc}); it runs as pure Python",
                  file=sys.stderr)


def compiled_modules() -> list:
    if os.environ.get("CORRAL_PURE", "") not in ("", "0"):
        print("corral: CORRAL_PURE is set: the front door runs as pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        print(f"corral: mypyc is not available ({exc}); the front door runs as pure Python")
        return []
    try:
        return mypycify(COMPILED, opt_level="3")
    except (Exception, SystemExit) as exc:  # noqa: BLE001  # mypyc exits on a type error
        print(f"corral: mypyc could not compile the front door ({exc!r}); it runs as pure "
              "Python", file=sys.stderr)
        return []


if __name__ == "__main__":  # as setuptools runs it (scripts/compiled_front.py reads COMPILED)
    setup(ext_modules=compiled_modules(), cmdclass={"build_ext": OptionalBuildExt})
