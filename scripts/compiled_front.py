"""Keep the front door's compiled modules in step with their source (editable installs).

An editable install (``scripts/setup.sh``) compiles the modules ``setup.py`` lists in place,
beside their source (``src/corral/front/proxy.cpython-311-...so``). Python imports a compiled
module before its ``.py``, so after an edit the old code would still run. This rebuilds them
when a source is newer than its compiled module (about 20 s); ``setup.sh`` and the tests'
``conftest.py`` run it. A tree with no compiled module (pure Python) is left alone.

    .venv/bin/python scripts/compiled_front.py [--check]
"""

from __future__ import annotations

import ast
import fcntl
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiled_sources() -> list[Path]:
    """The sources ``setup.py`` compiles (its ``COMPILED`` list)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            return [ROOT / p for p in ast.literal_eval(node.value)]
    raise SystemExit("setup.py has no COMPILED list")


def stale() -> list[Path] | None:
    """Sources newer than their compiled module; None when nothing is compiled here."""
    pairs = [(src, sorted(src.parent.glob(src.stem + ".*.so"))) for src in compiled_sources()]
    if not any(built for _, built in pairs):
        return None
    return [src for src, built in pairs
            if not built or src.stat().st_mtime > built[-1].stat().st_mtime]


def main() -> int:
    if not stale():
        return 0
    if "--check" not in sys.argv[1:]:
        # two test runs in one tree at once: one rebuilds, the other waits and finds it done
        lock = open(ROOT / ".compiled_front.lock", "w")  # noqa: SIM115  # held until exit
        fcntl.flock(lock, fcntl.LOCK_EX)
    old = stale()
    if not old:
        return 0
    names = ", ".join(str(p.relative_to(ROOT)) for p in old)
    if "--check" in sys.argv[1:]:
        print(f"compiled front door out of date: {names}", file=sys.stderr)
        return 1
    print(f"compiled_front: rebuilding the compiled front door ({names} changed)",
          file=sys.stderr)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=ROOT, stdout=subprocess.DEVNULL)
    if done.returncode == 0:
        # mypyc rewrites no C for a source whose content is the same (a touch, a checkout),
        # so setuptools leaves its module as it was: it is current all the same.
        for src in compiled_sources():
            for built in src.parent.glob(src.stem + ".*.so"):
                built.touch()
    if done.returncode != 0 or stale():
        print("compiled_front: the rebuild failed; remove src/**/*.so to run pure Python",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
