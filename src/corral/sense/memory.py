"""Memory available to a new llama-server: MemAvailable, or the cgroup's room if lower.

The paths are parameters so tests can hand in a fake ``/proc/meminfo`` and cgroup tree.
cgroup v2 (``memory.max`` - ``memory.current``) and v1 (``memory.limit_in_bytes`` -
``memory.usage_in_bytes``) are both read; "no limit" is no figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
V1_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class MemorySource:
    """Where host memory is read from (real files by default)."""

    meminfo: Path = Path("/proc/meminfo")
    cgroup_root: Path = CGROUP
    self_cgroup: Path = Path("/proc/self/cgroup")

    def available(self) -> int | None:
        """Bytes a new process could use now, or None if unknown."""
        host = meminfo_available(self.meminfo)
        limit = cgroup_room(self.cgroup_root, self.self_cgroup)
        known = [v for v in (host, limit) if v is not None]
        return min(known) if known else None


def meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(root: Path, self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The limit minus the usage of this process's cgroup (v2, else v1), or None."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            room = _room(root / rel.lstrip("/"), "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            room = _room(root / "memory" / rel.lstrip("/"), "memory.limit_in_bytes",
                         "memory.usage_in_bytes")
        else:
            continue
        if room is not None:
            return room
    return None


def _room(group: Path, limit_file: str, usage_file: str) -> int | None:
    try:
        limit = (group / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= V1_UNLIMITED:
            return None
        return max(0, int(limit) - int((group / usage_file).read_text()))
    except (OSError, ValueError):
        return None
