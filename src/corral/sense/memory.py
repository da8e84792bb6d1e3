"""Memory available to a new llama-server: MemAvailable, or the cgroup's limit if lower."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def mem_available(proc: Path = Path("/proc/meminfo"), cgroup: Path = CGROUP) -> int | None:
    """Bytes a new process could use now, or None if unknown."""
    host = _meminfo_available(proc)
    limit = _cgroup_room(cgroup)
    known = [v for v in (host, limit) if v is not None]
    return min(known) if known else None


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path) -> int | None:
    """cgroup v2: memory.max minus memory.current of this process's cgroup."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        group = root / rel.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def file_size(path: object) -> int | None:
    try:
        return os.stat(str(path)).st_size if isinstance(path, str) else None
    except OSError:
        return None
